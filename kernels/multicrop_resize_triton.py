"""Triton kernels of multicrop_resize (see multicrop_resize.py for the exact
definition of the sampling and of the gather backward).

Imported lazily on the first triton-backend call. triton reads
TRITON_INTERPRET when a kernel is decorated, i.e. when this module is first
imported: set TRITON_INTERPRET=1 before the first triton-backend call to run
these kernels on CPU tensors.

Arithmetic. The scale s = h / H_out is the only division; it is computed with
round-to-nearest division (``tl.math.div_rn`` for fp32; fp64 ``/`` already is
``div.rn.f64``). Compiled Triton lowers an fp32 ``/`` to the approximate
``div.full.f32`` (up to 2 ulp), which the interpreter (numpy) does not show.

Grids. Every launch is 1-D: (image, channel group, tile) flattened onto grid
axis 0 (limit 2^31 - 1; axes 1 and 2 are limited to 65535), see
:func:`launch_grid`.

Channels. A program handles NC = min(C, 4) channels with NC separate
accumulators that share all index and weight arithmetic: no lane is spent on
a padded channel (C = 3 runs as NC = 3, not as a 4-wide block).

Forward (one kernel): a program owns a BY x BX tile of final output pixels
and NC channels; it inverts roll and flip and computes the row taps once per
row and the column taps once per column of the tile (not per pixel), then
blends four loads per pixel and channel. The loads need no mask (taps are
clamped into the image), only the stores.

Backward (two kernels):

1. ``_tables_kernel``, one program per (image, axis), writes per-image 1-D
   tap tables (a few KB in all): for every resized index i the forward tap
   i0, lam and the offset of the grad_out row/column that shows i (roll and
   flip folded in, times the grad stride); then, from those stored taps, for
   every input index y the contiguous range [first, first + count) of
   resized indices whose taps touch y (two binary searches: the taps are
   non-decreasing in i). A tap with lam == 0 is taken as i0 alone, so the
   second tap is i1 = i0 + (lam != 0) and the gather weight of input index y
   is (y == i0 ? 1 - lam : lam); an exact 1:1 axis then has one candidate per
   input index instead of two.
2. ``_bwd_kernel``: a gather. A program owns a BY x BX tile of the crop
   region (tiles are placed relative to the crop, so a small crop does not
   leave most lanes idle; tiles past the crop exit early) and NC channels:
   grad_x[y, x] = sum_{i in rows(y)} sum_{j in cols(x)} wy(i, y) wx(j, x) g[row(i), col(j)],
   the two sums bounded by the tables (about 2 / s_y and 2 / s_x terms). The
   column tap of the outer loop is per lane, the row tap of the inner loop is
   per tile row, and one inner iteration serves BX/32 columns x NC channels
   per thread: about 5 instructions per tap (load, address, zero-fill of the
   masked load, convert, FMA) plus the row weight shared by those taps. The
   same program writes the zeros of its full-image tile outside the crop, so
   grad_x is written exactly once, without atomics and without a memset,
   directly in x's dtype and layout.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_GRID0 = 2**31 - 1  # CUDA grid axis 0 (axes 1 and 2: 65535)
INT32_MAX = 2**31 - 1

# launch configuration (see the module docstring and launch_grid)
FWD_BY, FWD_BX, FWD_WARPS = 4, 64, 1
BWD_BY, BWD_BX, BWD_WARPS = 4, 64, 1
TAB_BLOCK, TAB_WARPS = 256, 4


# ----------------------------------------------------------------------------
# shared device helpers
# ----------------------------------------------------------------------------
@triton.jit
def _div(a, b):
    """a / b rounded to nearest (compiled fp32 '/' is the approximate div.full.f32)."""
    if a.dtype == tl.float64:
        return a / b  # fp64 '/' is div.rn.f64
    else:
        return tl.math.div_rn(a, b)


@triton.jit
def _axis_consts(t, h, out_len, in_len):
    """Per-image constants of one axis: scale s, first/last sample position lo/hi, b = floor(t)."""
    s = _div(h, out_len * 1.0)  # out_len may be a specialised constexpr 1
    lo = tl.minimum(tl.maximum(t, 0.0), in_len - 1.0)
    hi = tl.minimum(tl.maximum(t + tl.maximum(h, 1.0) - 1.0, lo), in_len - 1.0)
    b = tl.floor(t)
    return s, lo, hi, b


@triton.jit
def _taps(i, t, s, lo, hi, b):
    """Forward taps of resized indices i (int tensor) along one axis: (i0, i1, lam)."""
    u = tl.maximum(s * (i + 0.5) - 0.5, 0.0)
    r = tl.minimum(tl.maximum((t - b) + u, lo - b), hi - b)
    f = tl.floor(r)
    lam = r - f
    i0 = (b + f).to(tl.int32)
    i1 = tl.minimum(i0 + 1, tl.ceil(hi).to(tl.int32))
    return i0, i1, lam


@triton.jit
def _crop_range(t, h, in_len):
    """Inclusive range [first, last] of input indices the taps of this axis can read."""
    lo = tl.minimum(tl.maximum(t, 0.0), in_len - 1.0)
    hi = tl.minimum(tl.maximum(t + tl.maximum(h, 1.0) - 1.0, lo), in_len - 1.0)
    return tl.floor(lo).to(tl.int32), tl.ceil(hi).to(tl.int32)


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


# ----------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------
@triton.jit
def _fwd_kernel(
    x_ptr, out_ptr, boxes_ptr, flip_ptr, shift_ptr,
    C, H, W, Ho, Wo, tiles_y, tiles_x, c_groups,
    sxn, sxc, sxh, sxw,
    son, soc, soh, sow,
    HAS_FLIP: tl.constexpr, HAS_SHIFT: tl.constexpr,
    NC: tl.constexpr, BY: tl.constexpr, BX: tl.constexpr,
):
    # grid axis 0 = (image, channel group, row tile, column tile) of the final output,
    # column tiles fastest. Row taps are computed per row and column taps per column
    # of the tile, then shared by the BY x BX pixels and the NC channels.
    pid = tl.program_id(0)
    q = pid % tiles_x
    rest = pid // tiles_x
    p = rest % tiles_y
    rest = rest // tiles_y
    cg = rest % c_groups
    n = (rest // c_groups).to(tl.int64)
    top, left, bh, bw, sh, sw, fl = _load_params(boxes_ptr, flip_ptr, shift_ptr, n, Ho, Wo, HAS_FLIP, HAS_SHIFT)
    sy, loy, hiy, by = _axis_consts(top, bh, Ho, H)
    sx, lox, hix, bx = _axis_consts(left, bw, Wo, W)

    i = p * BY + tl.arange(0, BY)  # final output rows / columns
    j = q * BX + tl.arange(0, BX)
    im = i < Ho
    jm = j < Wo
    # invert roll then flip: final (i, j) shows resized (ir, jr)
    ir = i - sh
    ir = tl.where(ir < 0, ir + Ho, ir)
    jr = j - sw
    jr = tl.where(jr < 0, jr + Wo, jr)
    jr = tl.where(fl != 0, Wo - 1 - jr, jr)
    y0, y1, ly = _taps(ir, top, sy, loy, hiy, by)
    x0, x1, lx = _taps(jr, left, sx, lox, hix, bx)
    wy1 = ly[:, None]
    wy0 = 1.0 - wy1
    wx1 = lx[None, :]
    wx0 = 1.0 - wx1
    r0 = (y0 * sxh)[:, None]
    r1 = (y1 * sxh)[:, None]
    q0 = (x0 * sxw)[None, :]
    q1 = (x1 * sxw)[None, :]
    o00 = r0 + q0
    o01 = r0 + q1
    o10 = r1 + q0
    o11 = r1 + q1
    oo = (i * soh)[:, None] + (j * sow)[None, :]
    pm = im[:, None] & jm[None, :]

    c0 = cg * NC
    xb = x_ptr + n * sxn
    ob = out_ptr + n * son + c0 * soc
    # the NC channels share every index and weight above. The loads need no mask: taps are
    # clamped into the image for every (even out-of-range) i, j, and channel c0 + ci is
    # clamped to C - 1; only the stores are masked.
    for ci in tl.static_range(NC):
        xc = xb + tl.minimum(c0 + ci, C - 1) * sxc
        v00 = tl.load(xc + o00).to(ly.dtype)
        v01 = tl.load(xc + o01).to(ly.dtype)
        v10 = tl.load(xc + o10).to(ly.dtype)
        v11 = tl.load(xc + o11).to(ly.dtype)
        val = wy0 * (wx0 * v00 + wx1 * v01) + wy1 * (wx0 * v10 + wx1 * v11)
        tl.store(ob + ci * soc + oo, val.to(out_ptr.dtype.element_ty), mask=pm & (c0 + ci < C))


# ----------------------------------------------------------------------------
# backward 1: per-image 1-D tap tables
# ----------------------------------------------------------------------------
# tap: int32 (2 axes, N, M, 2) = (i0, grad_out offset) per resized index;
# rng: int32 (2 axes, N, M, 2) = (first, count) per input index;
# lam: (2 axes, N, M) in the arithmetic type. Pairs make one 8-byte load.


@triton.jit
def _tables_kernel(
    boxes_ptr, flip_ptr, shift_ptr, tap_ptr, rng_ptr, lam_ptr,
    N, H, W, Ho, Wo, M, sgh, sgw, steps_h, steps_w,
    HAS_FLIP: tl.constexpr, HAS_SHIFT: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    n = pid // 2
    ax = pid % 2  # 0: rows, 1: columns
    top, left, bh, bw, sh, sw, fl = _load_params(boxes_ptr, flip_ptr, shift_ptr, n, Ho, Wo, HAS_FLIP, HAS_SHIFT)
    rows = ax == 0
    t = tl.where(rows, top, left)
    h = tl.where(rows, bh, bw)
    out_len = tl.where(rows, Ho, Wo)
    in_len = tl.where(rows, H, W)
    roll = tl.where(rows, sh, sw)
    flip = tl.where(rows, 0, fl)
    gstride = tl.where(rows, sgh, sgw)
    steps = tl.where(rows, steps_h, steps_w)
    s, lo, hi, b = _axis_consts(t, h, out_len, in_len)

    base = (ax * N + n) * M
    tap = tap_ptr + 2 * base
    rng = rng_ptr + 2 * base
    lam_t = lam_ptr + base
    # (a) forward taps of every resized index i and the grad_out offset that shows it.
    #     With lam == 0 the tap is i0 alone: i1 = i0 + (lam != 0) is then non-decreasing
    #     in i, and the gather weight of input index y is (y == i0 ? 1 - lam : lam).
    for i_start in range(0, out_len, BLOCK):
        i = i_start + tl.arange(0, BLOCK)
        m = i < out_len
        i0, i1, lam = _taps(i, t, s, lo, hi, b)
        fin = tl.where(flip != 0, out_len - 1 - i, i) + roll
        fin = tl.where(fin >= out_len, fin - out_len, fin)
        tl.store(tap + 2 * i, i0, mask=m)
        tl.store(tap + 2 * i + 1, fin * gstride, mask=m)
        tl.store(lam_t + i, lam, mask=m)
    # the searches below read what other threads of this program stored above
    tl.debug_barrier()
    # (b) per input index y: the resized indices whose taps touch y are
    #     {i : i1[i] >= y} and {i : i0[i] <= y}, both ranges since i0, i1 are monotone
    for y_start in range(0, in_len, BLOCK):
        y = y_start + tl.arange(0, BLOCK)
        ym = y < in_len
        lo_a = tl.zeros([BLOCK], tl.int32)  # first i with i1[i] >= y
        hi_a = tl.zeros([BLOCK], tl.int32) + out_len
        lo_b = tl.zeros([BLOCK], tl.int32)  # first i with i0[i] > y
        hi_b = tl.zeros([BLOCK], tl.int32) + out_len
        for _ in range(steps):
            act_a = lo_a < hi_a
            mid_a = (lo_a + hi_a) // 2
            i0a = tl.load(tap + 2 * mid_a, mask=ym & act_a, other=0)
            la = tl.load(lam_t + mid_a, mask=ym & act_a, other=0.0)
            ga = i0a + (la != 0.0).to(tl.int32) >= y
            hi_a = tl.where(act_a & ga, mid_a, hi_a)
            lo_a = tl.where(act_a & ~ga, mid_a + 1, lo_a)
            act_b = lo_b < hi_b
            mid_b = (lo_b + hi_b) // 2
            gb = tl.load(tap + 2 * mid_b, mask=ym & act_b, other=0) > y
            hi_b = tl.where(act_b & gb, mid_b, hi_b)
            lo_b = tl.where(act_b & ~gb, mid_b + 1, lo_b)
        tl.store(rng + 2 * y, lo_a, mask=ym)
        tl.store(rng + 2 * y + 1, tl.maximum(lo_b - lo_a, 0), mask=ym)


# ----------------------------------------------------------------------------
# backward 2: the gather
# ----------------------------------------------------------------------------
@triton.jit
def _load_pair(ptr, idx, mask, other):
    """(ptr[2 idx], ptr[2 idx + 1]) as one 8-byte load per element."""
    v = tl.load(ptr + (2 * idx)[:, None] + tl.arange(0, 2)[None, :], mask=mask[:, None], other=other)
    return tl.split(v)


@triton.jit
def _bwd_kernel(
    g_ptr, gx_ptr, boxes_ptr, tap_ptr, rng_ptr, lam_ptr,
    C, H, W, N, M, tiles_y, tiles_x, c_groups,
    sgn, sgc,
    sxn, sxc, sxh, sxw,
    NC: tl.constexpr, BY: tl.constexpr, BX: tl.constexpr,
):
    # grid axis 0 = (image, channel group, row tile, column tile), column tiles fastest
    pid = tl.program_id(0)
    q = pid % tiles_x
    rest = pid // tiles_x
    p = rest % tiles_y
    rest = rest // tiles_y
    cg = rest % c_groups
    n = rest // c_groups
    n64 = n.to(tl.int64)
    top = tl.load(boxes_ptr + n64 * 4 + 0)
    left = tl.load(boxes_ptr + n64 * 4 + 1)
    bh = tl.load(boxes_ptr + n64 * 4 + 2)
    bw = tl.load(boxes_ptr + n64 * 4 + 3)
    ys, ye = _crop_range(top, bh, H)
    xs, xe = _crop_range(left, bw, W)
    c0 = cg * NC
    gxb = gx_ptr + n64 * sxn + c0 * sxc
    ar_y = tl.arange(0, BY)
    ar_x = tl.arange(0, BX)

    # (1) zeros: the part of full-image tile (p, q) outside the crop region
    yz = p * BY + ar_y
    xz = q * BX + ar_x
    in_y = (yz >= ys) & (yz <= ye)
    in_x = (xz >= xs) & (xz <= xe)
    zm = (yz < H)[:, None] & (xz < W)[None, :] & ~(in_y[:, None] & in_x[None, :])
    zoff = yz[:, None] * sxh + xz[None, :] * sxw
    zero = tl.zeros([BY, BX], gx_ptr.dtype.element_ty)
    for ci in tl.static_range(NC):
        tl.store(gxb + ci * sxc + zoff, zero, mask=zm & (c0 + ci < C))

    # (2) the gather on crop-relative tile (p, q): rows ys + p*BY.., columns xs + q*BX..
    # (tiles past the crop's extent, about a third at RandomResizedCrop scales, stop here)
    if (p * BY <= ye - ys) & (q * BX <= xe - xs):
        y = ys + p * BY + ar_y
        x = xs + q * BX + ar_x
        ym = y <= ye  # ye <= H - 1
        xm = x <= xe
        tap_r = tap_ptr + 2 * n * M        # row tables of image n
        tap_c = tap_ptr + 2 * (N + n) * M  # column tables
        lam_r = lam_ptr + n * M
        lam_c = lam_ptr + (N + n) * M
        fi, ky = _load_pair(rng_ptr + 2 * n * M, y, ym, 0)
        fj, kx = _load_pair(rng_ptr + 2 * (N + n) * M, x, xm, 0)
        ky_max = tl.max(ky, axis=0)
        kx_max = tl.max(kx, axis=0)

        acc_t = lam_ptr.dtype.element_ty
        acc0 = tl.zeros([BY, BX], acc_t)
        acc1 = tl.zeros([BY, BX], acc_t)
        acc2 = tl.zeros([BY, BX], acc_t)
        acc3 = tl.zeros([BY, BX], acc_t)
        # channel ci reads channel min(c0 + ci, C - 1): always valid memory, never stored if >= C
        gb0 = g_ptr + n64 * sgn + c0 * sgc
        gb1 = gb0 + tl.minimum(1, C - 1 - c0) * sgc
        gb2 = gb0 + tl.minimum(2, C - 1 - c0) * sgc
        gb3 = gb0 + tl.minimum(3, C - 1 - c0) * sgc
        for k in range(0, kx_max):
            # column tap k of every lane; a masked tap has x0 = -1 and lam = 0: weight 0
            vx = k < kx
            j = fj + k
            x0, cj = _load_pair(tap_c, j, vx, -1)
            lx = tl.load(lam_c + j, mask=vx, other=0.0)
            wx = tl.where(x0 == x, 1.0 - lx, lx)
            # i and the remaining count are carried (not fi + a): keeps the index math 32-bit
            i = fi
            rem = ky
            for _ in range(0, ky_max):
                vy = rem > 0
                y0, ro = _load_pair(tap_r, i, vy, -1)
                ly = tl.load(lam_r + i, mask=vy, other=0.0)
                wy = tl.where(y0 == y, 1.0 - ly, ly)
                w = wy[:, None] * wx[None, :]
                m = vy[:, None] & vx[None, :]
                off = ro[:, None] + cj[None, :]
                acc0 += w * tl.load(gb0 + off, mask=m, other=0.0).to(acc_t)
                if NC > 1:
                    acc1 += w * tl.load(gb1 + off, mask=m, other=0.0).to(acc_t)
                if NC > 2:
                    acc2 += w * tl.load(gb2 + off, mask=m, other=0.0).to(acc_t)
                if NC > 3:
                    acc3 += w * tl.load(gb3 + off, mask=m, other=0.0).to(acc_t)
                i += 1
                rem -= 1
        om = ym[:, None] & xm[None, :]
        oo = y[:, None] * sxh + x[None, :] * sxw
        out_t = gx_ptr.dtype.element_ty
        tl.store(gxb + oo, acc0.to(out_t), mask=om)
        if NC > 1:
            tl.store(gxb + sxc + oo, acc1.to(out_t), mask=om & (c0 + 1 < C))
        if NC > 2:
            tl.store(gxb + 2 * sxc + oo, acc2.to(out_t), mask=om & (c0 + 2 < C))
        if NC > 3:
            tl.store(gxb + 3 * sxc + oo, acc3.to(out_t), mask=om & (c0 + 3 < C))


# ----------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------
def channels_per_program(c: int) -> int:
    return max(1, min(c, 4))


def launch_grid(kind: str, n: int, c: int, h: int, w: int, ho: int, wo: int) -> tuple:
    """The 1-D launch grid of the forward ("fwd") or the gather ("bwd") kernel.

    (image, channel group, tile) is flattened onto axis 0, whose limit is
    2^31 - 1 (a grid axis 1 or 2 would be limited to 65535 tiles)."""
    cg = triton.cdiv(c, channels_per_program(c))
    if kind == "fwd":
        programs = n * cg * triton.cdiv(ho, FWD_BY) * triton.cdiv(wo, FWD_BX)
    elif kind == "bwd":
        programs = n * cg * triton.cdiv(h, BWD_BY) * triton.cdiv(w, BWD_BX)
    else:
        raise ValueError(kind)
    if programs > MAX_GRID0:
        raise ValueError(f"multicrop_resize: {programs} programs exceed the CUDA grid limit {MAX_GRID0}; "
                         "split the batch")
    return (programs,)


def _check_int32_offsets(t: torch.Tensor, what: str) -> None:
    # per-image offsets are 32-bit (the image index is 64-bit): one image must span < 2^31 elements
    span = sum((s - 1) * abs(st) for s, st in zip(t.shape[1:], t.stride()[1:]))
    if span > INT32_MAX or t.shape[2] * t.shape[3] > INT32_MAX:
        raise ValueError(f"multicrop_resize: one image of {what} spans more than 2^31 elements")


def forward(x: torch.Tensor, boxes: torch.Tensor, flip, shift, out: torch.Tensor) -> None:
    n, c, h, w = x.shape
    ho, wo = out.shape[2], out.shape[3]
    _check_int32_offsets(x, "x")
    _check_int32_offsets(out, "the output")
    nc = channels_per_program(c)
    _fwd_kernel[launch_grid("fwd", n, c, h, w, ho, wo)](
        x, out, boxes, flip if flip is not None else boxes, shift if shift is not None else boxes,
        c, h, w, ho, wo, triton.cdiv(ho, FWD_BY), triton.cdiv(wo, FWD_BX), triton.cdiv(c, nc),
        *x.stride(), *out.stride(),
        HAS_FLIP=flip is not None, HAS_SHIFT=shift is not None,
        NC=nc, BY=FWD_BY, BX=FWD_BX,
        num_warps=FWD_WARPS,
    )


def backward(g: torch.Tensor, boxes: torch.Tensor, flip, shift, gx: torch.Tensor) -> None:
    n, c, h, w = gx.shape
    ho, wo = g.shape[2], g.shape[3]
    _check_int32_offsets(g, "grad_out")
    _check_int32_offsets(gx, "grad_x")
    m = max(h, w, ho, wo)
    tap = torch.empty((2, n, m, 2), dtype=torch.int32, device=g.device)
    rng = torch.empty((2, n, m, 2), dtype=torch.int32, device=g.device)
    lam = torch.empty((2, n, m), dtype=boxes.dtype, device=g.device)
    _tables_kernel[(2 * n,)](
        boxes, flip if flip is not None else boxes, shift if shift is not None else boxes, tap, rng, lam,
        n, h, w, ho, wo, m, g.stride(2), g.stride(3), ho.bit_length(), wo.bit_length(),
        HAS_FLIP=flip is not None, HAS_SHIFT=shift is not None, BLOCK=TAB_BLOCK,
        num_warps=TAB_WARPS,
    )
    nc = channels_per_program(c)
    _bwd_kernel[launch_grid("bwd", n, c, h, w, ho, wo)](
        g, gx, boxes, tap, rng, lam,
        c, h, w, n, m, triton.cdiv(h, BWD_BY), triton.cdiv(w, BWD_BX), triton.cdiv(c, nc),
        g.stride(0), g.stride(1),
        *gx.stride(),
        NC=nc, BY=BWD_BY, BX=BWD_BX,
        num_warps=BWD_WARPS,
    )


# ----------------------------------------------------------------------------
# compile checks (no GPU needed): every kernel variant the launchers can use
# ----------------------------------------------------------------------------
def compile_variants(ones: bool = True):
    """(name, kernel, signature, constexprs, options) for
    ``triton.compile(ASTSource(kernel, signature, constexprs=constexprs), target=..., options=options)``.

    Covers every dtype, flip/shift presence and channel count NC the launchers
    use; with ``ones`` also variants where the int arguments that a launch
    can specialise to the constant 1 (C, Ho, Wo, unit strides, ...) are
    constexpr 1, as the JIT does at run time."""
    ptrs = {"boxes_ptr": "*fp32", "flip_ptr": "*i32", "shift_ptr": "*i32"}
    for dt in ("fp32", "bf16", "fp16", "fp64"):
        acc = "fp64" if dt == "fp64" else "fp32"
        box = {"boxes_ptr": "*" + acc}
        for has in (True, False):
            flags = {"HAS_FLIP": has, "HAS_SHIFT": has}
            for nc in (1, 2, 3, 4):
                s = {"x_ptr": "*" + dt, "out_ptr": "*" + dt, **ptrs, **box}
                s.update({k: "i32" for k in ["C", "H", "W", "Ho", "Wo", "tiles_y", "tiles_x", "c_groups",
                                             "sxn", "sxc", "sxh", "sxw", "son", "soc", "soh", "sow"]})
                c = {**flags, "NC": nc, "BY": FWD_BY, "BX": FWD_BX}
                yield f"fwd-{dt}-flip{int(has)}-nc{nc}", _fwd_kernel, s, c, {"num_warps": FWD_WARPS}
                s = {"g_ptr": "*" + dt, "gx_ptr": "*" + dt, "boxes_ptr": "*" + acc, "tap_ptr": "*i32",
                     "rng_ptr": "*i32", "lam_ptr": "*" + acc}
                s.update({k: "i32" for k in ["C", "H", "W", "N", "M", "tiles_y", "tiles_x", "c_groups",
                                             "sgn", "sgc", "sxn", "sxc", "sxh", "sxw"]})
                c = {"NC": nc, "BY": BWD_BY, "BX": BWD_BX}
                if has:  # the gather does not depend on flip/shift
                    yield f"bwd-{dt}-nc{nc}", _bwd_kernel, s, c, {"num_warps": BWD_WARPS}
            s = {**ptrs, **box, "tap_ptr": "*i32", "rng_ptr": "*i32", "lam_ptr": "*" + acc}
            s.update({k: "i32" for k in ["N", "H", "W", "Ho", "Wo", "M", "sgh", "sgw", "steps_h", "steps_w"]})
            if dt in ("fp32", "fp64"):  # the tables depend on the arithmetic type only
                yield f"tables-{acc}-flip{int(has)}", _tables_kernel, s, {**flags, "BLOCK": TAB_BLOCK}, {"num_warps": TAB_WARPS}
    if ones:
        for dt in ("fp32", "bf16"):
            s = {"x_ptr": "*" + dt, "out_ptr": "*" + dt, **ptrs}
            s.update({k: "i32" for k in ["C", "H", "W", "Ho", "Wo", "tiles_y", "tiles_x", "c_groups",
                                         "sxn", "sxc", "sxh", "sxw", "son", "soc", "soh", "sow"]})
            c = {"HAS_FLIP": True, "HAS_SHIFT": True, "NC": 1, "BY": FWD_BY, "BX": FWD_BX,
                 "C": 1, "Ho": 1, "Wo": 1, "tiles_y": 1, "tiles_x": 1, "c_groups": 1, "sxw": 1, "sow": 1}
            yield f"fwd-{dt}-ones", _fwd_kernel, {**s, **{k: "constexpr" for k in c}}, c, {"num_warps": FWD_WARPS}
            s = {"g_ptr": "*" + dt, "gx_ptr": "*" + dt, "boxes_ptr": "*fp32", "tap_ptr": "*i32", "rng_ptr": "*i32",
                 "lam_ptr": "*fp32"}
            s.update({k: "i32" for k in ["C", "H", "W", "N", "M", "tiles_y", "tiles_x", "c_groups",
                                         "sgn", "sgc", "sxn", "sxc", "sxh", "sxw"]})
            c = {"NC": 1, "BY": BWD_BY, "BX": BWD_BX, "C": 1, "H": 1, "W": 1, "N": 1, "M": 1, "tiles_y": 1,
                 "tiles_x": 1, "c_groups": 1, "sxw": 1, "sgc": 1}
            yield f"bwd-{dt}-ones", _bwd_kernel, {**s, **{k: "constexpr" for k in c}}, c, {"num_warps": BWD_WARPS}
        s = {**ptrs, "tap_ptr": "*i32", "rng_ptr": "*i32", "lam_ptr": "*fp32"}
        s.update({k: "i32" for k in ["N", "H", "W", "Ho", "Wo", "M", "sgh", "sgw", "steps_h", "steps_w"]})
        c = {"HAS_FLIP": True, "HAS_SHIFT": True, "BLOCK": TAB_BLOCK, "N": 1, "H": 1, "W": 1, "Ho": 1, "Wo": 1,
             "M": 1, "sgw": 1, "steps_h": 1, "steps_w": 1}
        yield "tables-ones", _tables_kernel, {**s, **{k: "constexpr" for k in c}}, c, {"num_warps": TAB_WARPS}
