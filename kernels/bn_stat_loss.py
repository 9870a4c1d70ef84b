"""BatchNorm statistics matching loss (the SRe2L "BN term"), fused.

    loss = weight * ( ||var(x) - running_var||_2 + ||mean(x) - running_mean||_2 )

mean and biased variance per channel over every dim except dim 1 (N,H,W for a
4-D input; N for (N, C); N,L for (N, C, L)), accumulated in float32 whatever
the input dtype. With ``groups=G`` the batch dim is split into G equal groups
(x of shape (G*B, C, ...)) and the per-group losses are summed: several
recovery batches share one launch without changing their objectives.

The kernel-level op is ``srel_fast::bn_stat_loss_moments`` (one read of x ->
per-(group, channel) mean and variance, float32) with a registered autograd
formula whose backward is ONE elementwise pass
``srel_fast::bn_stat_loss_backward``:

    dx = (x - mu[c]) * b[c] + a[c]  (+ dy * s[c] for the fused BN, see fused_bn_stat.py)
    a = g_mu / M,  b = 2 * g_var / M

The norms are ordinary torch ops on (G, C) tensors, so the zero-norm case
gets torch's subgradient 0. Backends (op key ``bn_stat_loss``): ``torch``
(torch ops inside the same custom op), ``triton`` (bn_stat_loss_triton.py),
``cuda``/``cpu`` (csrc/bn_stat_loss.cpp, csrc/bn_stat_loss_cuda.cu, via
srel_fast.kernels._ext), ``auto``. ``bn_stat_loss_reference`` is the plain
autograd PyTorch reference used as ground truth; tests/test_bn_stat_loss.py
and bench/bench_bn_stat_loss.py test and time the op.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ._backend import check_backend, resolve_backend

OP = "bn_stat_loss"

__all__ = ["bn_stat_loss", "bn_stat_moments", "bn_stat_loss_reference", "bn_stat_loss_from_moments"]


# --------------------------------------------------------------------------
# reference
# --------------------------------------------------------------------------
def bn_stat_loss_reference(x: Tensor, running_mean: Tensor, running_var: Tensor, weight: float = 1.0,
                           groups: int = 1) -> Tensor:
    """Plain PyTorch, written the obvious way (computes in float32, or float64
    for a float64 input)."""
    dt = torch.promote_types(x.dtype, torch.float32)
    dims = [0] + list(range(2, x.dim()))
    rm, rv = running_mean.to(dt), running_var.to(dt)
    total = x.new_zeros((), dtype=dt)
    for xg in x.to(dt).chunk(groups, dim=0):
        mean = xg.mean(dims)
        var = xg.var(dims, unbiased=False)
        total = total + torch.norm(var - rv, 2) + torch.norm(mean - rm, 2)
    return weight * total


# --------------------------------------------------------------------------
# layout helpers (shared with fused_bn_stat.py)
# --------------------------------------------------------------------------
def _dims(x: Tensor, groups: int) -> tuple[int, int, int, int]:
    if x.dim() < 2:
        raise ValueError(f"bn_stat: expected an input of shape (N, C, ...), got {tuple(x.shape)}")
    n, c = x.shape[0], x.shape[1]
    if groups < 1 or n % groups:
        raise ValueError(f"bn_stat: batch {n} is not divisible into {groups} groups")
    return groups, n // groups, c, math.prod(x.shape[2:])


def _perm_last(x: Tensor) -> list[int]:
    return [0] + list(range(2, x.dim())) + [1]


def canon(x: Tensor, groups: int) -> tuple[Optional[str], Optional[Tensor]]:
    """A zero-copy canonical view of x: ``("cf", (G, B, C, L))`` for
    channel-first contiguous data, ``("cl", (G, B*L, C))`` for channel-last
    dense data (channels_last, (N, C) and (N, L, C)-transposed inputs), or
    (None, None) when x is neither."""
    g, b, c, l = _dims(x, groups)
    if l > 1 and x.is_contiguous():
        return "cf", x.view(g, b, c, l)
    xp = x.permute(_perm_last(x))
    if xp.is_contiguous():
        return "cl", xp.view(g, b * l, c)
    return None, None


def prepare(x: Tensor, groups: int) -> tuple[str, Tensor]:
    kind, xc = canon(x, groups)
    if kind is None:
        kind, xc = canon(x.contiguous(), groups)
    return kind, xc


def new_like(x: Tensor) -> Tensor:
    """Output buffer with x's memory format (used by real and fake impls alike)."""
    kind, _ = canon(x, 1)
    if kind is not None:
        return torch.empty_like(x)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def as_kind(t: Tensor, kind: str, groups: int) -> Tensor:
    """t (e.g. an incoming gradient) in the canonical layout ``kind``."""
    k, tc = canon(t, groups)
    if k == kind:
        return tc
    g, b, c, l = _dims(t, groups)
    if kind == "cf":
        return t.contiguous().view(g, b, c, l)
    return t.permute(_perm_last(t)).contiguous().view(g, b * l, c)


