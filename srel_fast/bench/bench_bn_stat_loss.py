"""Micro-benchmark of bn_stat_loss (pytest-benchmark); the fused eval BN is in bench_fused_bn_stat.py.

    srel-fast bench kernels -k bn_stat_loss                        # CPU: scaled-down shapes
    srel-fast bench kernels -k bn_stat_loss --benchmark-json=bench/results/bn_stat_<device>.json   # GPU

Each case is forward + backward (input gradient) at the BatchNorm input shapes
of ResNet-50 for batch 100 at 224x224 on a GPU (scaled down on the CPU).
Providers: ``ours-<backend>`` for each backend available on the device, and
``torch`` (the plain reference, ``bn_stat_loss_reference``), plus ``copy`` (x.clone(), the device copy bandwidth to compare
with). ``extra_info`` holds the bytes moved by an ideal implementation
(read x in the forward; read x, write dx in the backward) and the achieved GB/s = those bytes / mean time, the same
byte count for every provider so the numbers compare directly.
"""
from __future__ import annotations

import os

import pytest
import torch

from srel_fast.kernels import _ext, bn_stat_loss, bn_stat_loss_reference
from srel_fast.kernels._backend import triton_available, triton_interpret

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")

# ResNet-50 (torchvision V1.5) BN input shapes, batch 100 at 224x224 (C, H, W).
GPU_SHAPES = [(64, 112, 112), (256, 56, 56), (128, 28, 28), (512, 28, 28), (1024, 14, 14), (2048, 7, 7)]
GPU_BATCH = 100
# CPU: same channel counts (a subset), spatial / 8, batch 4
CPU_SHAPES = [(64, 14, 14), (2048, 1, 1)]
CPU_BATCH = 4

SHAPES = GPU_SHAPES if CUDA else CPU_SHAPES
BATCH = GPU_BATCH if CUDA else CPU_BATCH
DTYPES = [torch.float32, torch.bfloat16] if CUDA else [torch.float32]
ROUNDS = int(os.environ.get("SREL_FAST_BENCH_ROUNDS", "30" if CUDA else "3"))


def _providers():
    out = ["torch", "copy", "ours-torch"]
    if DEVICE.type == "cuda":
        if triton_available():
            out.append("ours-triton")
        if _ext.has_op("bn_stat_loss", "cuda"):
            out.append("ours-cuda")
    else:
        if _ext.has_op("bn_stat_loss", "cpu"):
            out.append("ours-cpu")
        if triton_available() and triton_interpret():
            out.append("ours-triton")
    return out


PROVIDERS = _providers()


def _sync():
    if CUDA:
        torch.cuda.synchronize()


def _input(shape, layout, dtype):
    c, h, w = shape
    x = torch.randn(BATCH, c, h, w, device=DEVICE).to(dtype)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    rm = torch.randn(c, device=DEVICE) * 0.1
    rv = torch.rand(c, device=DEVICE) + 0.5
    return x.requires_grad_(True), rm, rv


def _run(benchmark, fn, nbytes, **info):
    fn()  # warm-up / compile / JIT build outside the timing
    _sync()
    benchmark.pedantic(fn, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    benchmark.extra_info.update(info)
    benchmark.extra_info["bytes"] = nbytes
    benchmark.extra_info["device"] = torch.cuda.get_device_name() if CUDA else "cpu"
    stats = getattr(benchmark, "stats", None)
    if stats is not None and stats.stats.mean > 0:
        benchmark.extra_info["GBps"] = nbytes / stats.stats.mean / 1e9


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_bn_stat_loss_fwd_bwd(benchmark, provider, dtype, layout, shape):
    x, rm, rv = _input(shape, layout, dtype)
    nbytes = 3 * x.numel() * x.element_size()  # fwd read x; bwd read x, write dx
    if provider == "copy":
        def fn():
            x.detach().clone()
            _sync()
        nbytes_p = 2 * x.numel() * x.element_size()
        _run(benchmark, fn, nbytes_p, provider=provider, note="copy bandwidth: bytes = read + write of x")
        return
    if provider == "torch":
        def loss_fn():
            return bn_stat_loss_reference(x, rm, rv, 0.01)
    else:
        be = provider.split("-", 1)[1]

        def loss_fn():
            return bn_stat_loss(x, rm, rv, 0.01, backend=be)

    def fn():
        (g,) = torch.autograd.grad(loss_fn(), x)
        _sync()
        return g

    _run(benchmark, fn, nbytes, provider=provider, shape=[BATCH, *shape], dtype=str(dtype), layout=layout)
