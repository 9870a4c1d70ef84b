"""Fused eval-mode BatchNorm + BN statistics loss, and the model-wide context.

``fused_bn_stat`` returns y = eval-mode BatchNorm(x) (running stats, same
dtype and memory format as x) and the weighted BN statistics loss of x (see
bn_stat_loss.py), both from ONE read of x (op ``srel_fast::fused_bn_stat``,
run by the bn_stat_loss kernels: bn_stat_loss_triton.py,
csrc/bn_stat_loss*.c*). Its backward is ONE elementwise pass:

    dx = dy * gamma[c] / sqrt(rv[c] + eps) + g_mu[c] / M + 2 g_var[c] (x - mu[c]) / M

(a missing dy or an unused loss contributes zero). Gradients for the BN
affine weight/bias, if they require grad, are computed with torch ops.
``fused_bn_stat_reference`` is the plain-PyTorch reference (F.batch_norm +
bn_stat_loss_reference); tests/test_fused_bn_stat.py and
bench/bench_fused_bn_stat.py test and time the op.

A frozen layer (weight and bias without gradient: recovery) in eager mode takes a
shorter road: ``FusedBNStat`` keeps the BN's scale and shift between calls and
returns y and its loss from ONE autograd node (csrc/fused_bn_stat.cpp on the
extension's backends, ``_FusedLossEager`` on torch and triton), so that a step
spends its time in the kernels rather than in per-layer Python.

``fused_bn_matching(model)`` swaps every BatchNorm1d/2d/3d of a model for a
``FusedBNStat`` module for the duration of a ``with`` block ("BN matching":
the model-wide BN statistics term of the recovery loss):

    with fused_bn_matching(model, first_bn_multiplier=10.0) as stats:
        out = model(x)
        loss = ce(out, y) + r_bn * stats.loss()

The parameters and buffers stay the same tensors under the same names (the
model's state_dict is unchanged) and the original modules are put back on
exit. Works under torch.compile(fullgraph=True).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional

import torch
from torch import Tensor, nn

from . import _ext
from ._backend import check_backend, resolve_backend
from .bn_stat_loss import (OP, _dims, backward_impl, bn_stat_loss_from_moments, bn_stat_loss_reference, forward_impl,
                           moment_coeffs, new_like)

__all__ = ["fused_bn_stat", "fused_bn_moments", "fused_bn_moments_decomposed", "fused_bn_stat_reference",
           "fused_bn_stat_decomposed", "FusedBNStat", "FusedBNMatching",
           "fused_bn_matching"]


def _scale_bias(running_mean, running_var, weight, bias, eps):
    s = torch.rsqrt(running_var.detach().float() + eps)
    if weight is not None:
        s = s * weight.detach().float()
    t = -running_mean.detach().float() * s
    if bias is not None:
        t = t + bias.detach().float()
    return s, t


@torch.library.custom_op("srel_fast::fused_bn_stat", mutates_args=())
def _fused_op(x: Tensor, running_mean: Tensor, running_var: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
              eps: float, groups: int, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    s, t = _scale_bias(running_mean, running_var, weight, bias, eps)
    mean, var, y = forward_impl(x, running_mean, s, t, groups, backend, want_y=True)
    return y, mean, var


@_fused_op.register_fake
def _(x, running_mean, running_var, weight, bias, eps, groups, backend):
    g, _, c, _ = _dims(x, groups)
    return new_like(x), x.new_empty((g, c), dtype=torch.float32), x.new_empty((g, c), dtype=torch.float32)


def _fused_setup(ctx, inputs, output):
    x, rm, rv, weight, bias, eps, groups, backend = inputs
    _, mean, _ = output
    ctx.save_for_backward(x, mean, rm, rv, weight, bias)
    ctx.eps, ctx.groups, ctx.backend = eps, groups, backend


def _fused_grads(ctx, grad_y, grad_mean, grad_var, input_backward, s: Optional[Tensor] = None):
    """Gradients of (x, rm, rv, weight, bias, eps, groups, backend); ``input_backward`` runs the
    one elementwise pass for x (the custom op, or its implementation called directly); ``s`` is
    the frozen BN's per-channel scale when the forward kept it (else computed again here)."""
    x, mean, rm, rv, weight, bias = ctx.saved_tensors
    _, b, _, l = _dims(x, ctx.groups)
    if s is None:
        s, _ = _scale_bias(rm, rv, weight, bias, ctx.eps)
    a, bb = moment_coeffs(mean, grad_mean, grad_var, b * l)
    dx = None
    if ctx.needs_input_grad[0]:
        dx = input_backward(x, grad_y, s if grad_y is not None else None, mean, a, bb, ctx.groups, ctx.backend)
    gw = gb = None
    if grad_y is not None and (ctx.needs_input_grad[3] or ctx.needs_input_grad[4]):
        dims = [0] + list(range(2, x.dim()))
        shape = [1, -1] + [1] * (x.dim() - 2)
        gyf = grad_y.float()
        if ctx.needs_input_grad[3] and weight is not None:
            xhat = (x.float() - rm.float().view(shape)) * torch.rsqrt(rv.float() + ctx.eps).view(shape)
            gw = (gyf * xhat).sum(dims).to(weight.dtype)
        if ctx.needs_input_grad[4] and bias is not None:
            gb = gyf.sum(dims).to(bias.dtype)
    return dx, None, None, gw, gb, None, None, None


