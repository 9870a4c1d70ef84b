"""Pieces shared by the training loops of squeeze and train: optimiser
recipes, evaluation on real data, epoch checkpoints with RNG state.

Under torchrun evaluation is sharded: each rank scores its part of the
in-memory test set (or its shard of the validation loader) and the counts
are summed over ranks, so every rank returns the single-process accuracy."""
from __future__ import annotations

import os
import random

import numpy as np
import torch
from torch import nn

from .data import Normalization, TensorData
from .errors import UserError
from .files import torch_save_atomic


OPTIMIZERS = ("sgd", "adamw", "adam")
LR_STEPS = ("iteration", "epoch")


def parameter_groups(model: nn.Module, weight_decay: float, decay_bn_bias: bool = True) -> list[dict]:
    """Optimiser parameter groups. ``decay_bn_bias=False`` is the official SRe2L student's
    rule (validate/utils.py get_parameters): weight decay only on parameters whose name
    contains "weight" and that have more than one dimension (conv and linear weights);
    BatchNorm weights and biases and every bias get none."""
    if decay_bn_bias:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if "weight" in name and p.ndim > 1 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(name: str, params, lr: float, weight_decay: float, momentum: float = 0.9):
    """``params``: parameters or parameter groups (a group's own weight_decay wins)."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=False)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    raise UserError(f"unknown optimizer {name!r}; use {', '.join(OPTIMIZERS)}.")


def lr_factor(step: int, total: int, warmup: int = 0, warmup_start: float = 0.01) -> float:
    """Multiplier of the base lr after ``step`` scheduler steps: a linear warm-up from
    ``warmup_start`` over ``warmup`` steps, then cosine to zero over the remaining
    ``total - warmup``. This is torchvision's reference recipe (SequentialLR of
    LinearLR(start_factor) and CosineAnnealingLR(T_max = total - warmup)) in closed
    form; without warm-up it is the official SRe2L student's LambdaLR."""
    if step < warmup:
        return warmup_start + (1.0 - warmup_start) * step / warmup
    span = max(1, total - warmup)
    # a Python float, not np.float64: the lr lands in optimiser and scheduler states, which resume
    # files hold and load with weights_only=True
    return float(0.5 * (1 + np.cos(np.pi * min(step - warmup, span) / span)))


def cosine_schedule(optimizer, total_steps: int, warmup_steps: int = 0, warmup_start: float = 0.01):
    """Cosine to zero over ``total_steps`` scheduler steps, after an optional linear warm-up.
    The caller steps it per iteration or per epoch (``total_steps`` counts those)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, warmup_steps, warmup_start))


def make_schedule(optimizer, lr_step: str, epochs: int, steps_per_epoch: int, warmup_epochs: int = 0,
                  warmup_start: float = 0.01):
    """The lr schedule of a training loop, stepped once per iteration (``lr_step="iteration"``)
    or once per epoch (``"epoch"``: the official scripts' way; the lr is constant within an epoch)."""
    if lr_step == "iteration":
        return cosine_schedule(optimizer, epochs * steps_per_epoch, warmup_epochs * steps_per_epoch, warmup_start)
    if lr_step == "epoch":
        return cosine_schedule(optimizer, epochs, warmup_epochs, warmup_start)
    raise UserError(f"unknown lr step {lr_step!r}; use {' or '.join(LR_STEPS)}.")


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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def rng_state() -> dict:
    """The RNG states as tensors, numbers and strings only, so that a resume file loads with
    ``torch.load(weights_only=True)`` (no numpy arrays, which would need unpickling numpy globals)."""
    version, words, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": (version, torch.tensor(words, dtype=torch.int64), gauss),
        "numpy": (str(kind), torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict) -> None:
    version, words, gauss = state["python"]
    random.setstate((version, tuple(int(w) for w in words.tolist()), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_resume_state(path: str, epoch: int, model, optimizer, scheduler, generator: torch.Generator, extra: dict) -> None:
    torch_save_atomic({
        "epoch": epoch,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "generator": generator.get_state(),
        "rng": rng_state(),
        **extra,
    }, path)


def discard_resume_state(path: str, overwrite: bool) -> None:
    """--overwrite starts a run again: rank 0 deletes an interrupted run's resume file once every
    rank has checked the output (srel_fast.files.check_output)."""
    from . import distributed as _dist

    _dist.barrier()
    if overwrite and os.path.exists(path) and _dist.is_main():
        os.remove(path)
    _dist.barrier()


def load_resume_state(path: str, config: dict, model, optimizer, scheduler, generator: torch.Generator) -> int:
    """Restore an interrupted run; returns the number of finished epochs.
    A state file written under another config is refused."""
    if not os.path.exists(path):
        return 0
    state = load_resume_file(path)
    if state.get("config") != config:
        raise UserError(f"resume file {path} was written by a run with a different config; "
                        "delete it or use --overwrite to start again.")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    generator.set_state(state["generator"])
    set_rng_state(state["rng"])
    return int(state["epoch"])


def load_resume_file(path: str) -> dict:
    """A resume state, loaded with ``weights_only=True``: tensors, numbers, strings and plain
    containers only (what save_resume_state writes: state dicts, generator states, rng_state()),
    so a file planted in the output directory cannot run code when it is read."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001  (UnpicklingError for a forbidden global, anything for a broken file)
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "weights_only" in str(exc) or "Unsupported global" in str(exc) or "GLOBAL" in str(exc):
            reason = "it holds objects other than tensors and plain containers"
        raise UserError(f"resume file {path} cannot be loaded safely ({reason[:160]}); delete it or use "
                        "--overwrite to start again.") from None
    if not isinstance(state, dict):
        raise UserError(f"resume file {path} is not a resume state; delete it or use --overwrite to start again.")
    return state
