"""Multi-crop resize: per-image crop + bilinear resize + horizontal flip + roll, one op.

    out = multicrop_resize(x, boxes, (H_out, W_out), flip=flip, shift=shift)

is, for every image ``n`` with an integer box ``(top, left, height, width)``,

    r = F.interpolate(x[n:n+1, :, top:top+height, left:left+width], (H_out, W_out),
                      mode="bilinear", align_corners=False)          # no antialias
    if flip[n]:  r = r.flip(-1)
    out[n] = torch.roll(r, shifts=(shift[n, 0], shift[n, 1]), dims=(2, 3))[0]

Exact sampling definition (also for fractional boxes). Per axis (rows shown;
columns are the same with left/width/W_out/W), with input size ``H``, a box
``t = top``, ``h = height`` (floats) and resized-output row ``i`` (0-based,
before flip and roll), everything in the accumulation type (fp32, or fp64 for
float64 inputs):

    s    = h / H_out
    lo   = clamp(t, 0, H - 1)                       # first sample position
    hi   = clamp(t + max(h, 1) - 1, lo, H - 1)      # last sample position
    b    = floor(t)
    r    = clamp((t - b) + max(s * (i + 0.5) - 0.5, 0), lo - b, hi - b)
    y0   = b + floor(r);   ly = r - floor(r)
    y1   = min(y0 + 1, ceil(hi))
    row value = (1 - ly) * x[y0] + ly * x[y1]      (separably with the columns)

i.e. the crop is sampled as a continuous image whose first and last sample
positions are ``t`` and ``t + h - 1`` and whose borders clamp, exactly as
F.interpolate clamps at the borders of an integer crop (source index
``max(s (i + 0.5) - 0.5, 0)``, upper index clamped to the last row). For an
integer box inside the image this is F.interpolate's arithmetic op for op
(``t - b = 0``), so results agree to rounding; boxes reaching outside the
image are clamped to it. Only pixels ``floor(lo)..ceil(hi)`` (and the same for
columns), i.e. the crop region, are read and receive gradient.
:func:`multicrop_resize_reference` is this definition in float64 with plain
tensor ops (differentiable by autograd), the ground truth for fractional boxes.

Flip and roll: final pixel ``(i, j)`` of image ``n`` is resized pixel
``(i', j')`` with ``i' = (i - shift[n,0]) mod H_out``, ``j'' = (j - shift[n,1])
mod W_out`` and ``j' = W_out - 1 - j''`` if ``flip[n]`` else ``j''``
(torch.roll semantics: a positive shift moves content towards larger indices;
the flip is applied before the roll).

Backends (``backend=``, op key ``multicrop_resize``): ``torch`` (per-image
slicing + F.interpolate + flip + roll, written plainly in
:func:`multicrop_resize_torch`; fractional boxes fall back to the vectorised
reference formula), ``triton`` (multicrop_resize_triton.py), ``cuda``
(csrc/multicrop_resize_cuda.cu), ``cpu`` (C++/OpenMP, csrc/multicrop_resize.cpp)
and ``auto``. All accumulate in fp32 (fp64 for float64
input) and return x's dtype and memory format (NCHW or channels_last).

Backward scheme (triton, cuda, cpu): a *gather* per input pixel, not a
scatter. Every input pixel (n, c, y, x) finds the resized rows ``i`` and
columns ``j`` whose taps can touch it (a short analytic candidate range, about
2 H_out / h + 3 rows, widened to the border for clamped samples), recomputes
each candidate's tap indices and weights with exactly the forward arithmetic,
and sums ``w_y * w_x * grad_out`` over the matching taps. One kernel writes the
whole grad_x (zeros outside the crop region, so no separate memset and no
per-image crop-sized temporary), directly in x's dtype and layout, with no
atomics: deterministic, no fp32 staging buffer for fp16/bf16, and each grad_x
element is written exactly once. (A scatter with atomics would need an fp32
full-size buffer plus a cast for half types and is non-deterministic.)
The cpu backend does the same gather separably: per image it builds, for
every input row / column, the list of (output index, weight) taps that touch
it, then per input row forms one output-width row of weighted grad_out rows
and reduces it along the column lists.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ._backend import resolve_backend

__all__ = [
    "multicrop_resize",
    "multicrop_resize_torch",
    "multicrop_resize_torch_backward",
    "multicrop_resize_reference",
]

OP = "multicrop_resize"


# ----------------------------------------------------------------------------
# references
# ----------------------------------------------------------------------------
def _axis_taps(start: torch.Tensor, length: torch.Tensor, out_len: int, in_len: int):
    """Tap indices/weights of one axis for all images: (N, out_len) each.

    start, length: (N,) float tensors (their dtype is the arithmetic type)."""
    dt = start.dtype
    i = torch.arange(out_len, device=start.device, dtype=dt)
    s = (length / out_len)[:, None]
    t = start[:, None]
    lo = t.clamp(0, in_len - 1)
    hi = torch.minimum(torch.maximum(t + length.clamp_min(1)[:, None] - 1, lo), lo.new_full((), in_len - 1))
    b = torch.floor(t)
    r = (t - b) + (s * (i + 0.5) - 0.5).clamp_min(0)
    r = torch.minimum(torch.maximum(r, lo - b), hi - b)
    f = torch.floor(r)
    lam = r - f
    i0 = (b + f).long()
    i1 = torch.minimum(i0 + 1, torch.ceil(hi).long())
    return i0, i1, lam


def _final_index(n: int, out_h: int, out_w: int, flip, shift, device):
    """For every final pixel the resized pixel it shows: (N, H_out, 1), (N, 1, W_out)."""
    i = torch.arange(out_h, device=device)[None, :]
    j = torch.arange(out_w, device=device)[None, :]
    if shift is not None:
        shift = shift.to(device=device, dtype=torch.long)
        i = torch.remainder(i - shift[:, :1], out_h)
        j = torch.remainder(j - shift[:, 1:2], out_w)
    else:
        i = i.expand(n, out_h)
        j = j.expand(n, out_w)
    if flip is not None:
        j = torch.where(flip.to(device=device, dtype=torch.bool)[:, None], out_w - 1 - j, j)
    return i[:, :, None], j[:, None, :]


def _sample(x: torch.Tensor, boxes: torch.Tensor, out_size, flip, shift, dtype) -> torch.Tensor:
    n, c, h_in, w_in = x.shape
    out_h, out_w = out_size
    bx = boxes.to(device=x.device, dtype=dtype)
    y0, y1, ly = _axis_taps(bx[:, 0], bx[:, 2], out_h, h_in)
    x0, x1, lx = _axis_taps(bx[:, 1], bx[:, 3], out_w, w_in)
    fi, fj = _final_index(n, out_h, out_w, flip, shift, x.device)
    # gather per final pixel
    y0, y1, ly = (torch.gather(a, 1, fi[:, :, 0])[:, :, None] for a in (y0, y1, ly))
    x0, x1, lx = (torch.gather(a, 1, fj[:, 0, :])[:, None, :] for a in (x0, x1, lx))
    xx = x.to(dtype)
    nn_ = torch.arange(n, device=x.device)[:, None, None]

    def at(yy, xi):  # (N, H_out, W_out, C)
        return xx.permute(0, 2, 3, 1)[nn_, yy, xi]

    ly = ly[..., None]
    lx = lx[..., None]
    v = (1 - ly) * ((1 - lx) * at(y0, x0) + lx * at(y0, x1)) + ly * ((1 - lx) * at(y1, x0) + lx * at(y1, x1))
    return v.permute(0, 3, 1, 2)


def multicrop_resize_reference(x, boxes, out_size, flip=None, shift=None) -> torch.Tensor:
    """The exact definition (module docstring) in float64 with plain tensor ops.

    Works for fractional boxes, is differentiable w.r.t. x by autograd and
    returns float64 (NCHW)."""
    return _sample(x, boxes, tuple(out_size), flip, shift, torch.float64).contiguous()


def _is_integer_boxes(boxes: torch.Tensor) -> bool:
    return bool(torch.equal(boxes, torch.round(boxes)))


def multicrop_resize_torch(x, boxes, out_size, flip=None, shift=None) -> torch.Tensor:
    """Plain-PyTorch reference: per image slice + F.interpolate + flip + roll.

    Integer boxes only go this way (F.interpolate cannot sample a fractional
    crop); fractional boxes use the vectorised reference formula in fp32
    (fp64 for float64 input). Returns x's dtype and memory format."""
    out_h, out_w = int(out_size[0]), int(out_size[1])
    fmt = _memory_format(x)
    if not _is_integer_boxes(boxes):
        dt = torch.float64 if x.dtype == torch.float64 else torch.float32
        y = _sample(x, boxes, (out_h, out_w), flip, shift, dt).to(x.dtype)
        return y.contiguous(memory_format=fmt)
    b = boxes.round().long().tolist()
    fl = flip.tolist() if flip is not None else [False] * x.shape[0]
    sh = shift.long().tolist() if shift is not None else [(0, 0)] * x.shape[0]
    outs = []
    for n, (top, left, hh, ww) in enumerate(b):
        crop = x[n : n + 1, :, top : top + hh, left : left + ww]
        r = F.interpolate(crop, size=(out_h, out_w), mode="bilinear", align_corners=False, antialias=False)
        if fl[n]:
            r = r.flip(-1)
        r = torch.roll(r, shifts=(int(sh[n][0]), int(sh[n][1])), dims=(2, 3))
        outs.append(r)
    return torch.cat(outs, 0).contiguous(memory_format=fmt)


