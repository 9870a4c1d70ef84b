"""Triton kernels of the BN statistics op (see bn_stat_loss.py).

Forward: a 3-D grid (channel blocks x splits of the reduced extent x groups)
so the reduction fills the GPU even for few channels; every program reduces a
tile at a time in float32 and keeps (count, mean, M2) per channel, merging
each tile into its running state with Chan's parallel formula (tile mean,
then the tile's sum of squared deviations from it: the variance never comes
from E[x^2] - E[x]^2, so |mean| >> std costs no precision). The per-split
partials (G, S, C) are merged with the same formula by a few torch ops.
When asked, the same read of x writes y = x * scale[c] + bias[c] (eval BN).

- channel-last data (NHWC, (N, C)): canonical (G, R, C) rows; a program owns
  BLOCK_C channels and a range of rows, loading [BLOCK_R, BLOCK_C] tiles.
- channel-first data (NCHW, (N, C, L)): canonical (G, B, C, L); a program owns
  one channel and a range of the flattened (B, L) extent.

Backward: one elementwise pass over memory order,
dx = (x - m[g,c]) * b[g,c] + a[g,c] (+ dy * s[c]).

Kernels are defined at import: TRITON_INTERPRET=1 must be set before this
module is first imported (triton decides interpretation in @triton.jit).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._backend import triton_interpret

# tl.reduce with triton's own sum combiner is what tl.sum does; calling it this
# way also works when TRITON_INTERPRET=1 was set after triton itself had been
# imported (tl.sum, tl.minimum, tl.zeros are then compiled-mode @jit functions the interpreter cannot
# call, while the interpreter recognises _sum_combine and uses numpy).
_sum_combine = tl.standard._sum_combine


@triton.jit
def _tsum(v):
    return tl.reduce(v, 0, _sum_combine)


@triton.jit
def _stat_rows_kernel(x_ptr, y_ptr, scale_ptr, bias_ptr, cnt_ptr, mean_ptr, m2_ptr,
                      R, C, rows_per_split, S,
                      BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, WRITE_Y: tl.constexpr):
    pid_c = tl.program_id(0)
    pid_s = tl.program_id(1)
    g = tl.program_id(2)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    base = g.to(tl.int64) * R * C
    r_start = pid_s * rows_per_split
    r_end = tl.where(r_start + rows_per_split < R, r_start + rows_per_split, R)
    n = tl.full([BLOCK_C], 0.0, tl.float32)
    mean = tl.full([BLOCK_C], 0.0, tl.float32)
    m2 = tl.full([BLOCK_C], 0.0, tl.float32)
    if WRITE_Y:
        sc = tl.load(scale_ptr + cols, mask=cmask, other=0.0)
        bi = tl.load(bias_ptr + cols, mask=cmask, other=0.0)
    for r0 in range(r_start, r_end, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        rmask = rows < r_end
        mask = rmask[:, None] & cmask[None, :]
        offs = base + rows[:, None].to(tl.int64) * C + cols[None, :]
        v = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        nb = _tsum(rmask.to(tl.float32))
        bmean = _tsum(v) / nb
        d = tl.where(mask, v - bmean[None, :], 0.0)
        bm2 = _tsum(d * d)
        ntot = n + nb
        delta = bmean - mean
        mean = mean + delta * (nb / ntot)
        m2 = m2 + bm2 + delta * delta * (n * nb / ntot)
        n = ntot
        if WRITE_Y:
            y = v * sc[None, :] + bi[None, :]
            tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
    out = (g * S + pid_s) * C + cols
    tl.store(cnt_ptr + out, n, mask=cmask)
    tl.store(mean_ptr + out, mean, mask=cmask)
    tl.store(m2_ptr + out, m2, mask=cmask)


@triton.jit
def _stat_planes_kernel(x_ptr, y_ptr, scale_ptr, bias_ptr, cnt_ptr, mean_ptr, m2_ptr,
                        B, C, L, per_split, S,
                        BLOCK: tl.constexpr, WRITE_Y: tl.constexpr):
    c = tl.program_id(0)
    pid_s = tl.program_id(1)
    g = tl.program_id(2)
    BL = B * L
    base = g.to(tl.int64) * B * C * L + c.to(tl.int64) * L
    j_start = pid_s * per_split
    j_end = tl.where(j_start + per_split < BL, j_start + per_split, BL)
    n = 0.0
    mean = 0.0
    m2 = 0.0
    if WRITE_Y:
        sc = tl.load(scale_ptr + c)
        bi = tl.load(bias_ptr + c)
    for j0 in range(j_start, j_end, BLOCK):
        j = j0 + tl.arange(0, BLOCK)
        mask = j < j_end
        bidx = j // L
        offs = base + bidx.to(tl.int64) * C * L + (j - bidx * L)
        v = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        nb = _tsum(mask.to(tl.float32))
        bmean = _tsum(v) / nb
        d = tl.where(mask, v - bmean, 0.0)
        bm2 = _tsum(d * d)
        ntot = n + nb
        delta = bmean - mean
        mean = mean + delta * (nb / ntot)
        m2 = m2 + bm2 + delta * delta * (n * nb / ntot)
        n = ntot
        if WRITE_Y:
            y = v * sc + bi
            tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
    out = (g * S + pid_s) * C + c
    tl.store(cnt_ptr + out, n)
    tl.store(mean_ptr + out, mean)
    tl.store(m2_ptr + out, m2)


@triton.jit
def _bwd_kernel(x_ptr, dy_ptr, scale_ptr, m_ptr, a_ptr, b_ptr, dx_ptr,
                total, C, L, per_group,
                HAS_DY: tl.constexpr, BLOCK: tl.constexpr, I64: tl.constexpr):
    pid = tl.program_id(0)
    if I64:
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    else:  # 32-bit index math (the divisions) when it fits
        offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < total
    c = (offs // L) % C
    idx = (offs // per_group) * C + c
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + idx, mask=mask, other=0.0)
    a = tl.load(a_ptr + idx, mask=mask, other=0.0)
    b = tl.load(b_ptr + idx, mask=mask, other=0.0)
    r = (x - m) * b + a
    if HAS_DY:
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        s = tl.load(scale_ptr + c, mask=mask, other=0.0)
        r = r + dy * s
    tl.store(dx_ptr + offs, r.to(dx_ptr.dtype.element_ty), mask=mask)


def _target_programs(device: torch.device) -> int:
    if triton_interpret() or device.type != "cuda":
        return 4
    return 4 * torch.cuda.get_device_properties(device).multi_processor_count


def _merge(cnt: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor):
    """Chan merge of (G, S, C) partials -> (G, C) mean and biased variance."""
    n = cnt.sum(1)
    mu = (cnt * mean).sum(1) / n
    m2t = (m2 + cnt * (mean - mu[:, None, :]).square()).sum(1)
    return mu, m2t / n


def forward(kind, xc, scale, bias, yc):
    write_y = yc is not None
    dummy = xc.new_empty(1, dtype=torch.float32)
    sc = scale if write_y else dummy
    bi = bias if write_y else dummy
    y = yc if write_y else xc
    target = _target_programs(xc.device)
    if kind == "cl":
        G, R, C = xc.shape
        BLOCK_C = min(64, triton.next_power_of_2(C))
        BLOCK_R = max(16, min(128, 4096 // BLOCK_C))
        nc = triton.cdiv(C, BLOCK_C)
        S = max(1, min(triton.cdiv(R, BLOCK_R), triton.cdiv(target, nc * G)))
        rows_per_split = triton.cdiv(triton.cdiv(R, S), BLOCK_R) * BLOCK_R
        S = triton.cdiv(R, rows_per_split)
        part = torch.empty((3, G, S, C), device=xc.device, dtype=torch.float32)
        _stat_rows_kernel[(nc, S, G)](xc, y, sc, bi, part[0], part[1], part[2], R, C, rows_per_split, S,
                                      BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C, WRITE_Y=write_y, num_warps=4)
    else:
        G, B, C, L = xc.shape
        BL = B * L
        BLOCK = max(128, min(2048, triton.next_power_of_2(BL)))
        S = max(1, min(triton.cdiv(BL, BLOCK), triton.cdiv(target, C * G)))
        per_split = triton.cdiv(triton.cdiv(BL, S), BLOCK) * BLOCK
        S = triton.cdiv(BL, per_split)
        part = torch.empty((3, G, S, C), device=xc.device, dtype=torch.float32)
        _stat_planes_kernel[(C, S, G)](xc, y, sc, bi, part[0], part[1], part[2], B, C, L, per_split, S,
                                       BLOCK=BLOCK, WRITE_Y=write_y, num_warps=4 if BLOCK <= 1024 else 8)
    return _merge(part[0], part[1], part[2])


def backward(kind, xc, dyc, scale, m, a, b, dxc):
    total = xc.numel()
    G, C = xc.shape[0], (xc.shape[2])
    L = xc.shape[3] if kind == "cf" else 1
    has_dy = dyc is not None
    dummy = m
    BLOCK = 1024
    _bwd_kernel[(triton.cdiv(total, BLOCK),)](
        xc, dyc if has_dy else xc, scale if has_dy else dummy, m, a, b, dxc,
        total, C, L, total // G, HAS_DY=has_dy, BLOCK=BLOCK, I64=total + BLOCK >= 2**31, num_warps=4)
