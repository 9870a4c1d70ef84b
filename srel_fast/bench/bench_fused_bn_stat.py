"""Micro-benchmark of fused_bn_stat: eval BatchNorm + BN statistics loss in one read (pytest-benchmark).

    srel-fast bench kernels -k fused_bn_stat                        # CPU: scaled-down shapes
    srel-fast bench kernels -k fused_bn_stat --benchmark-json=bench/results/fused_bn_stat_<device>.json   # GPU

Forward + backward (input gradient, with an upstream dy) at the first two
BatchNorm input shapes of ResNet-50 (bench_bn_stat_loss.py's shapes, devices
and rounds), channels_last. Providers: ``ours-<backend>`` for each backend
available on the device and ``torch`` (the plain reference,
``fused_bn_stat_reference``: F.batch_norm + bn_stat_loss_reference).
``extra_info`` holds the bytes moved by an ideal implementation (read x, write
y in the forward; read x and dy, write dx in the backward) and the achieved
GB/s, the same byte count for every provider.
"""
from __future__ import annotations

import pytest
import torch

from srel_fast.kernels import fused_bn_stat, fused_bn_stat_reference

from .bench_bn_stat_loss import BATCH, DEVICE, DTYPES, PROVIDERS, SHAPES, _input, _run, _sync


@pytest.mark.parametrize("provider", [p for p in PROVIDERS if p != "copy"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["channels_last"])
@pytest.mark.parametrize("shape", SHAPES[:2], ids=lambda s: "x".join(map(str, s)))
def test_fused_bn_stat_fwd_bwd(benchmark, provider, dtype, layout, shape):
    x, rm, rv = _input(shape, layout, dtype)
    c = shape[0]
    w = torch.randn(c, device=DEVICE)
    b = torch.randn(c, device=DEVICE)
    dy = torch.randn_like(x).detach()
    # fwd: read x, write y; bwd: read x and dy, write dx
    nbytes = 5 * x.numel() * x.element_size()
    if provider == "torch":
        def fwd():
            return fused_bn_stat_reference(x, rm, rv, w, b, 1e-5, 0.01)
    else:
        be = provider.split("-", 1)[1]

        def fwd():
            return fused_bn_stat(x, rm, rv, w, b, 1e-5, 0.01, backend=be)

    def fn():
        y, loss = fwd()
        (g,) = torch.autograd.grad((y, loss), x, (dy, torch.ones_like(loss)))
        _sync()
        return g

    _run(benchmark, fn, nbytes, provider=provider, shape=[BATCH, *shape], dtype=str(dtype), layout=layout)