def _stat_dims(kind: str) -> tuple[int, ...]:
    return (1, 3) if kind == "cf" else (1,)


def _bcast(t: Tensor, kind: str) -> Tensor:
    """(G, C) or (C,) coefficient table broadcast against the canonical view."""
    if t.dim() == 1:
        t = t.unsqueeze(0)
    return t[:, None, :, None] if kind == "cf" else t[:, None, :]


# --------------------------------------------------------------------------
# backend implementations (work on canonical views)
# --------------------------------------------------------------------------
def _fwd_torch(kind, xc, shift, scale, bias, yc):
    xf = xc.float()
    dims = _stat_dims(kind)
    mean = xf.mean(dims)
    var = (xf - _bcast(mean, kind)).square().mean(dims)
    if yc is not None:
        yc.copy_(xf * _bcast(scale, kind) + _bcast(bias, kind))
    return mean, var


def _bwd_torch(kind, xc, dyc, scale, m, a, b, dxc):
    r = (xc.float() - _bcast(m, kind)) * _bcast(b, kind) + _bcast(a, kind)
    if dyc is not None:
        r = r + dyc.float() * _bcast(scale, kind)
    dxc.copy_(r)


def _ext_fwd(kind, xc, shift, scale, bias, yc):
    from . import _ext  # noqa: F401 - loaded by resolve_backend already

    empty = xc.new_empty(0, dtype=torch.float32)
    mean, var = torch.ops.srel_fast._ext_bn_stat_loss_fwd(
        xc, shift, scale if scale is not None else empty, bias if bias is not None else empty,
        yc if yc is not None else xc.new_empty(0))
    return mean, var


def _ext_bwd(kind, xc, dyc, scale, m, a, b, dxc):
    empty = xc.new_empty(0)
    torch.ops.srel_fast._ext_bn_stat_loss_bwd(
        xc, dyc if dyc is not None else empty, scale if scale is not None else empty.float(), m, a, b, dxc)


def _triton_fwd(kind, xc, shift, scale, bias, yc):
    from . import bn_stat_loss_triton

    return bn_stat_loss_triton.forward(kind, xc, scale, bias, yc)


def _triton_bwd(kind, xc, dyc, scale, m, a, b, dxc):
    from . import bn_stat_loss_triton

    bn_stat_loss_triton.backward(kind, xc, dyc, scale, m, a, b, dxc)


_FWD = {"torch": _fwd_torch, "cpu": _ext_fwd, "cuda": _ext_fwd, "triton": _triton_fwd}
_BWD = {"torch": _bwd_torch, "cpu": _ext_bwd, "cuda": _ext_bwd, "triton": _triton_bwd}


def forward_impl(x: Tensor, shift: Tensor, scale: Optional[Tensor], bias: Optional[Tensor], groups: int,
                 backend: str, want_y: bool):
    """One read of x: per-(group, channel) float32 mean and biased variance,
    and, when ``want_y``, y = x * scale[c] + bias[c] in x's dtype and format."""
    be = resolve_backend(backend, x.device, OP)
    kind, xc = prepare(x, groups)
    g, _, c, _ = _dims(x, groups)
    shift = shift.detach().float().contiguous()
    y = yc = None
    if want_y:
        y = new_like(x)
        _, yc = canon(y, groups)
        scale = scale.float().contiguous()
        bias = bias.float().contiguous()
    if xc.numel() == 0:
        nan = torch.full((g, c), float("nan"), device=x.device)
        return nan, nan.clone(), y
    mean, var = _FWD[be](kind, xc, shift, scale, bias, yc)
    return mean.reshape(g, c), var.reshape(g, c), y


