"""The environment records of the benchmarks (versions, device, date), written into every result JSON.

(The pipeline's stages record srel_fast.files.environment() in their config files.)"""
from __future__ import annotations

import datetime as _dt
import os
import platform

import torch


def cpu_model() -> str | None:
    """The CPU's model name from /proc/cpuinfo (None where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = cpu_model()
    if model is not None:
        return model + f" ({os.cpu_count()} logical cores, {torch.get_num_threads()} torch threads)"
    return platform.processor() or "cpu"


def device_environment(device: torch.device) -> dict:
    """The environment record of recover-step and kernel_check: versions, the device, the extension."""
    env = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
           "host": platform.node(), "python": platform.python_version(), "torch": torch.__version__,
           "device": device_name(device), "device_kind": "gpu" if device.type == "cuda" else "cpu",
           "cuda": torch.version.cuda}
    for mod in ("triton", "torchvision"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            env[mod] = None
    try:
        from srel_fast.kernels import _ext

        env["srel_fast_extension"] = bool(_ext.ensure_loaded())
        env["srel_fast_extension_error"] = _ext.load_error()
    except Exception as exc:  # noqa: BLE001
        env["srel_fast_extension"] = False
        env["srel_fast_extension_error"] = repr(exc)
    return env


def loader_environment() -> dict:
    """The environment record of the loader benchmark: versions, CPU, GPU, data libraries."""
    env = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_model() or platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    for mod, key in (("torchvision", "torchvision"), ("nvidia.dali", "dali"), ("PIL", "pillow"), ("numpy", "numpy"),
                     ("srel_fast", "srel_fast")):
        try:
            m = __import__(mod, fromlist=["__version__"])
            env[key] = getattr(m, "__version__", "?")
        except Exception:
            env[key] = None
    return env
