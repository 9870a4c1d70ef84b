"""Kernel correctness at real sizes and kernel speed against a copy of the same bytes.

    python -m srel_fast.bench.kernel_check --out DIR            # on the GPU: ResNet-50 shapes, batch 100
    python -m srel_fast.bench.kernel_check --dry-run --out DIR  # same steps, tiny sizes, CPU backends

check: every available backend of bn_stat_loss (moments, fused eval BN + moments, the
backward pass with and without dy) and of multicrop_resize (forward, backward) against a
float64 reference computed from the same (upcast) inputs, at ResNet-50's BN input
shapes (100x64x112x112, 100x256x56x56, 100x2048x7x7) in both layouts, fp32 and
bf16, plus one tensor over 2^31 elements; the error is ||out - ref|| / ||ref||
and the largest absolute error; the op's output memory is poisoned with NaN
before each call, so an element the kernel never wrote fails the check.

time: the median time of each op (triton.testing.do_bench) and the bytes it must
move (each input read once, each output written once), as GB/s and as a fraction
of the measured device-to-device copy bandwidth.

Writes kernel_check.json and kernel_time.json (device, versions, date, command)
and prints one table per part.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time

import torch

from srel_fast.kernels import _ext
from srel_fast.kernels._backend import triton_available, triton_interpret
from srel_fast.kernels.bn_stat_loss import backward_impl, forward_impl
from srel_fast.kernels.crop_sampler import sample_crop_boxes, sample_flip_shift
from srel_fast.kernels.multicrop_resize import (
    _bwd_impl as multicrop_bwd,
    _fwd_impl as multicrop_fwd,
    _sample_backward,
    multicrop_resize_reference,
)

from .environment import device_environment

# Norm-wise relative error allowed (METHOD: fp32 arithmetic lands far under 1e-3,
# bf16 outputs between 1e-3 and 1e-2; statistics accumulate in fp32 for both).
TOL = {"stat": 1e-5, "float32": 1e-5, "bfloat16": 8e-3}

GPU_STAT_SHAPES = [(100, 64, 112, 112), (100, 256, 56, 56), (100, 2048, 7, 7)]
DRY_STAT_SHAPES = [(4, 8, 12, 12), (4, 24, 5, 5), (3, 64, 3, 3)]
GPU_CROP = (100, 3, 224, 224, 224, 32)   # N, C, H, W, out size, jitter
DRY_CROP = (4, 3, 32, 32, 32, 4)
BIG_SHAPE = (1100, 64, 176, 176)          # 2.18e9 elements > 2^31


def backends(op: str, device: torch.device, dtype: torch.dtype = torch.float32) -> list[str]:
    out = ["torch"]
    # (the Triton interpreter has no bf16 arithmetic: triton runs bf16 on the GPU only)
    if triton_available() and (device.type == "cuda" or (triton_interpret() and dtype != torch.bfloat16)):
        out.append("triton")
    if _ext.has_op(op, device.type):
        out.append(device.type)
    return out


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    d = out.double() - ref
    den = ref.norm().item()
    return (d.norm().item() / den if den > 0 else d.norm().item()), d.abs().max().item()


def poison(nbytes: int, device: torch.device) -> None:
    """Leave a freed NaN block of ``nbytes`` in the caching allocator: the op's next
    output of that size lands on it, so unwritten elements read back as NaN."""
    if device.type == "cuda":
        torch.full((nbytes // 4 + 1,), float("nan"), device=device)


def layout(x: torch.Tensor, name: str) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if name == "channels_last" else x.contiguous()


# ----------------------------------------------------------------------------- checks
def stat_reference(x64: torch.Tensor):
    dims = (0, 2, 3)
    mean = x64.mean(dims)
    var = x64.var(dims, unbiased=False)
    return mean, var


def check_bn_stat(shape, lay, dtype, device, rows, gen) -> None:
    c = shape[1]
    x = layout((torch.randn(shape, device=device, generator=gen) * 1.7 + 0.3).to(dtype), lay)
    dy = layout(torch.randn(shape, device=device, generator=gen).to(dtype), lay)
    scale = torch.rand(c, device=device, generator=gen) + 0.5
    bias = torch.randn(c, device=device, generator=gen)
    a = torch.randn(1, c, device=device, generator=gen) * 1e-3
    b = torch.randn(1, c, device=device, generator=gen) * 1e-3
    x64 = x.double()
    mean_r, var_r = stat_reference(x64)
    y_r = x64 * scale.double().view(1, -1, 1, 1) + bias.double().view(1, -1, 1, 1)
    m = mean_r.float().view(1, -1)
    coef = lambda t: t.double().view(1, -1, 1, 1)  # noqa: E731
    dx_r = (x64 - coef(m)) * coef(b) + coef(a)
    dxy_r = dx_r + dy.double() * coef(scale)
    del x64
    shift = torch.zeros(c, device=device)
    for be in backends("bn_stat_loss", device, dtype):
        errs = {}
        poison(x.numel() * x.element_size(), device)
        mean, var, y = forward_impl(x, shift, scale, bias, 1, be, want_y=True)
        errs["mean"] = rel_err(mean[0], mean_r)
        errs["var"] = rel_err(var[0], var_r)
        errs["y"] = rel_err(y, y_r)
        ok = all(math.isfinite(e[0]) for e in errs.values()) and bool(torch.isfinite(y).all())
        ok &= errs["mean"][0] < TOL["stat"] and errs["var"][0] < TOL["stat"] and errs["y"][0] < TOL[str(dtype)[6:]]
        del y
        poison(x.numel() * x.element_size(), device)
        dx = backward_impl(x, None, None, m, a, b, 1, be)
        errs["dx"] = rel_err(dx, dx_r)
        ok &= bool(torch.isfinite(dx).all()) and errs["dx"][0] < TOL[str(dtype)[6:]]
        del dx
        poison(x.numel() * x.element_size(), device)
        dxy = backward_impl(x, dy, scale, m, a, b, 1, be)
        errs["dx_dy"] = rel_err(dxy, dxy_r)
        ok &= bool(torch.isfinite(dxy).all()) and errs["dx_dy"][0] < TOL[str(dtype)[6:]]
        del dxy
        rows.append({"op": "bn_stat_loss", "backend": be, "shape": list(shape), "layout": lay, "dtype": str(dtype)[6:],
                     "ok": bool(ok), **{f"{k}_rel": v[0] for k, v in errs.items()},
                     **{f"{k}_maxabs": v[1] for k, v in errs.items()}})


def check_bn_stat_big(device, rows, gen) -> None:
    """One bf16 tensor of more than 2^31 elements: 64-bit index paths (statistics and dx)."""
    shape = BIG_SHAPE
    x = torch.empty(shape, device=device, dtype=torch.bfloat16)
    for i in range(0, shape[0], 100):  # fill in slices: no full-size fp32 temporary
        x[i:i + 100] = (torch.randn((min(100, shape[0] - i), *shape[1:]), device=device, generator=gen) + 0.5)
    s1 = torch.zeros(shape[1], dtype=torch.float64, device=device)
    s2 = torch.zeros_like(s1)
    for i in range(0, shape[0], 100):
        xs = x[i:i + 100].double()
        s1 += xs.sum((0, 2, 3))
        s2 += xs.square().sum((0, 2, 3))
    cnt = shape[0] * shape[2] * shape[3]
    mean_r = s1 / cnt
    var_r = s2 / cnt - mean_r.square()  # fine in float64 at |mean| ~ std
    a = torch.full((1, shape[1]), 1e-3, device=device)
    b = torch.full((1, shape[1]), -2e-3, device=device)
    m = mean_r.float().view(1, -1)
    for be in [b_ for b_ in backends("bn_stat_loss", device) if b_ != "torch"]:
        mean, var, _ = forward_impl(x, torch.zeros(shape[1], device=device), None, None, 1, be, want_y=False)
        e_mean, e_var = rel_err(mean[0], mean_r), rel_err(var[0], var_r)
        dx = backward_impl(x, None, None, m, a, b, 1, be)
        # the last images hold the highest flat indices: check them against the formula
        tail = x[-10:].double()
        ref_tail = (tail - m.double().view(1, -1, 1, 1)) * b.double().view(1, -1, 1, 1) + a.double().view(1, -1, 1, 1)
        e_dx = rel_err(dx[-10:], ref_tail)
        ok = e_mean[0] < TOL["stat"] and e_var[0] < TOL["stat"] and e_dx[0] < TOL["bfloat16"]
        ok &= bool(torch.isfinite(dx[-10:]).all())
        del dx
        rows.append({"op": "bn_stat_loss", "backend": be, "shape": list(shape), "layout": "contiguous",
                     "dtype": "bfloat16", "ok": bool(ok), "mean_rel": e_mean[0], "var_rel": e_var[0],
                     "dx_tail_rel": e_dx[0], "numel": x.numel()})
    del x


def check_multicrop(lay, dtype, device, rows, gen, crop) -> None:
    n, c, h, w, size, jitter = crop
    x = layout(torch.randn(n, c, h, w, device=device, generator=gen).to(dtype), lay)
    boxes = sample_crop_boxes(n, h, w, generator=gen, device=device)
    flip, shift = sample_flip_shift(n, jitter, generator=gen, device=device)
    g = layout(torch.randn(n, c, size, size, device=device, generator=gen).to(dtype), lay)
    y_r = multicrop_resize_reference(x.double(), boxes, (size, size), flip, shift)
    gx_r = _sample_backward(g.double(), boxes, (h, w), flip, shift, torch.float64)
    for be in backends("multicrop_resize", device, dtype):
        poison(g.numel() * g.element_size(), device)
        y = multicrop_fwd(x, boxes, size, size, flip, shift, be)
        poison(x.numel() * x.element_size(), device)
        gx = multicrop_bwd(g, boxes, h, w, flip, shift, lay == "channels_last", be)
        e_y, e_g = rel_err(y, y_r), rel_err(gx, gx_r)
        tol = TOL[str(dtype)[6:]]
        ok = bool(torch.isfinite(y).all() and torch.isfinite(gx).all()) and e_y[0] < tol and e_g[0] < tol
        rows.append({"op": "multicrop_resize", "backend": be, "shape": [n, c, h, w], "out": size, "layout": lay,
                     "dtype": str(dtype)[6:], "ok": bool(ok), "y_rel": e_y[0], "y_maxabs": e_y[1],
                     "gx_rel": e_g[0], "gx_maxabs": e_g[1]})


# ----------------------------------------------------------------------------- timing
def bench_ms(fn, device: torch.device) -> float:
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=10, rep=40, return_mode="median"))
    fn()
    ts = []
    for _ in range(3):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return 1000 * sorted(ts)[1]


def copy_bandwidth(device: torch.device, dry: bool) -> float:
    """Bytes/s of a device-to-device copy (bytes read + bytes written)."""
    n = (8 << 20) if dry else (1 << 30)
    src = torch.randn(n // 4, device=device)
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src), device)
    return 2 * n / (ms / 1000)


def time_kernels(device, dry, rows) -> None:
    bw = copy_bandwidth(device, dry)
    rows.append({"op": "copy", "backend": "torch", "GBps": bw / 1e9, "fraction": 1.0})
    gen = torch.Generator(device=device).manual_seed(1)
    shapes = DRY_STAT_SHAPES if dry else GPU_STAT_SHAPES
    dtype = torch.float32 if dry else torch.bfloat16

    def add(op, be, shape, lay, nbytes, fn):
        try:
            ms = bench_ms(fn, device)
        except Exception as exc:  # noqa: BLE001 - a failing backend is recorded
            rows.append({"op": op, "backend": be, "shape": shape, "layout": lay, "error": repr(exc)[:300]})
            return
        rows.append({"op": op, "backend": be, "shape": shape, "layout": lay, "dtype": str(dtype)[6:], "ms": ms,
                     "bytes": nbytes, "GBps": nbytes / ms / 1e6, "fraction": nbytes / (ms / 1000) / bw})

    for shape in shapes:
        c = shape[1]
        for lay in ("contiguous", "channels_last"):
            x = layout(torch.randn(shape, device=device, generator=gen).to(dtype), lay)
            dy = layout(torch.randn(shape, device=device, generator=gen).to(dtype), lay)
            sc, bi = torch.rand(c, device=device) + 0.5, torch.randn(c, device=device)
            m, a, b = (torch.randn(1, c, device=device) for _ in range(3))
            sh = torch.zeros(c, device=device)
            nb = x.numel() * x.element_size()
            for be in backends("bn_stat_loss", device, dtype):
                add("bn_stat_moments", be, list(shape), lay, nb,
                    lambda: forward_impl(x, sh, None, None, 1, be, want_y=False))
                add("fused_bn_stat_fwd", be, list(shape), lay, 2 * nb,
                    lambda: forward_impl(x, sh, sc, bi, 1, be, want_y=True))
                add("bn_stat_loss_bwd", be, list(shape), lay, 2 * nb, lambda: backward_impl(x, None, None, m, a, b, 1, be))
                add("fused_bn_stat_bwd", be, list(shape), lay, 3 * nb,
                    lambda: backward_impl(x, dy, sc, m, a, b, 1, be))
            if device.type == "cuda":  # what eval BN alone costs in cuDNN, for scale
                add("batch_norm_eval(cudnn)", "torch", list(shape), lay, 2 * nb,
                    lambda: torch.nn.functional.batch_norm(x, sh, sc, None, None, False))
            del x, dy
    n, c, h, w, size, jitter = DRY_CROP if dry else GPU_CROP
    for lay in ("contiguous", "channels_last"):
        x = layout(torch.randn(n, c, h, w, device=device, generator=gen).to(dtype), lay)
        g = layout(torch.randn(n, c, size, size, device=device, generator=gen).to(dtype), lay)
        boxes = sample_crop_boxes(n, h, w, generator=gen, device=device)
        flip, shift = sample_flip_shift(n, jitter, generator=gen, device=device)
        crop_px = float((boxes[:, 2] * boxes[:, 3]).sum())
        esz = x.element_size()
        fwd_bytes = int((crop_px * c + g.numel()) * esz)
        bwd_bytes = int((g.numel() + x.numel()) * esz)
        for be in backends("multicrop_resize", device, dtype):
            add("multicrop_resize_fwd", be, [n, c, h, w], lay, fwd_bytes,
                lambda: multicrop_fwd(x, boxes, size, size, flip, shift, be))
            add("multicrop_resize_bwd", be, [n, c, h, w], lay, bwd_bytes,
                lambda: multicrop_bwd(g, boxes, h, w, flip, shift, lay == "channels_last", be))


# ----------------------------------------------------------------------------- report
def table(rows: list[dict], cols: list[str]) -> str:
    def f(v):
        if isinstance(v, float):
            return f"{v:.3g}"
        return str(v)

    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(f(r.get(k, "")) for k in cols) + " |" for r in rows]
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU backends (tests the script)")
    ap.add_argument("--out", default=".", help="folder for kernel_check.json / kernel_time.json")
    ap.add_argument("--parts", default="check,time", help="check, time or both")
    ap.add_argument("--no-big", action="store_true", help="skip the > 2^31-element check")
    ns = ap.parse_args(argv)
    device = torch.device("cpu" if ns.dry_run or not torch.cuda.is_available() else "cuda")
    dry = device.type == "cpu"
    os.makedirs(ns.out, exist_ok=True)
    parts = set(ns.parts.split(","))
    meta = {"environment": device_environment(device), "command": shlex.join(["python", "-m", "srel_fast.bench.kernel_check", *(argv or sys.argv[1:])]),
            "dry_run": dry}
    status = 0
    if "check" in parts:
        rows: list[dict] = []
        gen = torch.Generator(device=device).manual_seed(0)
        t = time.perf_counter()
        for shape in (DRY_STAT_SHAPES if dry else GPU_STAT_SHAPES):
            for lay in ("contiguous", "channels_last"):
                for dtype in (torch.float32, torch.bfloat16):
                    check_bn_stat(shape, lay, dtype, device, rows, gen)
        for lay in ("contiguous", "channels_last"):
            for dtype in (torch.float32, torch.bfloat16):
                check_multicrop(lay, dtype, device, rows, gen, DRY_CROP if dry else GPU_CROP)
        if not dry and not ns.no_big:
            try:
                check_bn_stat_big(device, rows, gen)
            except torch.cuda.OutOfMemoryError as exc:
                rows.append({"op": "bn_stat_loss", "shape": list(BIG_SHAPE), "ok": False, "error": repr(exc)[:200]})
        with open(os.path.join(ns.out, "kernel_check.json"), "w") as fh:
            json.dump({**meta, "seconds": time.perf_counter() - t, "tolerance": TOL, "rows": rows}, fh, indent=1)
        print(table(rows, ["op", "backend", "shape", "layout", "dtype", "ok", "mean_rel", "var_rel", "y_rel", "dx_rel",
                           "dx_dy_rel", "gx_rel", "dx_tail_rel"]))
        bad = [r for r in rows if not r.get("ok")]
        print(f"kernel check: {len(rows) - len(bad)} of {len(rows)} ok" + (f"; FAILED: {bad}" if bad else ""))
        status |= 1 if bad else 0
    if "time" in parts:
        rows = []
        time_kernels(device, dry, rows)
        with open(os.path.join(ns.out, "kernel_time.json"), "w") as fh:
            json.dump({**meta, "rows": rows}, fh, indent=1)
        print(table(rows, ["op", "backend", "shape", "layout", "ms", "GBps", "fraction", "error"]))
    return status


if __name__ == "__main__":
    sys.exit(main())