def backward_impl(x: Tensor, dy: Optional[Tensor], scale: Optional[Tensor], m: Tensor, a: Tensor, b: Tensor,
                  groups: int, backend: str) -> Tensor:
    """ONE elementwise pass: dx = (x - m[g,c]) * b[g,c] + a[g,c] (+ dy * scale[c])."""
    be = resolve_backend(backend, x.device, OP)
    kind, xc = prepare(x, groups)
    dx = new_like(x)
    if x.numel() == 0:
        return dx
    _, dxc = canon(dx, groups)
    dyc = as_kind(dy, kind, groups) if dy is not None else None
    if dy is not None:
        scale = scale.float().contiguous()
    m, a, b = (t.float().contiguous() for t in (m, a, b))
    _BWD[be](kind, xc, dyc, scale, m, a, b, dxc)
    return dx


def moment_coeffs(mean: Tensor, grad_mean: Optional[Tensor], grad_var: Optional[Tensor], count: int):
    """(a, b) of the backward pass from the gradients w.r.t. mean and var."""
    gm = grad_mean.float() if grad_mean is not None else torch.zeros_like(mean)
    gv = grad_var.float() if grad_var is not None else torch.zeros_like(mean)
    return gm / count, gv * (2.0 / count)


# --------------------------------------------------------------------------
# custom ops
# --------------------------------------------------------------------------
@torch.library.custom_op("srel_fast::bn_stat_loss_moments", mutates_args=())
def _moments_op(x: Tensor, shift: Tensor, groups: int, backend: str) -> tuple[Tensor, Tensor]:
    mean, var, _ = forward_impl(x, shift, None, None, groups, backend, want_y=False)
    return mean, var


@_moments_op.register_fake
def _(x, shift, groups, backend):
    g, _, c, _ = _dims(x, groups)
    return x.new_empty((g, c), dtype=torch.float32), x.new_empty((g, c), dtype=torch.float32)


@torch.library.custom_op("srel_fast::bn_stat_loss_backward", mutates_args=())
def _backward_op(x: Tensor, dy: Optional[Tensor], scale: Optional[Tensor], m: Tensor, a: Tensor, b: Tensor,
                 groups: int, backend: str) -> Tensor:
    return backward_impl(x, dy, scale, m, a, b, groups, backend)


@_backward_op.register_fake
def _(x, dy, scale, m, a, b, groups, backend):
    return new_like(x)


def _moments_setup(ctx, inputs, output):
    x, _, groups, backend = inputs
    mean, _ = output
    ctx.save_for_backward(x, mean)
    ctx.groups, ctx.backend = groups, backend


def _moments_backward(ctx, grad_mean, grad_var):
    x, mean = ctx.saved_tensors
    g, b, _, l = _dims(x, ctx.groups)
    a, bb = moment_coeffs(mean, grad_mean, grad_var, b * l)
    dx = _backward_op(x, None, None, mean, a, bb, ctx.groups, ctx.backend)
    return dx, None, None, None


_moments_op.register_autograd(_moments_backward, setup_context=_moments_setup)


# --------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------
def bn_stat_moments(x: Tensor, shift: Optional[Tensor] = None, groups: int = 1,
                    backend: str = "auto") -> tuple[Tensor, Tensor]:
    """Per-(group, channel) mean and biased variance of x, float32, shape
    (groups, C), differentiable w.r.t. x. ``shift`` (e.g. the running mean) is
    only a numerical hint for the cpu backend."""
    check_backend(backend)
    if shift is None:
        shift = torch.zeros(x.shape[1], device=x.device, dtype=torch.float32)
    return _moments_op(x, shift, groups, backend)


def bn_stat_loss_from_moments(mean: Tensor, var: Tensor, running_mean: Tensor, running_var: Tensor,
                              weight=1.0) -> Tensor:
    """weight * sum over groups of (||var - rv|| + ||mean - rm||), float32 scalar."""
    rm = running_mean.detach().float()
    rv = running_var.detach().float()
    per_group = torch.linalg.vector_norm(var - rv, dim=-1) + torch.linalg.vector_norm(mean - rm, dim=-1)
    return weight * per_group.sum()


def bn_stat_loss(x: Tensor, running_mean: Tensor, running_var: Tensor, weight=1.0, backend: str = "auto",
                 groups: int = 1) -> Tensor:
    """weight * (||var(x) - running_var||_2 + ||mean(x) - running_mean||_2), a float32 scalar
    differentiable w.r.t. x (mean/biased var per channel over all dims but 1).

    x: (N, C), (N, C, L) or (N, C, H, W), any of float32/float16/bfloat16,
    contiguous or channels_last. ``groups=G`` splits N into G equal groups and
    sums their losses. ``backend``: auto, torch, triton, cuda, cpu."""
    mean, var = bn_stat_moments(x, running_mean, groups, backend)
    return bn_stat_loss_from_moments(mean, var, running_mean, running_var, weight)
