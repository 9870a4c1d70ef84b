"""The backend switch shared by every op in srel_fast.kernels.

One name decides which implementation runs an op:

- ``torch``  the plain-PyTorch reference, always available, ground truth for tests;
- ``triton`` Triton kernels (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1);
- ``cuda``   the CUDA kernels of the C++ extension (srel_fast._C / csrc/);
- ``cpu``    the C++ (OpenMP) kernels of the extension, for CPU tensors;
- ``auto``   the fastest available one for the tensor's device.
"""
from __future__ import annotations

import functools
import os

import torch

BACKENDS = ("auto", "torch", "triton", "cuda", "cpu")


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:
        return False
    return True


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    return backend


def resolve_backend(backend: str, device: torch.device, op: str) -> str:
    """Turn ``auto`` into a concrete backend for ``device`` and check that an
    explicitly requested one can run there. ``op`` names the op for messages
    and for looking up its compiled kernels in the extension.

    Every op calls this on every call, so the answer is cached per (backend,
    device type, op, interpreter flag): only the first call pays for the checks."""
    return _resolve(backend, device.type, op, triton_interpret())


@functools.lru_cache(maxsize=None)
def _resolve(backend: str, device_type: str, op: str, interpret: bool) -> str:
    from . import _ext

    device = torch.device(device_type)
    check_backend(backend)
    if backend == "auto":
        if device.type == "cuda":
            if _ext.has_op(op, "cuda"):
                return "cuda"
            if triton_available():
                return "triton"
            return "torch"
        if device.type == "cpu" and _ext.has_op(op, "cpu"):
            return "cpu"
        return "torch"
    if backend == "triton":
        if not triton_available():
            raise RuntimeError(f"{op}: backend 'triton' requested but triton is not installed")
        if device.type != "cuda" and not interpret:
            raise RuntimeError(
                f"{op}: backend 'triton' needs a CUDA tensor (or TRITON_INTERPRET=1 for CPU tensors), got {device}"
            )
    elif backend == "cuda":
        if device.type != "cuda":
            raise RuntimeError(f"{op}: backend 'cuda' needs a CUDA tensor, got {device}")
        if not _ext.has_op(op, "cuda"):
            raise RuntimeError(f"{op}: backend 'cuda' requested but the CUDA extension is not built ({_ext.load_error()})")
    elif backend == "cpu":
        if device.type != "cpu":
            raise RuntimeError(f"{op}: backend 'cpu' needs a CPU tensor, got {device}")
        if not _ext.has_op(op, "cpu"):
            raise RuntimeError(f"{op}: backend 'cpu' requested but the C++ extension is not available ({_ext.load_error()})")
    return backend


def reset_for_tests() -> None:
    """Forget the loaded extension and every cached backend choice (tests of the loader)."""
    from . import _ext

    _ext._state.update(loaded=None, error=None, cuda=False, cuda_error=None)
    _ext.has_op.cache_clear()
    _ext.has_schema.cache_clear()
    _resolve.cache_clear()
