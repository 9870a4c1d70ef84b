"""Loading the C++/CUDA extension (csrc/).

The ops in csrc/ register themselves into the package's op namespace with
``TORCH_LIBRARY_FRAGMENT(srel_fast, m)`` (one fragment per source file, so every
op keeps to its own files), under internal names ``_ext_<op>_fwd`` /
``_ext_<op>_bwd`` beside the public custom ops of kernels/ (``srel_fast::<op>``),
and are called as ``torch.ops.srel_fast._ext_<op>_fwd``. The library comes from,
in order:

1. ``srel_fast._C``, built by setup.py when torch was importable at build time;
2. a lazy JIT build with torch.utils.cpp_extension.load (ninja, cached under
   TORCH_EXTENSIONS_DIR), CPU sources always, CUDA sources when a CUDA device,
   nvcc and a CUDA build of torch are present.

Set ``SREL_FAST_NO_EXT=1`` to never load it (pure torch/triton), and
``SREL_FAST_JIT=0`` to skip the JIT build. Loading never raises: without the
extension the ``cpu``/``cuda`` backends report themselves unavailable and
``auto`` falls back. A failed CUDA build is not swallowed, though: the CPU
kernels are built on their own, the compiler's message is kept
(:func:`cuda_error`), and :func:`require_cuda_extension` (used by the GPU
tests and the GPU check script) raises it on a machine with a CUDA device.

nvcc flags: no ``--use_fast_math``. It turns every ``/`` into an approximate
division (and flushes denormals); the multicrop tap arithmetic divides box
sizes and must round like the reference, and these kernels are memory-bound,
so fast math buys nothing.
"""
from __future__ import annotations

import functools
import glob
import importlib
import os
import threading

import torch

_lock = threading.Lock()
_state: dict = {"loaded": None, "error": None, "cuda": False, "cuda_error": None}

NVCC_FLAGS = ["-O3", "-DSREL_FAST_WITH_CUDA"]


def csrc_dir() -> str:
    # kernels/ -> csrc/ in a checkout; srel_fast/kernels -> srel_fast/csrc (package data) in a wheel.
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


def _jit_build(with_cuda: bool) -> None:
    """torch.utils.cpp_extension.load of the sources (ninja, cached); raises on failure."""
    _quiet_cpp_extension_import()
    from torch.utils.cpp_extension import load

    cflags, ldflags = _openmp_flags()
    load(
        name="srel_fast_ext_cuda" if with_cuda else "srel_fast_ext_cpu",
        sources=sources(with_cuda),
        extra_cflags=cflags + (["-DSREL_FAST_WITH_CUDA"] if with_cuda else []),
        extra_cuda_cflags=NVCC_FLAGS,
        extra_ldflags=ldflags,
        with_cuda=with_cuda,
        is_python_module=False,
        verbose=os.environ.get("SREL_FAST_VERBOSE_BUILD", "0") == "1",
    )


def _load() -> bool:
    if os.environ.get("SREL_FAST_NO_EXT", "0") == "1":
        _state["error"] = "disabled by SREL_FAST_NO_EXT=1"
        return False
    try:  # 1. built by setup.py
        importlib.import_module("srel_fast._C")
        _state["cuda"] = hasattr(torch.ops.srel_fast, "_ext_built_with_cuda") and bool(
            torch.ops.srel_fast._ext_built_with_cuda()
        )
        if not _state["cuda"] and torch.cuda.is_available():
            _state["cuda_error"] = ("the prebuilt extension srel_fast._C has no CUDA kernels (it was built without "
                                    "nvcc or without a visible GPU); rebuild with SREL_FAST_FORCE_CUDA=1 "
                                    "pip install --no-build-isolation -e .")
        return True
    except Exception as exc:  # noqa: BLE001 - any failure means "not prebuilt"
        prebuilt_error = exc
    if os.environ.get("SREL_FAST_JIT", "1") == "0":
        _state["error"] = f"not prebuilt ({prebuilt_error}) and SREL_FAST_JIT=0"
        return False
    if _cuda_buildable():
        try:  # 2. JIT, CPU and CUDA kernels
            _jit_build(with_cuda=True)
            _state["cuda"] = True
            return True
        except Exception as exc:  # noqa: BLE001 - kept, and raised by require_cuda_extension()
            _state["cuda_error"] = f"CUDA build failed: {exc}"
    elif torch.cuda.is_available():
        _state["cuda_error"] = "CUDA device present but nvcc (CUDA_HOME) or a CUDA build of torch is missing"
    try:  # 3. JIT, CPU kernels only
        _jit_build(with_cuda=False)
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
    if _state["error"] is None and _state["cuda_error"] is not None:
        return _state["cuda_error"]
    return _state["error"]


def cuda_error() -> str | None:
    """Why the CUDA kernels are unavailable on a machine with a CUDA device (the
    compiler's message for a failed build), or None."""
    ensure_loaded()
    return _state["cuda_error"] or (_state["error"] if torch.cuda.is_available() and not _state["cuda"] else None)


def require_cuda_extension() -> None:
    """Raise, with the build's message, unless the CUDA kernels are loaded (no-op without
    a CUDA device or with SREL_FAST_NO_EXT=1)."""
    if not torch.cuda.is_available() or os.environ.get("SREL_FAST_NO_EXT", "0") == "1":
        return
    ensure_loaded()
    if not _state["cuda"]:
        raise RuntimeError(f"srel_fast CUDA extension unavailable: {cuda_error()}")


@functools.lru_cache(maxsize=None)
def has_op(op: str, device: str) -> bool:
    """True when the extension implements ``op`` for ``device`` ('cpu' or 'cuda').

    Every op ``X`` in csrc/ defines ``srel_fast::_ext_X_fwd`` (at least) with a
    CPU kernel and, in its .cu file, a CUDA kernel. Cached: the answer cannot
    change once the library is loaded, and ops ask on every call."""
    if not ensure_loaded():
        return False
    if device == "cuda" and not _state["cuda"]:
        return False
    try:
        packet = getattr(torch.ops.srel_fast, f"_ext_{op}_fwd")
    except (AttributeError, RuntimeError):
        return False
    key = "CPU" if device == "cpu" else "CUDA"
    return torch._C._dispatch_has_kernel_for_dispatch_key(packet.default.name(), key)


@functools.lru_cache(maxsize=None)
def has_schema(name: str) -> bool:
    """True when the loaded extension defines ``srel_fast::<name>`` (ops registered for
    every device at once, e.g. CompositeImplicitAutograd ones). Cached like has_op."""
    if not ensure_loaded():
        return False
    try:
        getattr(torch.ops.srel_fast, name)
    except (AttributeError, RuntimeError):
        return False
    return True
