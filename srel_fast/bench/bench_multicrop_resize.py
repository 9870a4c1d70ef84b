"""Micro-benchmark of multicrop_resize (pytest-benchmark).

    srel-fast bench kernels -k multicrop_resize                        # CPU: small sizes
    srel-fast bench kernels -k multicrop_resize --benchmark-json out.json   # on the GPU machine

Providers: every available backend of the op ("ours": cuda / triton on a GPU,
cpu on the CPU) and "torch" (the per-image F.interpolate reference of the op);
"torch-shared" is what the reference SRe2L recovery does (one crop for the
whole batch: one F.interpolate + flip + roll), for scale. Forward, and forward
+ backward (grad w.r.t. x). GPU: batch 100, 3x224x224 -> 224x224 with
RandomResizedCrop boxes; CPU: batch 8, 3x64x64 -> 64x64.

extra_info: provider, shape, dtype, layout, the bytes the op must move
(crop reads + output writes forward; grad_out reads + full grad_x writes
backward), achieved GB/s and its fraction of the measured device copy
bandwidth (a clone of a 256 MiB / 32 MiB buffer).
"""
from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from srel_fast.kernels import _ext
from srel_fast.kernels._backend import triton_available
from srel_fast.kernels.crop_sampler import sample_crop_boxes, sample_flip_shift
from srel_fast.kernels.multicrop_resize import multicrop_resize

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
if CUDA:
    N, C, H, W, HO, WO, JITTER = 100, 3, 224, 224, 224, 224, 32
    ROUNDS, WARMUP = 20, 3
else:
    N, C, H, W, HO, WO, JITTER = 8, 3, 64, 64, 64, 64, 4
    ROUNDS, WARMUP = 3, 1


def _providers():
    out = ["torch", "torch-shared"]
    if CUDA:
        if _ext.has_op("multicrop_resize", "cuda"):
            out.append("cuda")
        if triton_available():
            out.append("triton")
    elif _ext.has_op("multicrop_resize", "cpu"):
        out.append("cpu")
    return out


def _sync():
    if CUDA:
        torch.cuda.synchronize()


@functools.lru_cache(maxsize=None)
def copy_bandwidth() -> float:
    """Measured device copy bandwidth in bytes/s (read + write of a clone)."""
    import time

    nbytes = (256 if CUDA else 32) << 20
    buf = torch.empty(nbytes // 4, dtype=torch.float32, device=DEV)
    buf.clone()
    _sync()
    reps = 10 if CUDA else 3
    t0 = time.perf_counter()
    for _ in range(reps):
        buf.clone()
    _sync()
    dt = (time.perf_counter() - t0) / reps
    return 2 * nbytes / dt


def _shared(x, boxes, flip, shift):
    """Reference SRe2L augmentation: one box/flip/roll for the whole batch."""
    t, l, h, w = (int(v) for v in boxes[0].tolist())
    y = F.interpolate(x[:, :, t : t + h, l : l + w], size=(HO, WO), mode="bilinear", align_corners=False)
    if bool(flip[0]):
        y = y.flip(-1)
    return torch.roll(y, shifts=(int(shift[0, 0]), int(shift[0, 1])), dims=(2, 3))


def _setup(dtype, layout, provider):
    gen = torch.Generator(device=DEV).manual_seed(0)
    x = torch.randn(N, C, H, W, device=DEV, generator=gen).to(dtype)
    if layout == "cl":
        x = x.contiguous(memory_format=torch.channels_last)
    shared = provider == "torch-shared"
    boxes = sample_crop_boxes(N, H, W, generator=gen, per_image=not shared)
    flip, shift = sample_flip_shift(N, JITTER, generator=gen, per_image=not shared)
    return x, boxes, flip, shift


def _bytes(x, boxes, backward):
    es = x.element_size()
    crop = float((boxes[:, 2] * boxes[:, 3]).sum()) * C * es
    out = N * C * HO * WO * es
    fwd = crop + out
    return fwd + (out + x.numel() * es if backward else 0)


def _record(benchmark, provider, x, boxes, backward):
    nbytes = _bytes(x, boxes, backward)
    info = {
        "provider": provider,
        "device": torch.cuda.get_device_name() if CUDA else "cpu",
        "shape": [N, C, H, W, HO, WO],
        "dtype": str(x.dtype).replace("torch.", ""),
        "layout": "channels_last" if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() else "nchw",
        "pass": "fwd+bwd" if backward else "fwd",
        "bytes": nbytes,
        "torch": torch.__version__,
    }
    stats = getattr(benchmark, "stats", None)
    if stats is not None and getattr(stats, "stats", None) is not None:
        mean = stats.stats.mean
        info["gbytes_per_s"] = nbytes / mean / 1e9
        info["fraction_of_copy_bw"] = nbytes / mean / copy_bandwidth()
    benchmark.extra_info.update(info)


DTYPES = [torch.float32, torch.bfloat16] if CUDA else [torch.float32]
LAYOUTS = ["nchw", "cl"] if CUDA else ["nchw"]


def _fn(provider, x, boxes, flip, shift):
    if provider == "torch-shared":
        return lambda xx: _shared(xx, boxes, flip, shift)
    backend = "torch" if provider == "torch" else provider
    return lambda xx: multicrop_resize(xx, boxes, (HO, WO), flip, shift, backend=backend)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("provider", _providers())
def test_multicrop_forward(benchmark, provider, dtype, layout):
    benchmark.group = f"multicrop fwd {dtype} {layout}"
    x, boxes, flip, shift = _setup(dtype, layout, provider)
    f = _fn(provider, x, boxes, flip, shift)

    def run():
        with torch.no_grad():
            y = f(x)
        _sync()
        return y

    y = benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)
    assert y.shape == (N, C, HO, WO) and y.dtype == dtype
    _record(benchmark, provider, x, boxes, backward=False)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("provider", _providers())
def test_multicrop_forward_backward(benchmark, provider, dtype, layout):
    benchmark.group = f"multicrop fwd+bwd {dtype} {layout}"
    x, boxes, flip, shift = _setup(dtype, layout, provider)
    x.requires_grad_(True)
    g = torch.randn(N, C, HO, WO, device=DEV).to(dtype)
    f = _fn(provider, x, boxes, flip, shift)

    def run():
        y = f(x)
        (gx,) = torch.autograd.grad(y, x, g)
        _sync()
        return gx

    gx = benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)
    assert gx.shape == x.shape and gx.dtype == dtype
    _record(benchmark, provider, x, boxes, backward=True)
