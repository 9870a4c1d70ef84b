"""The device of a recovery-step run: its name, the environment record, srel-fast's fast path on it."""
from __future__ import annotations

import datetime as _dt
import os
import platform

import torch

from srel_fast.recover import FAST_PATH


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} logical cores, {torch.get_num_threads()} torch threads)"
    except OSError:
        pass
    return platform.processor() or "cpu"


def environment(device: torch.device) -> dict:
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


def fast_path(device: torch.device) -> dict:
    """The speed switches srel-fast uses by default on this device type (srel_fast.recover.FAST_PATH)."""
    return FAST_PATH["cuda" if device.type == "cuda" else "cpu"]


def resolve_amp(device: torch.device) -> tuple[torch.dtype | None, str]:
    """The AMP dtype of srel-fast's default fast path on the device: the precision that the
    floor and reference-compiled are measured at, so that they compare like with like."""
    amp = fast_path(device)["amp"]
    return {"bf16": (torch.bfloat16, "bf16"), "fp16": (torch.float16, "fp16")}.get(amp, (None, "fp32"))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