def _fused_backward(ctx, grad_y, grad_mean, grad_var):
    return _fused_grads(ctx, grad_y, grad_mean, grad_var, torch.ops.srel_fast.bn_stat_loss_backward)


_fused_op.register_autograd(_fused_backward, setup_context=_fused_setup)


class _FusedEager(torch.autograd.Function):
    """The same op for eager mode, without the custom-op dispatcher: on the CPU's default
    recovery path (ResNet-18, 20 BN layers) the dispatcher's Python work per call, forward
    and backward, cost about 0.1 ms per layer, 2 ms of a 215 ms step. Under torch.compile
    the custom op above is used (opaque to inductor, with its fake implementation)."""

    @staticmethod
    def forward(ctx, x, running_mean, running_var, weight, bias, eps, groups, backend):
        s, t = _scale_bias(running_mean, running_var, weight, bias, eps)
        mean, var, y = forward_impl(x, running_mean, s, t, groups, backend, want_y=True)
        _fused_setup(ctx, (x, running_mean, running_var, weight, bias, eps, groups, backend), (y, mean, var))
        ctx.scale = s   # the backward's dy coefficient, kept instead of computed again
        return y, mean, var

    @staticmethod
    def backward(ctx, grad_y, grad_mean, grad_var):
        return _fused_grads(ctx, grad_y, grad_mean, grad_var, backward_impl, ctx.scale)


class _FusedLossEager(torch.autograd.Function):
    """Eager fused BN whose second output is the layer's weighted statistics loss itself,

        loss = w * sum_g ( ||mean_g - rm|| + ||var_g - rv|| ),

    with the norms' gradient written out in the backward instead of recorded as about
    eight autograd nodes per layer (sub, norm, add, sum, mul and their backwards), which on
    the CPU's default recovery path (ResNet-18, 20 BN layers) cost more than the small
    layers' kernels. The extension's backends take the same layer as one C++ op
    (csrc/fused_bn_stat.cpp), which also keeps the backward out of Python. d||v||/dv = v / ||v||, and 0 where
    ||v|| = 0 (torch's subgradient, as vector_norm's backward gives). Frozen BN only:
    the caller takes the general path when weight or bias need a gradient."""

    @staticmethod
    def forward(ctx, x, running_mean, running_var, scale, shift, groups, backend, loss_weight):
        mean, var, y = forward_impl(x, running_mean, scale, shift, groups, backend, want_y=True)
        d_mean = mean - running_mean.float()
        d_var = var - running_var.float()
        n_mean = torch.linalg.vector_norm(d_mean, dim=-1, keepdim=True)
        n_var = torch.linalg.vector_norm(d_var, dim=-1, keepdim=True)
        loss = (n_mean.sum() + n_var.sum()) * loss_weight
        _, b, _, l = _dims(x, groups)
        # d loss / d mean and d var divided as the backward pass wants them (a = g_mu / M,
        # b = 2 g_var / M): only the incoming scalar gradient is left to multiply.
        count = b * l
        a0 = d_mean * torch.where(n_mean > 0, (loss_weight / count) / n_mean, 0.0)
        b0 = d_var * torch.where(n_var > 0, (2.0 * loss_weight / count) / n_var, 0.0)
        ctx.save_for_backward(x, mean, scale, a0, b0)
        ctx.groups, ctx.backend = groups, backend
        return y, loss

    @staticmethod
    def backward(ctx, grad_y, grad_loss):
        x, mean, scale, a0, b0 = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return (None,) * 8
        if grad_loss is None:
            grad_loss = torch.zeros((), device=x.device)
        g = grad_loss.float()
        dx = backward_impl(x, grad_y, scale if grad_y is not None else None, mean, a0 * g, b0 * g,
                           ctx.groups, ctx.backend)
        return dx, None, None, None, None, None, None, None


