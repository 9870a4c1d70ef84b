"""Top-1 accuracy of a model on real data: an in-memory test set or a validation loader.

Under torchrun evaluation is sharded: each rank scores its part of the
in-memory test set (or its shard of the validation loader) and the counts
are summed over ranks, so every rank returns the single-process accuracy."""
from __future__ import annotations

import torch
from torch import nn

from .data import Normalization, TensorData


@torch.no_grad()
def evaluate(model: nn.Module, data: TensorData, norm: Normalization, device: torch.device,
             batch_size: int = 1000, image_size: int | None = None) -> float:
    """Top-1 accuracy (percent) on an in-memory labelled set."""
    from . import distributed as _dist

    model = _dist.unwrap(model)
    model.eval()
    correct = 0
    lo, hi = _dist.shard_bounds(len(data)) if _dist.is_distributed() else (0, len(data))
    for start in range(lo, hi, batch_size):
        end = min(start + batch_size, hi)
        x = norm.normalize(data.images[start:end].to(device))
        if image_size is not None and x.shape[-1] != image_size:
            x = torch.nn.functional.interpolate(x, size=(image_size, image_size), mode="bilinear",
                                                align_corners=False, antialias=True)
        y = data.labels[start:end].to(device)
        correct += int((model(x).argmax(1) == y).sum())
    if _dist.is_distributed():
        correct = int(_dist.all_reduce_sum([correct])[0])
    return 100.0 * correct / max(1, len(data))


@torch.no_grad()
def evaluate_loader(model: nn.Module, loader, device: torch.device) -> float:
    """Top-1 over a loader; under torchrun the loader is this rank's shard and the counts are summed."""
    from . import distributed as _dist

    model = _dist.unwrap(model)
    model.eval()
    correct = total = 0
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        correct += int((model(x).argmax(1) == y).sum())
        total += int(y.numel())
    if _dist.is_distributed():
        correct, total = (int(v) for v in _dist.all_reduce_sum([correct, total]))
    return 100.0 * correct / max(1, total)
