"""The floor: forward + input-gradient backward of the model alone, its FLOPs and the device's matrix rate."""
from __future__ import annotations

import time

import torch

from srel_fast.models import frozen_weights_in_amp_dtype

from .device import sync


class FloorStep:
    """Forward + input-gradient backward of the model alone (frozen weights,
    no BN term, no crops), at srel-fast's precision and memory format;
    torch.compile'd (``floor``) or eager (``floor-eager``)."""

    def __init__(self, model: torch.nn.Module, image_size: int, batch: int, device: torch.device,
                 amp: torch.dtype | None, channels_last: bool, seed: int = 0, compiled: bool = True):
        self.model = model.to(device).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        if channels_last:
            self.model = self.model.to(memory_format=fmt)
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn((batch, 3, image_size, image_size), generator=g).to(device)
        self.x = self.x.contiguous(memory_format=fmt).requires_grad_(True)
        self.device, self.amp = device, amp
        # As the recovery does (srel_fast.recover.Recoverer): the frozen conv and linear
        # weights stored in the autocast dtype, so that the floor pays no per-step casts either.
        # This floor's model is its own copy, so the cast is never undone.
        self._weights = frozen_weights_in_amp_dtype(self.model, amp)
        self._weights.__enter__()
        self.images_per_iteration = batch
        self.forward = torch.compile(self._forward, dynamic=False) if compiled else self._forward

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
            out = self.model(x)
        return out.float().sum()

    def step(self, it: int = 0) -> torch.Tensor:
        self.x.grad = None
        loss = self.forward(self.x)
        loss.backward()
        return loss.detach()

    def flops(self) -> dict:
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        with counter:
            self.x.grad = None
            self._forward(self.x).backward()  # eager: the counter sees every aten op
        counts = counter.get_flop_counts().get("Global", {})
        conv = sum(v for k, v in counts.items() if "convolution" in str(k))
        return {"flops_total": int(counter.get_total_flops()), "flops_conv": int(conv),
                "flops_by_op": {str(k): int(v) for k, v in counts.items()}}


def matmul_rate(device: torch.device, dtype: torch.dtype, small: bool) -> dict:
    """Best-of-k time of an n x n x n matmul at ``dtype``: the device's matrix rate."""
    n = 1024 if small else (8192 if device.type == "cuda" else 2048)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    for _ in range(2):
        a @ b
    sync(device)
    best = float("inf")
    for _ in range(5 if small else 10):
        t = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t)
    return {"n": n, "dtype": str(dtype).replace("torch.", ""), "seconds": best, "tflops": 2 * n ** 3 / best / 1e12}
