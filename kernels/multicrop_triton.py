"""Triton kernels of multicrop_resize (see multicrop_resize.py for the exact
definition of the sampling and of the gather backward).

Imported lazily on the first triton-backend call. triton reads
TRITON_INTERPRET when a kernel is decorated, i.e. when this module is first
imported: set TRITON_INTERPRET=1 before the first triton-backend call to run
these kernels on CPU tensors.

Forward: grid (N, output tiles of BLOCK_P pixels, channel blocks); each
program loads its image's box/flip/shift once, inverts roll and flip for its
output pixels, computes the two row and two column taps and weights once and
blends BLOCK_C channels: crop + resize + flip + roll fused in one pass, x is
read only inside the crop, the output written once.

Backward: grid (N, input tiles of BLOCK_H x BLOCK_W pixels, channel blocks);
the gather described in multicrop_resize.py: per input pixel a candidate
range of resized rows/columns, tap weights recomputed with the forward
arithmetic, the program loops over the largest candidate count of its tile.
Every grad_x element is written once (zero outside the crop), no atomics.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _taps(i, t, h, out_len, in_len):
    """Forward tap of resized index i (int tensor) along one axis: (i0, i1, lam)."""
    s = h / out_len
    lo = tl.minimum(tl.maximum(t, 0.0), in_len - 1.0)
    hi = tl.minimum(tl.maximum(t + tl.maximum(h, 1.0) - 1.0, lo), in_len - 1.0)
    b = tl.floor(t)
    u = tl.maximum(s * (i + 0.5) - 0.5, 0.0)
    r = tl.minimum(tl.maximum((t - b) + u, lo - b), hi - b)
    f = tl.floor(r)
    lam = r - f
    i0 = (b + f).to(tl.int32)
    i1 = tl.minimum(i0 + 1, tl.ceil(hi).to(tl.int32))
    return i0, i1, lam


@triton.jit
def _cand(y, t, h, out_len, in_len):
    """Candidate range [first, last] of resized indices whose taps can touch input index y."""
    s = h / out_len
    lo = tl.minimum(tl.maximum(t, 0.0), in_len - 1.0)
    hi = tl.minimum(tl.maximum(t + tl.maximum(h, 1.0) - 1.0, lo), in_len - 1.0)
    yf = y.to(s.dtype)
    a = ((yf - 1.0 - t) + 0.5) / s - 0.5
    c = ((yf + 1.0 - t) + 0.5) / s - 0.5
    a = tl.minimum(tl.maximum(a, -1.0), out_len + 1.0)
    c = tl.minimum(tl.maximum(c, -1.0), out_len + 1.0)
    first = tl.floor(a).to(tl.int32)
    last = tl.ceil(c).to(tl.int32)
    first = tl.where(y <= tl.floor(lo).to(tl.int32) + 1, 0, first)
    last = tl.where(y >= tl.floor(hi).to(tl.int32), out_len - 1, last)
    first = tl.maximum(first, 0)
    last = tl.minimum(last, out_len - 1)
    inside = (y >= tl.floor(lo).to(tl.int32)) & (y <= tl.ceil(hi).to(tl.int32))
    last = tl.where(inside, last, first - 1)
    return first, last


@triton.jit
def _load_params(boxes_ptr, flip_ptr, shift_ptr, n, Ho, Wo, HAS_FLIP: tl.constexpr, HAS_SHIFT: tl.constexpr):
    top = tl.load(boxes_ptr + n * 4 + 0)
    left = tl.load(boxes_ptr + n * 4 + 1)
    bh = tl.load(boxes_ptr + n * 4 + 2)
    bw = tl.load(boxes_ptr + n * 4 + 3)
    if HAS_SHIFT:
        sh = tl.load(shift_ptr + n * 2 + 0)
        sw = tl.load(shift_ptr + n * 2 + 1)
        # ((s % m) + m) % m is right for C (truncating) and Python (flooring) modulo alike
        sh = ((sh % Ho) + Ho) % Ho
        sw = ((sw % Wo) + Wo) % Wo
    else:
        sh = 0
        sw = 0
    if HAS_FLIP:
        fl = tl.load(flip_ptr + n)
    else:
        fl = 0
    return top, left, bh, bw, sh, sw, fl


@triton.jit
def _fwd_kernel(
    x_ptr, out_ptr, boxes_ptr, flip_ptr, shift_ptr,
    C, H, W, Ho, Wo,
    sxn, sxc, sxh, sxw,
    son, soc, soh, sow,
    HAS_FLIP: tl.constexpr, HAS_SHIFT: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    pid_p = tl.program_id(1)
    pid_c = tl.program_id(2)
    top, left, bh, bw, sh, sw, fl = _load_params(boxes_ptr, flip_ptr, shift_ptr, n, Ho, Wo, HAS_FLIP, HAS_SHIFT)

    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = p < Ho * Wo
    i = p // Wo
    j = p % Wo
    # invert roll then flip: final (i, j) shows resized (ir, jr)
    ir = i - sh
    ir = tl.where(ir < 0, ir + Ho, ir)
    jr = j - sw
    jr = tl.where(jr < 0, jr + Wo, jr)
    jr = tl.where(fl != 0, Wo - 1 - jr, jr)

    y0, y1, ly = _taps(ir, top, bh, Ho, H)
    x0, x1, lx = _taps(jr, left, bw, Wo, W)

    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    m = cmask[:, None] & pmask[None, :]
    xb = x_ptr + n * sxn + c[:, None] * sxc
    r0 = y0 * sxh
    r1 = y1 * sxh
    q0 = x0 * sxw
    q1 = x1 * sxw
    v00 = tl.load(xb + (r0 + q0)[None, :], mask=m, other=0.0).to(ly.dtype)
    v01 = tl.load(xb + (r0 + q1)[None, :], mask=m, other=0.0).to(ly.dtype)
    v10 = tl.load(xb + (r1 + q0)[None, :], mask=m, other=0.0).to(ly.dtype)
    v11 = tl.load(xb + (r1 + q1)[None, :], mask=m, other=0.0).to(ly.dtype)
    wy1 = ly[None, :]
    wy0 = 1.0 - wy1
    wx1 = lx[None, :]
    wx0 = 1.0 - wx1
    val = wy0 * (wx0 * v00 + wx1 * v01) + wy1 * (wx0 * v10 + wx1 * v11)
    ob = out_ptr + n * son + c[:, None] * soc + (i * soh + j * sow)[None, :]
    tl.store(ob, val.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _bwd_kernel(
    g_ptr, gx_ptr, boxes_ptr, flip_ptr, shift_ptr,
    C, H, W, Ho, Wo,
    sgn, sgc, sgh, sgw,
    sxn, sxc, sxh, sxw,
    HAS_FLIP: tl.constexpr, HAS_SHIFT: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
    ACC_F64: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    pid_t = tl.program_id(1)
    pid_c = tl.program_id(2)
    top, left, bh, bw, sh, sw, fl = _load_params(boxes_ptr, flip_ptr, shift_ptr, n, Ho, Wo, HAS_FLIP, HAS_SHIFT)

    tiles_w = tl.cdiv(W, BLOCK_W)
    ty = pid_t // tiles_w
    tx = pid_t % tiles_w
    off = tl.arange(0, BLOCK_H * BLOCK_W)
    y = ty * BLOCK_H + off // BLOCK_W
    x = tx * BLOCK_W + off % BLOCK_W
    pmask = (y < H) & (x < W)

    fy, ly_ = _cand(y, top, bh, Ho, H)
    fx, lx_ = _cand(x, left, bw, Wo, W)
    ny = tl.where(pmask, ly_ - fy + 1, 0)
    nx = tl.where(pmask, lx_ - fx + 1, 0)
    kh = tl.max(ny, axis=0)
    kw = tl.max(nx, axis=0)

    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    gb = g_ptr + n * sgn + c[:, None] * sgc
    if ACC_F64:
        acc = tl.zeros((BLOCK_C, BLOCK_H * BLOCK_W), dtype=tl.float64)
    else:
        acc = tl.zeros((BLOCK_C, BLOCK_H * BLOCK_W), dtype=tl.float32)
    for a in range(0, kh):
        ii = fy + a
        vi = ii <= ly_
        ii = tl.minimum(ii, Ho - 1)
        i0, i1, lam_y = _taps(ii, top, bh, Ho, H)
        wy = tl.where(i0 == y, 1.0 - lam_y, 0.0) + tl.where(i1 == y, lam_y, 0.0)
        wy = tl.where(vi, wy, 0.0)
        row = ii + sh
        row = tl.where(row >= Ho, row - Ho, row)
        for b in range(0, kw):
            jj = fx + b
            vj = jj <= lx_
            jj = tl.minimum(jj, Wo - 1)
            j0, j1, lam_x = _taps(jj, left, bw, Wo, W)
            wx = tl.where(j0 == x, 1.0 - lam_x, 0.0) + tl.where(j1 == x, lam_x, 0.0)
            wx = tl.where(vj, wx, 0.0)
            w = wy * wx
            col = tl.where(fl != 0, Wo - 1 - jj, jj) + sw
            col = tl.where(col >= Wo, col - Wo, col)
            lm = cmask[:, None] & (pmask & (w != 0.0))[None, :]
            g = tl.load(gb + (row * sgh + col * sgw)[None, :], mask=lm, other=0.0).to(acc.dtype)
            acc += w[None, :] * g
    ob = gx_ptr + n * sxn + c[:, None] * sxc + (y * sxh + x * sxw)[None, :]
    tl.store(ob, acc.to(gx_ptr.dtype.element_ty), mask=cmask[:, None] & pmask[None, :])


def _block_c(c: int) -> int:
    return min(triton.next_power_of_2(c), 4)


def forward(x: torch.Tensor, boxes: torch.Tensor, flip, shift, out: torch.Tensor) -> None:
    n, c, h, w = x.shape
    ho, wo = out.shape[2], out.shape[3]
    block_p = 256
    bc = _block_c(c)
    grid = (n, triton.cdiv(ho * wo, block_p), triton.cdiv(c, bc))
    _fwd_kernel[grid](
        x, out, boxes, flip if flip is not None else boxes, shift if shift is not None else boxes,
        c, h, w, ho, wo,
        *x.stride(), *out.stride(),
        HAS_FLIP=flip is not None, HAS_SHIFT=shift is not None,
        BLOCK_C=bc, BLOCK_P=block_p,
        num_warps=4,
    )


def backward(g: torch.Tensor, boxes: torch.Tensor, flip, shift, gx: torch.Tensor) -> None:
    n, c, h, w = gx.shape
    ho, wo = g.shape[2], g.shape[3]
    bh_, bw_ = 8, 32
    bc = _block_c(c)
    grid = (n, triton.cdiv(h, bh_) * triton.cdiv(w, bw_), triton.cdiv(c, bc))
    _bwd_kernel[grid](
        g, gx, boxes, flip if flip is not None else boxes, shift if shift is not None else boxes,
        c, h, w, ho, wo,
        *g.stride(), *gx.stride(),
        HAS_FLIP=flip is not None, HAS_SHIFT=shift is not None,
        BLOCK_C=bc, BLOCK_H=bh_, BLOCK_W=bw_,
        ACC_F64=gx.dtype == torch.float64,
        num_warps=4,
    )
