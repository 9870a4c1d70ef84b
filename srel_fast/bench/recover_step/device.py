"""The device of a recovery-step run: srel-fast's fast path on it, its AMP dtype, synchronisation."""
from __future__ import annotations

import torch

from srel_fast.recover import fast_path as device_fast_path


def fast_path(device: torch.device) -> dict:
    """The speed switches srel-fast uses by default on this device (srel_fast.recover.fast_path: on
    the CPU, bf16 + channels_last only where it computes bf16 natively)."""
    return device_fast_path(device)


def resolve_amp(device: torch.device) -> tuple[torch.dtype | None, str]:
    """The AMP dtype of srel-fast's default fast path on the device: the precision that the
    floor and reference-compiled are measured at, so that they compare like with like."""
    amp = fast_path(device)["amp"]
    return {"bf16": (torch.bfloat16, "bf16"), "fp16": (torch.float16, "fp16")}.get(amp, (None, "fp32"))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