def _ext_backend(backend: str, device: torch.device) -> bool:
    """Whether ``backend`` runs on the extension's kernels for this device, so that the
    C++ op csrc/fused_bn_stat.cpp (same numbers as _FusedLossEager) can take the layer."""
    return resolve_backend(backend, device, OP) in ("cpu", "cuda") and _ext.has_schema("_ext_fused_bn_stat_loss")


def _fused(x, running_mean, running_var, weight, bias, eps, groups, backend):
    if torch.compiler.is_compiling():
        return _fused_op(x, running_mean, running_var, weight, bias, eps, groups, backend)
    return _FusedEager.apply(x, running_mean, running_var, weight, bias, eps, groups, backend)


def fused_bn_stat(x: Tensor, running_mean: Tensor, running_var: Tensor, weight: Optional[Tensor] = None,
                          bias: Optional[Tensor] = None, eps: float = 1e-5, loss_weight=1.0, backend: str = "auto",
                          groups: int = 1) -> tuple[Tensor, Tensor]:
    """(y, loss): y = F.batch_norm(x, running_mean, running_var, weight, bias, training=False, eps=eps)
    in x's dtype and memory format, loss = bn_stat_loss(x, running_mean, running_var, loss_weight,
    groups=groups) as a float32 scalar, both from one read of x."""
    check_backend(backend)
    y, mean, var = _fused(x, running_mean, running_var, weight, bias, float(eps), int(groups), backend)
    return y, bn_stat_loss_from_moments(mean, var, running_mean, running_var, loss_weight)


def fused_bn_moments(x: Tensor, running_mean: Tensor, running_var: Tensor, weight: Optional[Tensor] = None,
                     bias: Optional[Tensor] = None, eps: float = 1e-5, backend: str = "auto",
                     groups: int = 1) -> tuple[Tensor, Tensor, Tensor]:
    """(y, mean, var): eval-mode BatchNorm(x) and the per-(group, channel) float32 mean and
    biased variance of x, differentiable w.r.t. x, from one read of x. For losses other
    than the running-statistics distance, built from the moments by the caller (e.g.
    ``groups=N``: per-image moments, from which any grouping's moments follow exactly)."""
    check_backend(backend)
    return _fused(x, running_mean, running_var, weight, bias, float(eps), int(groups), backend)


def fused_bn_moments_decomposed(x: Tensor, running_mean: Tensor, running_var: Tensor,
                                weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                                eps: float = 1e-5, groups: int = 1) -> tuple[Tensor, Tensor, Tensor]:
    """``fused_bn_moments`` as plain tensor ops (see fused_bn_stat_decomposed)."""
    dims = [d + 1 for d in range(x.dim()) if d != 1]  # over (N within a group, spatial)
    xg = x.float().unflatten(0, (groups, -1))
    var, mean = torch.var_mean(xg, dims, correction=0)
    shape = [1, -1] + [1] * (x.dim() - 2)
    s, t = _scale_bias(running_mean, running_var, weight, bias, eps)
    if (weight is not None and weight.requires_grad) or (bias is not None and bias.requires_grad):
        y = torch.nn.functional.batch_norm(x, running_mean, running_var, weight, bias, False, 0.0, eps)
    else:  # frozen BN (recovery): one multiply-add, in x's dtype like the kernels' y
        y = (x.float() * s.view(shape) + t.view(shape)).to(x.dtype)
    return y, mean, var


