"""The BatchNorm statistics term of the recovery loss, on a whole model.

    L_bn = sum_l w_l * ( ||var_l - rv_l||_2 + ||mu_l - rm_l||_2 ),  w_0 = first_bn_multiplier, w_l = 1

Two ways to compute it (``matching``, the recover stage's ``--bn-matching``):

- ``hooks``: the original SRe2L code's way, kept as the reference: a forward
  hook per BN layer that computes the mean and a permuted, contiguous copy for
  the variance;
- ``fused``: the model's BN layers are swapped for the fused eval-mode BN of
  srel_fast.kernels, which computes the statistics in the same read of the
  input and folds both backwards into one elementwise pass; ``backend`` is its
  kernel backend (srel_fast.kernels.BACKENDS).
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from .class_stats import image_moments
from .models import bn_layers

BN_MATCHINGS = ("hooks", "fused")   # the original code's forward hooks | the fused BN kernels


class _ReferenceBNHook:
    def __init__(self, module: nn.Module, owner: "ReferenceBNMatching"):
        self.loss: torch.Tensor | None = None
        self.owner = owner
        self.handle = module.register_forward_hook(self.hook)

    def hook(self, module, inputs, output):
        x = inputs[0]
        if x.dtype in (torch.float16, torch.bfloat16):  # statistics in fp32 under AMP
            x = x.float()
        if self.owner.moments_loss is not None:  # class-aware terms from per-image moments
            mean, var = image_moments(x)
            self.loss = self.owner.moments_loss(module, mean, var, self.weight)
            return
        nch = x.shape[1]
        dims = [0] + list(range(2, x.dim()))
        loss = 0
        for xg in x.chunk(self.owner.groups, dim=0):  # independent batches stacked along N
            mean = xg.mean(dims)
            var = xg.transpose(0, 1).contiguous().reshape(nch, -1).var(1, unbiased=False)
            loss = loss + torch.norm(module.running_var - var, 2) + torch.norm(module.running_mean - mean, 2)
        self.loss = loss


class ReferenceBNMatching:
    def __init__(self, model: nn.Module, first_bn_multiplier: float, groups: int = 1):
        self.groups = groups
        self.layers = bn_layers(model)
        self.hooks = [_ReferenceBNHook(m, self) for m in self.layers]
        self.weights = [first_bn_multiplier] + [1.0] * (len(self.hooks) - 1)
        for h, w in zip(self.hooks, self.weights):
            h.weight = w
        self.moments_loss = None

    def set_groups(self, groups: int) -> None:
        self.groups = groups

    def set_moments_loss(self, fn) -> None:
        """Build each layer's term with ``fn(layer, mean, var, weight)`` from the per-image
        moments of its input (class-aware matching); None restores the paper term."""
        self.moments_loss = fn

    def loss(self) -> torch.Tensor:
        if self.moments_loss is not None:  # the layers' terms are weighted already
            return sum(h.loss for h in self.hooks)
        return sum(w * h.loss for w, h in zip(self.weights, self.hooks))

    def close(self) -> None:
        for h in self.hooks:
            h.handle.remove()


@contextlib.contextmanager
def bn_matching(model: nn.Module, first_bn_multiplier: float = 10.0, matching: str = "hooks",
                backend: str = "auto") -> Iterator:
    """Context in which ``model``'s forward records the BN statistics term;
    ``.loss()`` of the yielded object returns it for the last forward, summed
    over the independent batches stacked along N (``set_groups(g)``). With
    ``set_moments_loss(fn)`` each layer's term is ``fn(layer, mean, var, weight)``
    of the per-image moments of its input (``set_groups(N)`` for N images on the
    fused path); ``.layers`` are the BN modules in module order."""
    if matching not in BN_MATCHINGS:
        raise ValueError(f"matching must be one of {BN_MATCHINGS}, got {matching!r}")
    if matching == "hooks":
        ref = ReferenceBNMatching(model, first_bn_multiplier)
        try:
            yield ref
        finally:
            ref.close()
    else:
        from srel_fast.kernels import fused_bn_matching

        with fused_bn_matching(model, first_bn_multiplier=first_bn_multiplier, backend=backend) as stats:
            yield stats