def _sample_backward(grad, boxes, in_size, flip, shift, dtype) -> torch.Tensor:
    """Adjoint of :func:`_sample` (scatter-add of the four weighted taps)."""
    n, c, out_h, out_w = grad.shape
    h_in, w_in = in_size
    bx = boxes.to(device=grad.device, dtype=dtype)
    y0, y1, ly = _axis_taps(bx[:, 0], bx[:, 2], out_h, h_in)
    x0, x1, lx = _axis_taps(bx[:, 1], bx[:, 3], out_w, w_in)
    fi, fj = _final_index(n, out_h, out_w, flip, shift, grad.device)
    y0, y1, ly = (torch.gather(a, 1, fi[:, :, 0])[:, :, None] for a in (y0, y1, ly))
    x0, x1, lx = (torch.gather(a, 1, fj[:, 0, :])[:, None, :] for a in (x0, x1, lx))
    g = grad.to(dtype).permute(0, 2, 3, 1)  # (N, H_out, W_out, C)
    gx = torch.zeros((n, h_in, w_in, c), dtype=dtype, device=grad.device)
    nn_ = torch.arange(n, device=grad.device)[:, None, None].expand(n, out_h, out_w)
    ly = ly[..., None]
    lx = lx[..., None]
    for yy, xi, w in (
        (y0, x0, (1 - ly) * (1 - lx)),
        (y0, x1, (1 - ly) * lx),
        (y1, x0, ly * (1 - lx)),
        (y1, x1, ly * lx),
    ):
        gx.index_put_((nn_, yy.expand(n, out_h, out_w), xi.expand(n, out_h, out_w)), w * g, accumulate=True)
    return gx.permute(0, 3, 1, 2)


