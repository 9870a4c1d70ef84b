"""srel_fast.kernels.bn_stat_loss: every backend against a float64 reference."""
from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import sysconfig

import pytest
import torch

from conftest import BN_TOL, gpu_backends, make_bn_input
from srel_fast.kernels import bn_stat_loss, bn_stat_loss_reference, bn_stat_moments

TRITON_MOD = "srel_fast.kernels.bn_stat_loss_triton"


BACKENDS = ["torch", "cpu", "triton"]

# (shape, layout, groups): C not a power of two, 1x1 maps, N = 1, 2-D and 3-D inputs.
CASES = [
    ((2, 3, 5, 5), "contiguous", 1),
    ((2, 3, 5, 5), "channels_last", 1),
    ((1, 6, 7, 9), "contiguous", 1),
    ((1, 6, 7, 9), "channels_last", 1),
    ((5, 7, 1, 1), "contiguous", 1),
    ((3, 130, 2, 3), "channels_last", 1),
    ((3, 130, 2, 3), "contiguous", 1),
    ((9, 24), "contiguous", 1),
    ((1, 5), "contiguous", 1),
    ((4, 10, 13), "contiguous", 1),
    ((4, 10, 13), "transposed", 1),  # (N, L, C) tokens viewed as (N, C, L)
    ((6, 5, 4, 4), "channels_last", 3),
    ((6, 5, 4, 4), "contiguous", 2),
    ((2, 3, 40, 40), "contiguous", 1),  # several tiles/splits per channel
    ((2, 3, 40, 40), "channels_last", 2),
]

