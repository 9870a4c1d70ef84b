"""The device of a recovery-step run: srel-fast's fast path on it, its AMP dtype, synchronisation."""
from __future__ import annotations

import torch

from srel_fast.recover import FAST_PATH


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
