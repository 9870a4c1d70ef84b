"""Class-aware BatchNorm statistics: per-class targets from the real data, and the
recovery terms built from per-image moments.

The paper's BN term matches the statistics of a recovery batch (one image per class)
to the running statistics, which describe the whole (augmented) training set. With
several images of a class recovered together, their statistics can also be matched
to that class's own statistics (EDC's class-aware matching):

    L_class = sum_l w_l sum_{c in batch} ( ||var_lc(x) - cv_lc||_2 + ||mu_lc(x) - cm_lc||_2 )

with cm_lc, cv_lc the mean and biased variance of BN layer l's input over the real
training images of class c (eval mode, clean images), collected once by
``collect_class_statistics`` (squeeze stores them in its checkpoint).

Both terms come from the same per-image moments (mean and biased variance of each
image's BN input per channel, one fused kernel read with ``groups = N``): the moments
of any group of images follow exactly from them (``group_moments``), so one forward
gives the paper term over the recovery batches and the class term over the classes.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .models import bn_layers

ClassStats = list[tuple[Tensor, Tensor]]   # per BN layer: (mean (K, C), var (K, C)), float32


@torch.no_grad()
def collect_class_statistics(model: nn.Module, images: Tensor, labels: Tensor, num_classes: int,
                             batch_size: int = 500) -> ClassStats:
    """Per-class mean and biased variance of every BN layer's input, over (N, H, W) of
    the images of each class, with the model in eval mode. ``images`` are normalised
    model inputs (N, C, H, W) on the model's device; sums are accumulated in float64."""
    layers = bn_layers(model)
    inputs: dict[int, Tensor] = {}
    handles = [m.register_forward_hook(lambda m, inp, out, i=i: inputs.__setitem__(i, inp[0]))
               for i, m in enumerate(layers)]
    was_training = model.training
    model.eval()
    sums1: list[Tensor | None] = [None] * len(layers)
    sums2: list[Tensor | None] = [None] * len(layers)
    count = torch.zeros(num_classes, dtype=torch.float64, device=images.device)
    try:
        for s in range(0, images.shape[0], batch_size):
            y = labels[s:s + batch_size]
            model(images[s:s + batch_size])
            onehot = torch.nn.functional.one_hot(y, num_classes).double()      # (B, K)
            for i in range(len(layers)):
                a = inputs[i].double()
                dims = list(range(2, a.dim()))
                m1 = a.mean(dims) if dims else a                             # (B, C): per-image moments
                m2 = (a * a).mean(dims) if dims else a * a
                if sums1[i] is None:
                    sums1[i] = torch.zeros(num_classes, a.shape[1], dtype=torch.float64, device=a.device)
                    sums2[i] = torch.zeros_like(sums1[i])
                sums1[i] += onehot.T @ m1
                sums2[i] += onehot.T @ m2
            count += onehot.sum(0)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if bool((count == 0).any()):
        missing = torch.nonzero(count == 0).flatten().tolist()
        raise ValueError(f"no real images of classes {missing} to collect class statistics from")
    out = []
    for i in range(len(layers)):
        mean = sums1[i] / count[:, None]
        var = (sums2[i] / count[:, None] - mean * mean).clamp_min(0)
        out.append((mean.float().cpu(), var.float().cpu()))
    return out


def class_stats_to_state(stats: ClassStats) -> list[dict[str, Tensor]]:
    return [{"mean": m, "var": v} for m, v in stats]


def class_stats_from_state(state: list[dict[str, Tensor]]) -> ClassStats:
    return [(d["mean"].float(), d["var"].float()) for d in state]


