"""Loading the C++/CUDA extension (csrc/).

The ops in csrc/ register themselves with ``TORCH_LIBRARY_FRAGMENT(srel_fast_ext, m)``
(one fragment per source file, so every op keeps to its own files) and are
called as ``torch.ops.srel_fast_ext.<name>``. The library comes from, in order:

1. ``srel_fast._C``, built by setup.py when torch was importable at build time;
2. a lazy JIT build with torch.utils.cpp_extension.load (ninja, cached under
   TORCH_EXTENSIONS_DIR), CPU sources always, CUDA sources when a CUDA device,
   nvcc and a CUDA build of torch are present.

Set ``SREL_FAST_NO_EXT=1`` to never load it (pure torch/triton), and
``SREL_FAST_JIT=0`` to skip the JIT build. Nothing here raises: without the
extension the ``cpu``/``cuda`` backends report themselves unavailable and
``auto`` falls back.
"""
from __future__ import annotations

import glob
import importlib
import os
import threading

import torch

_lock = threading.Lock()
_state: dict = {"loaded": None, "error": None, "cuda": False}


def csrc_dir() -> str:
    # Source checkout / editable install: <repo>/kernels -> <repo>/csrc.
    # Wheel install: site-packages/srel_fast/kernels -> srel_fast/csrc (package data).
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")


def sources(with_cuda: bool) -> list[str]:
    d = csrc_dir()
    srcs = sorted(glob.glob(os.path.join(d, "*.cpp")))
    if with_cuda:
        srcs += sorted(glob.glob(os.path.join(d, "*.cu")))
    return srcs


def _quiet_cpp_extension_import() -> None:
    # Importing torch.utils.cpp_extension on a machine with nvcc but no GPU logs
    # "No CUDA runtime is found" at warning level; here that is the normal case.
    import logging

    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)


def _cuda_buildable() -> bool:
    _quiet_cpp_extension_import()
    from torch.utils.cpp_extension import CUDA_HOME

    return torch.version.cuda is not None and torch.cuda.is_available() and CUDA_HOME is not None


def _openmp_flags() -> tuple[list[str], list[str]]:
    return ["-O3", "-fopenmp"], ["-fopenmp"]


def _load() -> bool:
    if os.environ.get("SREL_FAST_NO_EXT", "0") == "1":
        _state["error"] = "disabled by SREL_FAST_NO_EXT=1"
        return False
    try:  # 1. built by setup.py
        importlib.import_module("srel_fast._C")
        _state["cuda"] = hasattr(torch.ops.srel_fast_ext, "built_with_cuda") and bool(
            torch.ops.srel_fast_ext.built_with_cuda()
        )
        return True
    except Exception as exc:  # noqa: BLE001 - any failure means "not prebuilt"
        prebuilt_error = exc
    if os.environ.get("SREL_FAST_JIT", "1") == "0":
        _state["error"] = f"not prebuilt ({prebuilt_error}) and SREL_FAST_JIT=0"
        return False
    try:  # 2. JIT
        _quiet_cpp_extension_import()
        from torch.utils.cpp_extension import load

        with_cuda = _cuda_buildable()
        cflags, ldflags = _openmp_flags()
        load(
            name="srel_fast_ext_cuda" if with_cuda else "srel_fast_ext_cpu",
            sources=sources(with_cuda),
            extra_cflags=cflags + (["-DSREL_FAST_WITH_CUDA"] if with_cuda else []),
            extra_cuda_cflags=["-O3", "--use_fast_math", "-DSREL_FAST_WITH_CUDA"],
            extra_ldflags=ldflags,
            with_cuda=with_cuda,
            is_python_module=False,
            verbose=os.environ.get("SREL_FAST_VERBOSE_BUILD", "0") == "1",
        )
        _state["cuda"] = with_cuda
        return True
    except Exception as exc:  # noqa: BLE001
        _state["error"] = f"JIT build failed: {exc}"
        return False


def ensure_loaded() -> bool:
    """Load the extension once; True if its ops are registered."""
    if _state["loaded"] is None:
        with _lock:
            if _state["loaded"] is None:
                _state["loaded"] = _load()
    return bool(_state["loaded"])


def load_error() -> str | None:
    ensure_loaded()
    return _state["error"]


def has_op(op: str, device: str) -> bool:
    """True when the extension implements ``op`` for ``device`` ('cpu' or 'cuda').

    Every op ``X`` in csrc/ defines ``srel_fast_ext::X_fwd`` (at least) with a
    CPU kernel and, in its .cu file, a CUDA kernel."""
    if not ensure_loaded():
        return False
    if device == "cuda" and not _state["cuda"]:
        return False
    try:
        packet = getattr(torch.ops.srel_fast_ext, f"{op}_fwd")
    except (AttributeError, RuntimeError):
        return False
    key = "CPU" if device == "cpu" else "CUDA"
    return torch._C._dispatch_has_kernel_for_dispatch_key(packet.default.name(), key)