def fused_bn_stat_decomposed(x: Tensor, running_mean: Tensor, running_var: Tensor,
                             weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, eps: float = 1e-5,
                             loss_weight=1.0, groups: int = 1) -> tuple[Tensor, Tensor]:
    """The same (y, loss) as plain tensor ops, for torch.compile: ``auto`` takes this
    path while compiling. The custom op is opaque to inductor, which then needs a
    pass of its own for the statistics (read x, write y) and one for the ReLU after
    it (read y, write); from plain ops it fuses the statistics into one Welford
    reduction, eval BN into the following pointwise kernel (ReLU, residual add) and,
    in the backward, the statistics term into the BN and ReLU backward: one read of x
    and one write fewer per BN layer each way. Statistics in float32 as the kernels'."""
    y, mean, var = fused_bn_moments_decomposed(x, running_mean, running_var, weight, bias, eps, groups)
    return y, bn_stat_loss_from_moments(mean, var, running_mean, running_var, loss_weight)


def fused_bn_stat_reference(x, running_mean, running_var, weight=None, bias=None, eps=1e-5, loss_weight=1.0,
                                    groups=1):
    """Plain PyTorch: F.batch_norm(training=False) + bn_stat_loss_reference."""
    y = torch.nn.functional.batch_norm(x, running_mean.to(x.dtype), running_var.to(x.dtype),
                                       None if weight is None else weight.to(x.dtype),
                                       None if bias is None else bias.to(x.dtype), training=False, eps=eps)
    return y, bn_stat_loss_reference(x, running_mean, running_var, loss_weight, groups)


def plain_ops_under_compile(x: Tensor) -> bool:
    """Whether ``auto`` hands the statistics to torch.compile as plain ops. Measured: on an
    H200 inductor's fusion of the plain ops beats the opaque CUDA kernels (ResNet-18 at 224,
    batch 100: 8.92 vs 9.41 ms per iteration); on the CPU the C++ kernels beat inductor's
    code for the same ops (bench/results), so there ``auto`` keeps the custom op."""
    return x.is_cuda and torch.compiler.is_compiling()


