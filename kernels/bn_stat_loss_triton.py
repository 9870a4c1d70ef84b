"""Triton kernels of the BN statistics op (see bn_stat_loss.py).

Forward: every program reduces a share of one group's data for a block of
channels and keeps Welford state (mean, M2) *per lane* of its tile across the
whole loop: each loaded tile adds one sample to every lane, at one count
shared by all lanes (see _welford_step), so the loop body is elementwise (a
load, a select and four flops per element: no division, no block reduction,
no barrier). The lanes are merged once, at the end, with Chan's
formula, and the per-program partials (G, S, C) by ``_merge_kernel``. The
variance never comes from E[x^2] - E[x]^2, so |mean| >> std costs no
precision. When asked, the same read of x writes y = x * scale[c] + bias[c]
(eval BN). About 12 programs per SM are launched (grid axis 0 only).

- channel-last data (NHWC, (N, C)): canonical (G, R, C) rows; a program owns
  BLOCK_C channels and a range of rows, loading [BLOCK_R, BLOCK_C] tiles
  (contiguous along C: 16-byte vector loads when C allows).
- channel-first data (NCHW, (N, C, L)): canonical (G, B, C, L); a program owns
  one channel, a range of the B planes and a range of L, loading [BB, BL]
  tiles (BB planes x BL contiguous positions: no per-element division, and
  vector loads when L allows).

Backward: one elementwise pass dx = (x - m[g,c]) * b[g,c] + a[g,c]
(+ dy * s[c]) over tiles whose channel (and group) index is per row or per
column of the tile, not per element: no integer division or coefficient
gather per element, and 16 bytes per thread and access for 2-byte types.

Kernels are defined at import: TRITON_INTERPRET=1 must be set before this
module is first imported (triton decides interpretation in @triton.jit).
Only builtins are used in the kernels (no tl.sum / tl.zeros / tl.cdiv, which
are @jit functions that an interpreted kernel cannot call when triton itself
was imported before TRITON_INTERPRET was set; see tests/test_bn_stat_loss.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._backend import triton_interpret

# tl.reduce with triton's own sum combiner is what tl.sum does; calling it this
# way also works when TRITON_INTERPRET=1 was set after triton itself had been
# imported (see the module docstring).
_sum_combine = tl.standard._sum_combine

PROGRAMS_PER_SM = 12
MAX_GRID0 = 2**31 - 1


@triton.jit
def _tsum(v, axis: tl.constexpr):
    return tl.reduce(v, axis, _sum_combine)


@triton.jit
def _welford_step(x, valid, inv, mean, m2):
    """One Welford step on every lane, all lanes at the same count 1 / inv.

    A lane that is not valid is fed its own running mean, which leaves its
    mean and M2 unchanged; the loops are ordered so that such steps come only
    after a lane's last real sample, so the shared count is exact for every
    lane that still receives data, and the true per-lane counts are computed
    once at the end (_lane_counts)."""
    x = tl.where(valid, x, mean)
    delta = x - mean
    mean = mean + delta * inv
    m2 = m2 + delta * (x - mean)
    return mean, m2


@triton.jit
def _lane_counts(start, end, BLOCK: tl.constexpr):
    """Samples lane r of arange(BLOCK) receives over range(start, end, BLOCK) (float)."""
    left = end - start - tl.arange(0, BLOCK)
    return tl.maximum((left + BLOCK - 1) // BLOCK, 0).to(tl.float32)


@triton.jit
def _stat_rows_kernel(x_ptr, y_ptr, scale_ptr, bias_ptr, cnt_ptr, mean_ptr, m2_ptr,
                      R, C, rows_per_split, S, nc,
                      BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, WRITE_Y: tl.constexpr):
    # grid axis 0 = (group, split, channel block), channel blocks fastest
    pid = tl.program_id(0)
    pid_c = pid % nc
    rest = pid // nc
    pid_s = rest % S
    g = rest // S
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    base = g.to(tl.int64) * R * C
    r_start = pid_s * rows_per_split
    r_end = tl.minimum(r_start + rows_per_split, R)
    mean = tl.full([BLOCK_R, BLOCK_C], 0.0, tl.float32)
    m2 = tl.full([BLOCK_R, BLOCK_C], 0.0, tl.float32)
    k = 0.0
    if WRITE_Y:
        sc = tl.load(scale_ptr + cols, mask=cmask, other=0.0)
        bi = tl.load(bias_ptr + cols, mask=cmask, other=0.0)
    # only the last tile has rows past r_end: their lanes' extra steps come last
    for r0 in range(r_start, r_end, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        mask = (rows < r_end)[:, None] & cmask[None, :]
        offs = base + rows[:, None].to(tl.int64) * C + cols[None, :]
        v = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        k += 1.0
        mean, m2 = _welford_step(v, mask, tl.math.div_rn(1.0, k), mean, m2)
        if WRITE_Y:
            y = v * sc[None, :] + bi[None, :]
            tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
    # merge the BLOCK_R lanes of every channel (Chan): once per program
    cnt = _lane_counts(r_start, r_end, BLOCK_R)[:, None] * cmask.to(tl.float32)[None, :]
    n = _tsum(cnt, 0)
    mu = _tsum(cnt * mean, 0) / tl.maximum(n, 1.0)
    d = mean - mu[None, :]
    m2t = _tsum(m2 + cnt * d * d, 0)
    out = (g * S + pid_s) * C + cols
    tl.store(cnt_ptr + out, n, mask=cmask)
    tl.store(mean_ptr + out, mu, mask=cmask)
    tl.store(m2_ptr + out, m2t, mask=cmask)


@triton.jit
def _stat_planes_kernel(x_ptr, y_ptr, scale_ptr, bias_ptr, cnt_ptr, mean_ptr, m2_ptr,
                        B, C, L, CL, b_per_split, l_per_split, SB, SL,
                        BB: tl.constexpr, BL: tl.constexpr, WRITE_Y: tl.constexpr,
                        FULL: tl.constexpr, PARTIAL: tl.constexpr):
    # grid axis 0 = (group, b split, l split, channel), channels fastest
    pid = tl.program_id(0)
    c = pid % C
    rest = pid // C
    sl = rest % SL
    rest = rest // SL
    sb = rest % SB
    g = rest // SB
    b_start = sb * b_per_split
    b_end = tl.minimum(b_start + b_per_split, B)
    l_start = sl * l_per_split
    l_end = tl.minimum(l_start + l_per_split, L)
    # [l_start, l_full) is whole BL blocks (state F), [l_full, l_end) one partial block (state P):
    # in each state a lane's l-position is valid always or never, so only the last b block
    # has invalid (row) lanes and one shared count per state is exact. FULL / PARTIAL say
    # whether L >= BL / L % BL != 0 (the l splits are whole blocks): unused state is not compiled.
    l_full = l_start + ((l_end - l_start) // BL) * BL
    ar_l = tl.arange(0, BL)
    lp_valid = l_full + ar_l < l_end
    base = g.to(tl.int64) * B * CL + c.to(tl.int64) * L
    mean_f = tl.full([BB, BL], 0.0, tl.float32)
    m2_f = tl.full([BB, BL], 0.0, tl.float32)
    mean_p = tl.full([BB, BL], 0.0, tl.float32)
    m2_p = tl.full([BB, BL], 0.0, tl.float32)
    k_f = 0.0
    k_p = 0.0
    if WRITE_Y:
        sc = tl.load(scale_ptr + c)
        bi = tl.load(bias_ptr + c)
    for b0 in range(b_start, b_end, BB):
        b = b0 + tl.arange(0, BB)
        bmask = (b < b_end)[:, None]
        boff = (base + b.to(tl.int64) * CL)[:, None]
        if FULL:
            for l0 in range(l_start, l_full, BL):
                offs = boff + (l0 + ar_l)[None, :]
                v = tl.load(x_ptr + offs, mask=bmask, other=0.0).to(tl.float32)
                k_f += 1.0
                mean_f, m2_f = _welford_step(v, bmask, tl.math.div_rn(1.0, k_f), mean_f, m2_f)
                if WRITE_Y:
                    tl.store(y_ptr + offs, (v * sc + bi).to(y_ptr.dtype.element_ty), mask=bmask)
        if PARTIAL:
            offs = boff + (l_full + ar_l)[None, :]
            mask = bmask & lp_valid[None, :]
            v = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            k_p += 1.0
            mean_p, m2_p = _welford_step(v, mask, tl.math.div_rn(1.0, k_p), mean_p, m2_p)
            if WRITE_Y:
                tl.store(y_ptr + offs, (v * sc + bi).to(y_ptr.dtype.element_ty), mask=mask)
    # merge both states and all lanes (Chan): once per program
    nb = _lane_counts(b_start, b_end, BB)[:, None]
    cnt_f = nb * ((l_full - l_start) // BL).to(tl.float32)
    cnt_p = nb * lp_valid.to(tl.float32)[None, :]
    n = _tsum(_tsum(cnt_f + cnt_p, 1), 0)
    mu = _tsum(_tsum(cnt_f * mean_f + cnt_p * mean_p, 1), 0) / tl.maximum(n, 1.0)
    df = mean_f - mu
    dp = mean_p - mu
    m2t = _tsum(_tsum(m2_f + cnt_f * df * df + m2_p + cnt_p * dp * dp, 1), 0)
    out = ((g * SB + sb) * SL + sl) * C + c
    tl.store(cnt_ptr + out, n)
    tl.store(mean_ptr + out, mu)
    tl.store(m2_ptr + out, m2t)


@triton.jit
def _merge_kernel(cnt_ptr, mean_ptr, m2_ptr, mu_ptr, var_ptr, S, C, nc,
                  BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """Chan merge of the (G, S, C) partials -> (G, C) mean and biased variance."""
    pid = tl.program_id(0)
    pid_c = pid % nc
    g = pid // nc
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    base = g.to(tl.int64) * S * C
    n = tl.full([BLOCK_C], 0.0, tl.float32)
    sm = tl.full([BLOCK_C], 0.0, tl.float32)
    for s0 in range(0, S, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        mask = (s < S)[:, None] & cmask[None, :]
        offs = base + s[:, None] * C + cols[None, :]
        k = tl.load(cnt_ptr + offs, mask=mask, other=0.0)
        mm = tl.load(mean_ptr + offs, mask=mask, other=0.0)
        n += _tsum(k, 0)
        sm += _tsum(k * mm, 0)
    mu = sm / tl.maximum(n, 1.0)
    m2 = tl.full([BLOCK_C], 0.0, tl.float32)
    for s0 in range(0, S, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        mask = (s < S)[:, None] & cmask[None, :]
        offs = base + s[:, None] * C + cols[None, :]
        k = tl.load(cnt_ptr + offs, mask=mask, other=0.0)
        mm = tl.load(mean_ptr + offs, mask=mask, other=0.0)
        q = tl.load(m2_ptr + offs, mask=mask, other=0.0)
        d = mm - mu[None, :]
        m2 += _tsum(q + k * d * d, 0)
    out = g * C + cols
    tl.store(mu_ptr + out, mu, mask=cmask)
    tl.store(var_ptr + out, m2 / tl.maximum(n, 1.0), mask=cmask)


@triton.jit
def _bwd_rows_kernel(x_ptr, dy_ptr, scale_ptr, m_ptr, a_ptr, b_ptr, dx_ptr,
                     R, C, tiles_r, nc,
                     HAS_DY: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Channel-last (G, R, C): a [BLOCK_R, BLOCK_C] tile of one group; coefficients per column."""
    pid = tl.program_id(0)
    pid_c = pid % nc
    rest = pid // nc
    pid_r = rest % tiles_r
    g = rest // tiles_r
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    mask = (rows < R)[:, None] & cmask[None, :]
    offs = (g.to(tl.int64) * R + rows.to(tl.int64))[:, None] * C + cols[None, :]
    m = tl.load(m_ptr + g * C + cols, mask=cmask, other=0.0)
    a = tl.load(a_ptr + g * C + cols, mask=cmask, other=0.0)
    b = tl.load(b_ptr + g * C + cols, mask=cmask, other=0.0)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    r = (x - m[None, :]) * b[None, :] + a[None, :]
    if HAS_DY:
        s = tl.load(scale_ptr + cols, mask=cmask, other=0.0)
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        r = r + dy * s[None, :]
    tl.store(dx_ptr + offs, r.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_planes_kernel(x_ptr, dy_ptr, scale_ptr, m_ptr, a_ptr, b_ptr, dx_ptr,
                       P, BC, C, L, tiles_l,
                       HAS_DY: tl.constexpr, BP: tl.constexpr, BL: tl.constexpr):
    """Channel-first (G, B, C, L) as P = G*B*C planes of L: a [BP, BL] tile; coefficients per plane."""
    pid = tl.program_id(0)
    pid_l = pid % tiles_l
    pid_p = pid // tiles_l
    p = pid_p * BP + tl.arange(0, BP)
    l = pid_l * BL + tl.arange(0, BL)
    pmask = p < P
    mask = pmask[:, None] & (l < L)[None, :]
    c = p % C
    idx = (p // BC) * C + c  # (group, channel) of every plane
    offs = p.to(tl.int64)[:, None] * L + l[None, :]
    m = tl.load(m_ptr + idx, mask=pmask, other=0.0)
    a = tl.load(a_ptr + idx, mask=pmask, other=0.0)
    b = tl.load(b_ptr + idx, mask=pmask, other=0.0)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    r = (x - m[:, None]) * b[:, None] + a[:, None]
    if HAS_DY:
        s = tl.load(scale_ptr + c, mask=pmask, other=0.0)
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        r = r + dy * s[:, None]
    tl.store(dx_ptr + offs, r.to(dx_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------
# launch configuration
# ----------------------------------------------------------------------------
STAT_BLOCK, STAT_WARPS = 1024, 4  # elements per forward tile (8 or 16 per thread)
BWD_BLOCK, BWD_WARPS = 4096, 8    # elements per backward tile: 16 per thread, 16 B for 2-byte types


def _target_programs(device: torch.device) -> int:
    if triton_interpret() or device.type != "cuda":
        return 4
    return PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count


def _pow2_at_most(v: int, cap: int) -> int:
    return min(triton.next_power_of_2(max(v, 1)), cap)


def _block_l(L: int, cap: int) -> int:
    """Tile width along L: the whole (padded) row when it fits, else a power-of-two divisor
    of L of at least 64 elements (no partial tile), else ``cap``."""
    if L <= cap:
        return triton.next_power_of_2(L)
    d = min(L & -L, cap)
    return d if d >= 64 else cap


def _check_grid(programs: int) -> tuple:
    if programs > MAX_GRID0:
        raise ValueError(f"bn_stat: {programs} programs exceed the CUDA grid limit {MAX_GRID0}")
    return (programs,)


def rows_config(R: int, C: int, G: int, target: int):
    """(BLOCK_R, BLOCK_C, S, rows_per_split) of the channel-last statistics kernel."""
    BLOCK_C = _pow2_at_most(C, 64)
    BLOCK_R = max(16, min(256, STAT_BLOCK // BLOCK_C))
    nc = triton.cdiv(C, BLOCK_C)
    S = max(1, min(triton.cdiv(R, BLOCK_R), triton.cdiv(target, nc * G)))
    rows_per_split = triton.cdiv(triton.cdiv(R, S), BLOCK_R) * BLOCK_R
    return BLOCK_R, BLOCK_C, triton.cdiv(R, rows_per_split), rows_per_split


def planes_config(B: int, C: int, L: int, G: int, target: int):
    """(BB, BL, SB, b_per_split, SL, l_per_split) of the channel-first statistics kernel:
    tiles of BB planes x BL positions, the work of one (group, channel) split over
    SB ranges of planes and, when B alone cannot feed the GPU, SL ranges of L."""
    BL = _block_l(L, STAT_BLOCK)
    BB = max(1, STAT_BLOCK // BL)
    want = max(1, triton.cdiv(target, C * G))
    SB = max(1, min(triton.cdiv(B, BB), want))
    b_per_split = triton.cdiv(triton.cdiv(B, SB), BB) * BB
    SB = triton.cdiv(B, b_per_split)
    SL = max(1, min(triton.cdiv(L, BL), want // SB))
    l_per_split = triton.cdiv(triton.cdiv(L, SL), BL) * BL
    SL = triton.cdiv(L, l_per_split)
    return BB, BL, SB, b_per_split, SL, l_per_split


def forward(kind, xc, scale, bias, yc):
    write_y = yc is not None
    dummy = xc.new_empty(1, dtype=torch.float32)
    sc = scale if write_y else dummy
    bi = bias if write_y else dummy
    y = yc if write_y else xc
    target = _target_programs(xc.device)
    if kind == "cl":
        G, R, C = xc.shape
        BLOCK_R, BLOCK_C, S, rows_per_split = rows_config(R, C, G, target)
        nc = triton.cdiv(C, BLOCK_C)
        part = torch.empty((3, G, S, C), device=xc.device, dtype=torch.float32)
        _stat_rows_kernel[_check_grid(G * S * nc)](
            xc, y, sc, bi, part[0], part[1], part[2], R, C, rows_per_split, S, nc,
            BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C, WRITE_Y=write_y, num_warps=STAT_WARPS)
    else:
        G, B, C, L = xc.shape
        BB, BL, SB, b_per_split, SL, l_per_split = planes_config(B, C, L, G, target)
        S = SB * SL
        part = torch.empty((3, G, S, C), device=xc.device, dtype=torch.float32)
        _stat_planes_kernel[_check_grid(G * S * C)](
            xc, y, sc, bi, part[0], part[1], part[2], B, C, L, C * L, b_per_split, l_per_split, SB, SL,
            BB=BB, BL=BL, WRITE_Y=write_y, FULL=L >= BL, PARTIAL=L % BL != 0, num_warps=STAT_WARPS)
    mean = torch.empty((G, C), device=xc.device, dtype=torch.float32)
    var = torch.empty((G, C), device=xc.device, dtype=torch.float32)
    BLOCK_C = _pow2_at_most(C, 128)
    nc = triton.cdiv(C, BLOCK_C)
    _merge_kernel[_check_grid(G * nc)](part[0], part[1], part[2], mean, var, S, C, nc,
                                       BLOCK_S=_pow2_at_most(S, max(1, 2048 // BLOCK_C)), BLOCK_C=BLOCK_C,
                                       num_warps=4)
    return mean, var


def backward(kind, xc, dyc, scale, m, a, b, dxc):
    has_dy = dyc is not None
    dy = dyc if has_dy else xc
    s = scale if has_dy else m
    if kind == "cl":
        G, R, C = xc.shape
        BLOCK_C = _pow2_at_most(C, 128)
        BLOCK_R = max(1, BWD_BLOCK // BLOCK_C)
        tiles_r = triton.cdiv(R, BLOCK_R)
        nc = triton.cdiv(C, BLOCK_C)
        _bwd_rows_kernel[_check_grid(G * tiles_r * nc)](
            xc, dy, s, m, a, b, dxc, R, C, tiles_r, nc,
            HAS_DY=has_dy, BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C, num_warps=BWD_WARPS)
    else:
        G, B, C, L = xc.shape
        BL = _block_l(L, 1024)
        BP = max(1, BWD_BLOCK // BL)
        P = G * B * C
        tiles_l = triton.cdiv(L, BL)
        _bwd_planes_kernel[_check_grid(triton.cdiv(P, BP) * tiles_l)](
            xc, dy, s, m, a, b, dxc, P, B * C, C, L, tiles_l,
            HAS_DY=has_dy, BP=BP, BL=BL, num_warps=BWD_WARPS)


# ----------------------------------------------------------------------------
# compile checks (no GPU needed)
# ----------------------------------------------------------------------------
def compile_variants():
    """(name, kernel, signature, constexprs, options) for
    ``triton.compile(ASTSource(kernel, signature, constexprs=constexprs), target=..., options=options)``:
    every kernel, dtype and WRITE_Y / HAS_DY flag, with the tile shapes the
    launchers pick for small, medium and large channel counts and maps."""
    f32 = "*fp32"
    for dt in ("fp32", "bf16", "fp16"):
        for wy in (False, True):
            s = {"x_ptr": "*" + dt, "y_ptr": "*" + dt, "scale_ptr": f32, "bias_ptr": f32, "cnt_ptr": f32,
                 "mean_ptr": f32, "m2_ptr": f32}
            rs = {**s, **{k: "i32" for k in ["R", "C", "rows_per_split", "S", "nc"]}}
            for c in (3, 64, 2048):
                br, bc, _, _ = rows_config(1 << 20, c, 1, 1)
                yield (f"stat-rows-{dt}-y{int(wy)}-C{c}", _stat_rows_kernel, rs,
                       {"BLOCK_R": br, "BLOCK_C": bc, "WRITE_Y": wy}, {"num_warps": STAT_WARPS})
            ps = {**s, **{k: "i32" for k in ["B", "C", "L", "CL", "b_per_split", "l_per_split", "SB", "SL"]}}
            for L in (1, 49, 196, 3136, 12544, 1100):
                bb, bl, _, _, _, _ = planes_config(100, 64, L, 1, 1)
                yield (f"stat-planes-{dt}-y{int(wy)}-L{L}", _stat_planes_kernel, ps,
                       {"BB": bb, "BL": bl, "WRITE_Y": wy, "FULL": L >= bl, "PARTIAL": L % bl != 0},
                       {"num_warps": STAT_WARPS})
        for hd in (False, True):
            s = {"x_ptr": "*" + dt, "dy_ptr": "*" + dt, "scale_ptr": f32, "m_ptr": f32, "a_ptr": f32, "b_ptr": f32,
                 "dx_ptr": "*" + dt}
            rs = {**s, **{k: "i32" for k in ["R", "C", "tiles_r", "nc"]}}
            for c in (3, 64, 2048):
                bc = _pow2_at_most(c, 128)
                yield (f"bwd-rows-{dt}-dy{int(hd)}-C{c}", _bwd_rows_kernel, rs,
                       {"HAS_DY": hd, "BLOCK_R": max(1, BWD_BLOCK // bc), "BLOCK_C": bc}, {"num_warps": BWD_WARPS})
            ps = {**s, **{k: "i32" for k in ["P", "BC", "C", "L", "tiles_l"]}}
            for L in (1, 49, 3136, 12544, 1100):
                bl = _block_l(L, 1024)
                yield (f"bwd-planes-{dt}-dy{int(hd)}-L{L}", _bwd_planes_kernel, ps,
                       {"HAS_DY": hd, "BP": max(1, BWD_BLOCK // bl), "BL": bl}, {"num_warps": BWD_WARPS})
    ms = {"cnt_ptr": f32, "mean_ptr": f32, "m2_ptr": f32, "mu_ptr": f32, "var_ptr": f32, "S": "i32", "C": "i32",
          "nc": "i32"}
    yield "merge", _merge_kernel, ms, {"BLOCK_S": 16, "BLOCK_C": 128}, {"num_warps": 4}