def check_against_reference(x, rm, rv, weight, backend, groups, dense=True, grad_tol=None):
    x = x.detach().requires_grad_(True)
    loss = bn_stat_loss(x, rm, rv, weight, backend=backend, groups=groups)
    loss.backward()
    xd = x.detach().double().requires_grad_(True)
    ref = bn_stat_loss_reference(xd, rm.double(), rv.double(), weight, groups=groups)
    ref.backward()
    lt, gt = BN_TOL[x.dtype]
    gt = grad_tol or gt
    assert loss.dtype == torch.float32 and loss.dim() == 0
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=lt, atol=1e-6)
    assert x.grad.dtype == x.dtype and x.grad.shape == x.shape
    if dense:
        assert x.grad.stride() == x.stride(), "gradient must keep x's memory format"
    else:
        assert x.grad.is_contiguous()
    gmax = xd.grad.abs().max().item()
    torch.testing.assert_close(x.grad.double(), xd.grad, rtol=0, atol=gt * gmax)


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape,layout,groups", CASES, ids=lambda v: str(v))
def test_loss_and_grad_match_float64(backend, dtype, shape, layout, groups):
    x, rm, rv = make_bn_input(shape, layout, dtype, seed=hash((shape, layout)) % 1000)
    check_against_reference(x, rm, rv, 0.7, backend, groups)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_noncontiguous_input(backend):
    x, rm, rv = make_bn_input((4, 6, 8, 10), "contiguous", torch.float32)
    check_against_reference(x[:, :, ::2, 1:7], rm, rv, 1.3, backend, 1, dense=False)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_moments_match_torch(backend):
    x, rm, _ = make_bn_input((3, 11, 6, 5), "channels_last", torch.float32)
    mean, var = bn_stat_moments(x, rm, backend=backend)
    assert mean.shape == (1, 11) and mean.dtype == torch.float32
    xd = x.double()
    torch.testing.assert_close(mean[0].double(), xd.mean((0, 2, 3)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(var[0].double(), xd.var((0, 2, 3), unbiased=False), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_mean_shift_accuracy(backend, layout):
    """|mean| = 1000 x std in float32: var must stay accurate (no E[x^2]-E[x]^2)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 5, 16, 16, generator=g) + 1000.0 * torch.tensor([1.0, -1.0, 2.0, 0.5, 1.5]).view(1, 5, 1, 1)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    xd = x.double()
    true_var = xd.var((0, 2, 3), unbiased=False)
    # the naive float32 formula is useless here: the test can tell the difference
    xf = x.float()
    naive = (xf * xf).mean((0, 2, 3)) - xf.mean((0, 2, 3)) ** 2
    assert ((naive.double() - true_var).abs() / true_var).max() > 1e-2
    # shift 0 for the cpu backend too: its float64 sums must cope on their own
    for shift in (None, torch.full((5,), 1000.0)):
        mean, var = bn_stat_moments(x, shift, backend=backend)
        torch.testing.assert_close(var[0].double(), true_var, rtol=1e-4, atol=0)
        torch.testing.assert_close(mean[0].double(), xd.mean((0, 2, 3)), rtol=1e-6, atol=0)
    rm = torch.full((5,), 999.0)
    rv = torch.full((5,), 1.2)
    # the gradient (x - mu) * b is limited by float32 mu: one ulp at 1000 is 6e-5 std
    check_against_reference(x, rm, rv, 1.0, backend, 1, grad_tol=5e-4)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_zero_norm_subgradient(backend):
    """mean and var matching exactly: loss 0, gradient 0 (not NaN)."""
    x = torch.zeros(4, 3, 2, 2)
    x[:2] = 2.0  # every channel: half 0, half 2 -> mean 1, var 1 exactly
    x.requires_grad_(True)
    loss = bn_stat_loss(x, torch.ones(3), torch.ones(3), 5.0, backend=backend)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(x.grad, torch.zeros_like(x))
    # only the mean matched: the gradient is the variance term alone
    x.grad = None
    rv = torch.tensor([3.0, 0.5, 1.0])
    loss = bn_stat_loss(x, torch.ones(3), rv, 1.0, backend=backend)
    loss.backward()
    gvar = (1.0 - rv) / (1.0 - rv).norm()
    expect = 2 * gvar.view(1, 3, 1, 1) * (x.detach() - 1.0) / 16  # M = 4 * 2 * 2
    torch.testing.assert_close(x.grad, expect, rtol=1e-6, atol=1e-7)
    assert torch.isfinite(x.grad).all()


def test_reference_matches_definition():
    """The reference against an independent float64 formula, groups included."""
    x, rm, rv = make_bn_input((6, 4, 3, 3), "contiguous", torch.float64)
    total = 0.0
    for xg in x.chunk(3):
        mu = xg.mean((0, 2, 3))
        var = ((xg - mu.view(1, -1, 1, 1)) ** 2).mean((0, 2, 3))
        total += ((var - rv.double()) ** 2).sum().sqrt() + ((mu - rm.double()) ** 2).sum().sqrt()
    torch.testing.assert_close(bn_stat_loss_reference(x, rm, rv, 2.0, groups=3), 2.0 * total)


def test_groups_are_independent_batches():
    x, rm, rv = make_bn_input((6, 5, 3, 3), "contiguous", torch.float32)
    grouped = bn_stat_loss(x, rm, rv, backend="torch", groups=3)
    separate = sum(bn_stat_loss(xg, rm, rv, backend="torch") for xg in x.chunk(3))
    torch.testing.assert_close(grouped, separate)
    with pytest.raises(ValueError):
        bn_stat_loss(x, rm, rv, backend="torch", groups=4)


def test_auto_and_bad_backend():
    x, rm, rv = make_bn_input((2, 3, 4, 4), "contiguous", torch.float32)
    ref = bn_stat_loss_reference(x.double(), rm, rv)
    torch.testing.assert_close(bn_stat_loss(x, rm, rv).double(), ref, rtol=2e-5, atol=0)
    with pytest.raises(ValueError):
        bn_stat_loss(x, rm, rv, backend="nope")
    with pytest.raises(RuntimeError):
        bn_stat_loss(x, rm, rv, backend="cuda")


@pytest.mark.parametrize("backend", ["torch", "cpu"], indirect=True)
def test_opcheck(backend):
    from srel_fast.kernels.bn_stat_loss import _backward_op, _moments_op

    x, rm, rv = make_bn_input((2, 3, 4, 4), "channels_last", torch.float32)
    torch.library.opcheck(_moments_op, (x.requires_grad_(True), rm, 1, backend),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    a, b = torch.randn(1, 3), torch.randn(1, 3)
    torch.library.opcheck(_backward_op, (x.detach(), None, None, rm.view(1, 3), a, b, 1, backend),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("backend", ["torch", "cpu"], indirect=True)
def test_compile_fullgraph(backend):
    x, rm, rv = make_bn_input((2, 6, 5, 5), "channels_last", torch.float32)

    def f(x):
        return bn_stat_loss(x, rm, rv, 0.5, backend=backend, groups=2) * 3.0

    xe = x.clone().requires_grad_(True)
    le = f(xe)
    le.backward()
    xc = x.clone().requires_grad_(True)
    lc = torch.compile(f, fullgraph=True, backend="aot_eager")(xc)
    lc.backward()
    torch.testing.assert_close(lc, le)
    torch.testing.assert_close(xc.grad, xe.grad)


def _nvcc_flags():
    from torch.utils import cpp_extension as ce

    from srel_fast.kernels import _ext

    try:
        incs = ce.include_paths(device_type="cuda")
    except TypeError:  # older torch
        incs = ce.include_paths(cuda=True)
    incs = list(incs) + [sysconfig.get_paths()["include"]]
    # CUDA headers from the nvidia pip wheels (cusparse.h, cublas_v2.h) where the toolkit lacks them
    try:
        import nvidia

        for root in nvidia.__path__:
            for sub in sorted(os.listdir(root)):
                inc = os.path.join(root, sub, "include")
                if os.path.isfile(os.path.join(inc, "cusparse.h")):
                    incs.append(inc)
    except ImportError:
        pass
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    return [f"-I{p}" for p in incs] + [f"-D_GLIBCXX_USE_CXX11_ABI={abi}", *ce.COMMON_NVCC_FLAGS,
                                       *_ext.NVCC_FLAGS, "-Xcompiler", "-fPIC",
                                       "-gencode", "arch=compute_90,code=sm_90"]


def test_cuda_source_compiles(tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None or torch.version.cuda is None:
        pytest.skip("nvcc or a CUDA build of torch is not available")
    from srel_fast.kernels import _ext

    src = os.path.join(_ext.csrc_dir(), "bn_stat_loss_cuda.cu")
    std = "-std=c++20" if tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 12) else "-std=c++17"
    cmd = [nvcc, "-c", src, "-o", str(tmp_path / "bn_stat_loss_cuda.o"), std, *_nvcc_flags()]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]


# ----------------------------------------------------------------------------- GPU
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape,layout,groups", CASES + [
    ((32, 64, 56, 56), "contiguous", 1), ((32, 64, 56, 56), "channels_last", 1),
    ((16, 2048, 7, 7), "contiguous", 2), ((16, 2048, 7, 7), "channels_last", 1),
    ((64, 192, 197), "transposed", 1), ((8, 3, 224, 224), "contiguous", 1)], ids=lambda v: str(v))
def test_gpu_backends(dtype, shape, layout, groups):
    x, rm, rv = make_bn_input(shape, layout, dtype, seed=1)
    x = x.cuda()
    for be in gpu_backends("bn_stat_loss"):
        check_against_reference(x, rm.cuda(), rv.cuda(), 0.7, be, groups)


@gpu
@needs_cuda
def test_gpu_mean_shift_accuracy():
    x = (torch.randn(16, 8, 32, 32) + 1000.0).cuda()
    true_var = x.double().var((0, 2, 3), unbiased=False)
    for be in gpu_backends("bn_stat_loss"):
        for xx in (x, x.to(memory_format=torch.channels_last)):
            _, var = bn_stat_moments(xx, backend=be)
            torch.testing.assert_close(var[0].double(), true_var, rtol=1e-4, atol=0)


# ----------------------------------------------------------------------------- triton: splits, compile
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", [(5, 3, 37, 31), (3, 2, 1, 1100), (2, 70, 3, 3)], ids=str)
def test_triton_many_splits_and_lane_states(triton_interpret, monkeypatch, shape, layout):
    """Many programs per channel (splits over planes and over L, partial tiles in both, and
    L > one tile: the full-tile and partial-tile lane states) merged by _merge_kernel; the
    mean is shifted far from 0 so that a variance taken from E[x^2] - E[x]^2 would fail."""
    mod = importlib.import_module(TRITON_MOD)
    monkeypatch.setattr(mod, "_target_programs", lambda device: 97)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(shape, generator=g) * 0.5 + 300.0
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    xd = x.double()
    for groups in (1, shape[0]):
        mean, var = bn_stat_moments(x, groups=groups, backend="triton")
        xg = xd.reshape(groups, -1, *shape[1:])
        dims = (1, 3, 4)
        torch.testing.assert_close(mean.double(), xg.mean(dims), rtol=1e-6, atol=0)
        torch.testing.assert_close(var.double(), xg.var(dims, unbiased=False), rtol=2e-4, atol=1e-6)
    rm, rv = torch.full((shape[1],), 299.0), torch.full((shape[1],), 0.3)
    check_against_reference(x, rm, rv, 1.0, "triton", 1, grad_tol=5e-4)


def test_triton_split_configs_cover_the_data():
    """The launch configurations cover every element exactly once with 8-16 programs per SM."""
    pytest.importorskip("triton")
    from srel_fast.kernels import bn_stat_loss_triton as bt

    target = bt.PROGRAMS_PER_SM * 132
    for B, C, L in ((100, 64, 112 * 112), (100, 2048, 49), (1, 64, 112 * 112), (100, 256, 3136), (3, 5, 1100)):
        BB, BL, SB, bps, SL, lps = bt.planes_config(B, C, L, 1, target)
        assert BB * BL <= bt.STAT_BLOCK and bps % BB == 0 and lps % BL == 0
        assert (SB - 1) * bps < B <= SB * bps and (SL - 1) * lps < L <= SL * lps
        assert C * SB * SL <= 2 * max(target, C)
    for R, C in ((100 * 56 * 56, 64), (100 * 49, 2048), (64 * 197, 192)):
        BR, BC, S, rps = bt.rows_config(R, C, 1, target)
        assert (S - 1) * rps < R <= S * rps and rps % BR == 0
        assert S * -(-C // BC) <= 2 * target


_BN_TRITON_COMPILE = r"""
import triton
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
from srel_fast.kernels import bn_stat_loss_triton as bt
tgt = GPUTarget("cuda", 90, 32)
n = 0
for name, fn, sig, cst, opt in bt.compile_variants():
    # pointers 16-byte aligned, as the JIT specialises torch allocations
    attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names) if sig.get(a, "").startswith("*")}
    triton.compile(ASTSource(fn, sig, constexprs=cst, attrs=attrs), target=tgt, options=opt)
    triton.compile(ASTSource(fn, sig, constexprs=cst), target=tgt, options=opt)
    n += 1
print("compiled", n)
"""


def test_triton_kernels_compile_for_sm90():
    # the interpreter accepts things the compiler does not: compile every kernel variant
    # to a Hopper binary (no GPU needed) in a process without TRITON_INTERPRET
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", _BN_TRITON_COMPILE], capture_output=True, text=True, env=env,
                       timeout=900)
    assert r.returncode == 0 and "compiled" in r.stdout, r.stderr[-4000:]