def multicrop_resize_torch_backward(grad, boxes, in_size, flip=None, shift=None) -> torch.Tensor:
    """Plain-PyTorch gradient of :func:`multicrop_resize_torch` w.r.t. x: per
    image un-roll, un-flip and aten.upsample_bilinear2d_backward into the crop
    of a zero grad_x (fractional boxes: scatter-add of the reference taps)."""
    n, c, out_h, out_w = grad.shape
    h_in, w_in = int(in_size[0]), int(in_size[1])
    if not _is_integer_boxes(boxes):
        dt = torch.float64 if grad.dtype == torch.float64 else torch.float32
        return _sample_backward(grad, boxes, (h_in, w_in), flip, shift, dt).to(grad.dtype)
    b = boxes.round().long().tolist()
    fl = flip.tolist() if flip is not None else [False] * n
    sh = shift.long().tolist() if shift is not None else [(0, 0)] * n
    gx = grad.new_zeros((n, c, h_in, w_in))
    for i, (top, left, hh, ww) in enumerate(b):
        g = torch.roll(grad[i : i + 1], shifts=(-int(sh[i][0]), -int(sh[i][1])), dims=(2, 3))
        if fl[i]:
            g = g.flip(-1)
        gc = torch.ops.aten.upsample_bilinear2d_backward(g, [out_h, out_w], [1, c, hh, ww], False, None, None)
        gx[i : i + 1, :, top : top + hh, left : left + ww] += gc
    return gx


