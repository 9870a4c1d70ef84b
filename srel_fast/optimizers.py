"""The optimisers and learning-rate schedules of the training loops (squeeze and train):
the official scripts' rules (SGD, AdamW; no decay on BN parameters and biases; cosine with linear
warm-up, stepped per iteration or per epoch)."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .errors import UserError

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