class FusedBNStat(nn.Module):
    """Eval-mode BatchNorm that also records its weighted BN statistics loss
    (``self.stat_loss`` after each forward). Shares the parameters and buffers
    of ``bn`` under the same names."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm, loss_weight: float = 1.0, backend: str = "auto",
                 groups: int = 1):
        super().__init__()
        if bn.running_mean is None or bn.running_var is None:
            raise ValueError("fused_bn_matching: a BatchNorm layer without running statistics "
                             "(track_running_stats=False) has nothing to match")
        check_backend(backend)
        self._scale_shift: tuple = (None, None, None, None)  # the frozen BN's scale and shift, see _frozen_affine
        self.weight = bn.weight
        self.bias = bn.bias
        self.register_buffer("running_mean", bn.running_mean)
        self.register_buffer("running_var", bn.running_var)
        if getattr(bn, "num_batches_tracked", None) is not None:
            self.register_buffer("num_batches_tracked", bn.num_batches_tracked)
        self.eps = float(bn.eps)
        self.num_features = bn.num_features
        self.loss_weight = float(loss_weight)
        self.backend = backend
        self.groups = int(groups)
        self.stat_loss: Optional[Tensor] = None
        # Optional loss built from the moments instead of the running-statistics distance:
        # called as moments_loss(layer, mean, var) with the (groups, C) moments of the
        # input; its result becomes stat_loss. groups is then the caller's choice too.
        self.moments_loss: Optional[Callable[["FusedBNStat", Tensor, Tensor], Tensor]] = None

    def _frozen_affine(self) -> Optional[tuple[Tensor, Tensor]]:
        """The eval BN's per-channel (scale, shift), computed once and kept while the
        statistics and affine parameters are the same tensors at the same versions (any
        in-place update, e.g. load_state_dict, bumps a version); None when the weight or
        bias needs a gradient (the general path then computes it)."""
        tensors = (self.running_mean, self.running_var, self.weight, self.bias)
        if any(t is not None and t.requires_grad for t in tensors[2:]):
            return None
        versions = tuple(t._version if t is not None else None for t in tensors) + (self.eps,)
        # The cache holds the tensors themselves (compared by identity), not their ids, so a
        # replaced buffer cannot be mistaken for a new one that reuses its address.
        kept, kept_versions, scale, shift = self._scale_shift
        if kept is None or versions != kept_versions or any(a is not b for a, b in zip(tensors, kept)):
            scale, shift = _scale_bias(*tensors, self.eps)
            self._scale_shift = (tensors, versions, scale, shift)
        return scale, shift

    def forward(self, x: Tensor) -> Tensor:
        if self.moments_loss is None and not torch.compiler.is_compiling():
            affine = self._frozen_affine()
            if affine is not None and x.numel() > 0:  # recovery's case: frozen BN, running-statistics loss
                args = (x, self.running_mean, self.running_var, *affine, self.groups)
                if _ext_backend(self.backend, x.device):  # the whole layer as one C++ autograd op
                    y, self.stat_loss = torch.ops.srel_fast._ext_fused_bn_stat_loss(*args, self.loss_weight)
                else:
                    y, self.stat_loss = _FusedLossEager.apply(*args, self.backend, self.loss_weight)
                return y
        if self.backend == "auto" and plain_ops_under_compile(x):
            y, mean, var = fused_bn_moments_decomposed(x, self.running_mean, self.running_var, self.weight,
                                                       self.bias, self.eps, self.groups)
        else:  # the kernels directly: the backend was checked once, in __init__
            y, mean, var = _fused(x, self.running_mean, self.running_var, self.weight, self.bias, self.eps,
                                     self.groups, self.backend)
        if self.moments_loss is not None:
            self.stat_loss = self.moments_loss(self, mean, var)
        else:
            self.stat_loss = bn_stat_loss_from_moments(mean, var, self.running_mean, self.running_var,
                                                       self.loss_weight)
        return y

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, loss_weight={self.loss_weight}, backend={self.backend!r}"


class FusedBNMatching:
    """Handle returned by ``fused_bn_matching``: ``loss()`` is the summed weighted
    BN statistics loss of the last forward; ``layers`` the fused modules in
    module order; ``set_groups(g)`` splits the batch into g independent batches
    (their losses summed)."""

    def __init__(self, layers: list[FusedBNStat]):
        self.layers = layers

    def set_groups(self, groups: int) -> None:
        for m in self.layers:
            m.groups = int(groups)

    def set_moments_loss(self, fn) -> None:
        """Each layer's loss becomes ``fn(layer, mean, var, layer.loss_weight)`` of the (groups, C)
        moments of its input (e.g. with ``set_groups(N)``: per-image moments); None restores the
        running-statistics loss."""
        for m in self.layers:
            m.moments_loss = None if fn is None else (lambda layer, mean, var: fn(layer, mean, var, layer.loss_weight))

    def losses(self) -> list[Tensor]:
        out = [m.stat_loss for m in self.layers if m.stat_loss is not None]
        if not out:
            raise RuntimeError("fused_bn_matching: no BatchNorm layer has run a forward yet")
        return out

    def loss(self) -> Tensor:
        # One op (and one backward node) for the sum, not a chain of one add per layer; over
        # dim 0 because a moments_loss may give each layer a vector of terms.
        return torch.stack(self.losses()).sum(0)

    def clear(self) -> None:
        for m in self.layers:
            m.stat_loss = None


_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


@contextlib.contextmanager
def fused_bn_matching(model: nn.Module, first_bn_multiplier: float = 10.0, backend: str = "auto",
                      groups: int = 1, loss_weight: float = 1.0) -> Iterator[FusedBNMatching]:
    """Swap every BatchNorm of ``model`` for a fused eval-mode BN that records
    its statistics loss (first BN in module order weighted loss_weight *
    first_bn_multiplier, the others loss_weight); restore them on exit. Each
    FusedBNStat checks ``backend`` when it is built."""
    swapped = []
    layers = []
    for name, mod in list(model.named_modules()):
        if not isinstance(mod, _BN_TYPES):
            continue
        parent = model
        *path, leaf = name.split(".") if name else [""]
        if not name:
            raise ValueError("fused_bn_matching: the model itself is a BatchNorm; wrap it in a container")
        for p in path:
            parent = getattr(parent, p)
        w = loss_weight * (first_bn_multiplier if not layers else 1.0)
        fused = FusedBNStat(mod, w, backend, groups)
        swapped.append((parent, leaf, mod))
        layers.append(fused)
    if not layers:
        raise ValueError("fused_bn_matching: the model has no BatchNorm layer")
    try:
        for (parent, leaf, _), fused in zip(swapped, layers):
            setattr(parent, leaf, fused)
        yield FusedBNMatching(layers)
    finally:
        for parent, leaf, mod in swapped:
            setattr(parent, leaf, mod)