def image_moments(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-image, per-channel mean and biased variance of x (N, C, ...), float32 (float64
    for a float64 x); plain torch ops (the reference path's way)."""
    dt = torch.promote_types(x.dtype, torch.float32)
    x = x.to(dt)
    dims = list(range(2, x.dim()))
    if not dims:
        return x, torch.zeros_like(x)
    var, mean = torch.var_mean(x, dims, correction=0)
    return mean, var


def group_moments(mean: Tensor, var: Tensor, index: Tensor, num_groups: int) -> tuple[Tensor, Tensor]:
    """Mean and biased variance per (group, channel) of the images whose per-image moments
    are ``mean``, ``var`` (N, C), each image weighted equally (every image has the same
    element count), ``index`` (N,) the group of each image. Exact (parallel axis):
    var_g = mean_i(var_i) + mean_i((mean_i - mean_g)^2). A group without images gets 0."""
    count = torch.bincount(index, minlength=num_groups).to(mean.dtype).clamp_min(1)[:, None]
    g_mean = torch.zeros((num_groups, mean.shape[1]), dtype=mean.dtype, device=mean.device)
    g_mean = g_mean.index_add(0, index, mean) / count
    spread = var + (mean - g_mean[index]) ** 2
    g_var = torch.zeros_like(g_mean).index_add(0, index, spread) / count
    return g_mean, g_var


def stat_distance(mean: Tensor, var: Tensor, target_mean: Tensor, target_var: Tensor) -> Tensor:
    """sum over groups of ||var_g - target_var_g||_2 + ||mean_g - target_mean_g||_2
    (targets (C,) broadcast to every group, or (G, C))."""
    return (torch.linalg.vector_norm(var - target_var, dim=-1)
            + torch.linalg.vector_norm(mean - target_mean, dim=-1)).sum()


class ClassAwareTerms:
    """The paper term and the class term of one BN layer from its per-image moments.

    ``set_batch(batch_index, class_index)`` says, for the next forward, which recovery
    batch (the paper's groups) and which class each image belongs to. Called with a
    layer and the (N, C) moments of its input, returns the stacked (paper, class)
    terms, each weighted by the layer's weight; ``split`` sums a model's stacked terms
    back into the two."""

    def __init__(self, class_stats: ClassStats, layers: list[nn.Module], num_classes: int):
        if len(class_stats) != len(layers):
            raise ValueError(f"class statistics for {len(class_stats)} BN layers, but the model has {len(layers)}")
        self.layer_index = {id(m): i for i, m in enumerate(layers)}
        self.targets = class_stats
        self.num_classes = num_classes
        self.batch_index: Tensor | None = None
        self.class_index: Tensor | None = None
        self.num_batches = 1

    def to(self, device) -> "ClassAwareTerms":
        self.targets = [(m.to(device), v.to(device)) for m, v in self.targets]
        return self

    def set_batch(self, batch_index: Tensor, class_index: Tensor) -> None:
        self.batch_index, self.class_index = batch_index, class_index
        self.num_batches = int(batch_index.max()) + 1
        present = torch.bincount(class_index, minlength=self.num_classes) > 0
        self.present = present.to(torch.float32)

    def __call__(self, layer: nn.Module, mean: Tensor, var: Tensor, weight: float) -> Tensor:
        rm, rv = layer.running_mean.detach().float(), layer.running_var.detach().float()
        b_mean, b_var = group_moments(mean, var, self.batch_index, self.num_batches)
        paper = stat_distance(b_mean, b_var, rm, rv)
        cm, cv = self.targets[self.layer_index[id(layer)]]
        c_mean, c_var = group_moments(mean, var, self.class_index, self.num_classes)
        per_class = (torch.linalg.vector_norm(c_var - cv, dim=-1) + torch.linalg.vector_norm(c_mean - cm, dim=-1))
        cls = (per_class * self.present).sum()   # classes absent from the batch add nothing
        return weight * torch.stack([paper, cls])


def class_aware_loss_reference(activations: list[Tensor], running: list[tuple[Tensor, Tensor]],
                               class_stats: ClassStats, weights: list[float], batch_index: Tensor,
                               class_index: Tensor) -> tuple[Tensor, Tensor]:
    """The two terms written the obvious way, in float64, from the BN inputs themselves:
    (sum_l w_l sum_b dist(stats of batch b, running), sum_l w_l sum_c dist(stats of class c, class c's))."""
    paper = torch.zeros((), dtype=torch.float64)
    cls = torch.zeros((), dtype=torch.float64)
    for a, (rm, rv), (cm, cv), w in zip(activations, running, class_stats, weights):
        a = a.double()
        dims = [0] + list(range(2, a.dim()))
        for b in torch.unique(batch_index):
            xb = a[batch_index == b]
            paper = paper + w * (torch.norm(xb.var(dims, unbiased=False) - rv.double())
                                 + torch.norm(xb.mean(dims) - rm.double()))
        for c in torch.unique(class_index):
            xc = a[class_index == c]
            cls = cls + w * (torch.norm(xc.var(dims, unbiased=False) - cv[c].double())
                             + torch.norm(xc.mean(dims) - cm[c].double()))
    return paper, cls