# ----------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------
def _memory_format(x: torch.Tensor) -> torch.memory_format:
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _prep_small(boxes, flip, shift, device, dtype):
    boxes = boxes.to(device=device, dtype=_acc_dtype(dtype)).contiguous()
    flip = None if flip is None else flip.to(device=device, dtype=torch.int32).contiguous()
    shift = None if shift is None else shift.to(device=device, dtype=torch.int32).contiguous()
    return boxes, flip, shift


def _check(x: torch.Tensor, boxes: torch.Tensor, out_size, flip, shift):
    if x.dim() != 4:
        raise ValueError(f"multicrop_resize: x must be (N, C, H, W), got shape {tuple(x.shape)}")
    n = x.shape[0]
    if boxes.shape != (n, 4):
        raise ValueError(f"multicrop_resize: boxes must be (N, 4) = ({n}, 4), got {tuple(boxes.shape)}")
    if not boxes.is_floating_point():
        raise ValueError("multicrop_resize: boxes must be a floating-point tensor of (top, left, height, width)")
    if len(out_size) != 2 or int(out_size[0]) < 1 or int(out_size[1]) < 1:
        raise ValueError(f"multicrop_resize: out_size must be two positive ints, got {out_size}")
    if flip is not None and flip.shape != (n,):
        raise ValueError(f"multicrop_resize: flip must be (N,) = ({n},), got {tuple(flip.shape)}")
    if shift is not None and shift.shape != (n, 2):
        raise ValueError(f"multicrop_resize: shift must be (N, 2) = ({n}, 2), got {tuple(shift.shape)}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise ValueError(f"multicrop_resize: unsupported dtype {x.dtype}")


# ----------------------------------------------------------------------------
# backend implementations (forward / backward), called inside the custom ops
# ----------------------------------------------------------------------------
def _fwd_impl(x, boxes, out_h, out_w, flip, shift, backend):
    be = resolve_backend(backend, x.device, OP)
    if be == "torch":
        return multicrop_resize_torch(x, boxes, (out_h, out_w), flip, shift)
    fmt = _memory_format(x)
    n, c = x.shape[:2]
    out = torch.empty((n, c, out_h, out_w), dtype=x.dtype, device=x.device, memory_format=fmt)
    if n == 0 or c == 0:
        return out
    b, f, s = _prep_small(boxes, flip, shift, x.device, x.dtype)
    if be == "triton":
        from . import multicrop_resize_triton

        multicrop_resize_triton.forward(x, b, f, s, out)
    else:  # cpu / cuda: the C++ extension
        torch.ops.srel_fast._ext_multicrop_resize_fwd(x, b, f, s, out)
    return out


def _bwd_impl(grad, boxes, in_h, in_w, flip, shift, channels_last, backend):
    be = resolve_backend(backend, grad.device, OP)
    n, c, out_h, out_w = grad.shape
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    if be == "torch":
        return multicrop_resize_torch_backward(grad, boxes, (in_h, in_w), flip, shift).contiguous(memory_format=fmt)
    gx = torch.empty((n, c, in_h, in_w), dtype=grad.dtype, device=grad.device, memory_format=fmt)
    if n == 0 or c == 0:
        return gx
    b, f, s = _prep_small(boxes, flip, shift, grad.device, grad.dtype)
    if be == "triton":
        from . import multicrop_resize_triton

        multicrop_resize_triton.backward(grad, b, f, s, gx)
    else:
        torch.ops.srel_fast._ext_multicrop_resize_bwd(grad, b, f, s, gx)
    return gx


# ----------------------------------------------------------------------------
# torch.library custom ops
# ----------------------------------------------------------------------------
@torch.library.custom_op("srel_fast::multicrop_resize", mutates_args=())
def _multicrop_resize_op(
    x: torch.Tensor,
    boxes: torch.Tensor,
    out_h: int,
    out_w: int,
    flip: Optional[torch.Tensor],
    shift: Optional[torch.Tensor],
    backend: str,
) -> torch.Tensor:
    return _fwd_impl(x, boxes, out_h, out_w, flip, shift, backend)


@_multicrop_resize_op.register_fake
def _(x, boxes, out_h, out_w, flip, shift, backend):
    n, c = x.shape[:2]
    return torch.empty((n, c, out_h, out_w), dtype=x.dtype, device=x.device, memory_format=_memory_format(x))


@torch.library.custom_op("srel_fast::multicrop_resize_backward", mutates_args=())
def _multicrop_resize_backward_op(
    grad: torch.Tensor,
    boxes: torch.Tensor,
    in_h: int,
    in_w: int,
    flip: Optional[torch.Tensor],
    shift: Optional[torch.Tensor],
    channels_last: bool,
    backend: str,
) -> torch.Tensor:
    return _bwd_impl(grad, boxes, in_h, in_w, flip, shift, channels_last, backend)


@_multicrop_resize_backward_op.register_fake
def _(grad, boxes, in_h, in_w, flip, shift, channels_last, backend):
    n, c = grad.shape[:2]
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty((n, c, in_h, in_w), dtype=grad.dtype, device=grad.device, memory_format=fmt)


def _setup_context(ctx, inputs, output):
    x, boxes, out_h, out_w, flip, shift, backend = inputs
    ctx.save_for_backward(boxes, flip, shift)
    ctx.in_hw = (x.shape[2], x.shape[3])
    ctx.channels_last = _memory_format(x) == torch.channels_last
    ctx.x_dtype = x.dtype
    ctx.backend = backend


def _backward(ctx, grad):
    boxes, flip, shift = ctx.saved_tensors
    gx = None
    if ctx.needs_input_grad[0]:
        gx = _multicrop_resize_backward_op(
            grad.to(ctx.x_dtype), boxes, ctx.in_hw[0], ctx.in_hw[1], flip, shift, ctx.channels_last, ctx.backend
        )
    return gx, None, None, None, None, None, None


_multicrop_resize_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------
# public entry point
# ----------------------------------------------------------------------------
def multicrop_resize(
    x: torch.Tensor,
    boxes: torch.Tensor,
    out_size: Sequence[int],
    flip: Optional[torch.Tensor] = None,
    shift: Optional[torch.Tensor] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Crop ``boxes[n]`` of every image ``x[n]``, resize it bilinearly to
    ``out_size``, flip it horizontally where ``flip[n]`` and roll it by
    ``shift[n]``; one fused kernel each way.

    Args:
        x: (N, C, H, W) float32/float16/bfloat16 (float64 too), NCHW or
            channels_last; differentiable.
        boxes: (N, 4) float tensor of (top, left, height, width) in input
            pixels, integer-valued (RandomResizedCrop) or fractional; see the
            module docstring for the exact sampling definition.
        out_size: (H_out, W_out).
        flip: optional (N,) bool, horizontal flip of the output.
        shift: optional (N, 2) integer roll of the output along (H, W),
            torch.roll semantics, applied after the flip.
        backend: "auto", "torch", "triton", "cuda" or "cpu".

    Returns (N, C, H_out, W_out) in x's dtype and memory format. Bilinear,
    align_corners=False, no antialias; equals per-image F.interpolate of the
    crop followed by flip and roll for integer boxes. Only the crop region of
    x receives gradient.
    """
    _check(x, boxes, out_size, flip, shift)
    return _multicrop_resize_op(x, boxes, int(out_size[0]), int(out_size[1]), flip, shift, backend)
