"""multicrop_resize: every backend against F.interpolate/flip/roll (integer boxes)
and the float64 reference (fractional boxes), forward and gradient."""
import math
import os
import shutil
import subprocess
import sysconfig

import pytest
import torch
import torch.nn.functional as F

from conftest import gpu_backends
from srel_fast.kernels import _ext
from srel_fast.kernels._backend import triton_available, triton_interpret
from srel_fast.kernels.multicrop_resize import (
    multicrop_resize,
    multicrop_resize_reference,
    multicrop_resize_torch,
)

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"


def plain(x, boxes, out_size, flip=None, shift=None):
    """Independent ground truth for integer boxes: slice, F.interpolate, flip, roll."""
    outs = []
    for n in range(x.shape[0]):
        t, l, h, w = (int(v) for v in boxes[n].tolist())
        r = F.interpolate(x[n : n + 1, :, t : t + h, l : l + w], size=out_size, mode="bilinear", align_corners=False)
        if flip is not None and bool(flip[n]):
            r = torch.flip(r, dims=(-1,))
        if shift is not None:
            r = torch.roll(r, shifts=(int(shift[n, 0]), int(shift[n, 1])), dims=(2, 3))
        outs.append(r)
    return torch.cat(outs)


def _t(v, dtype=torch.float64):
    return torch.tensor(v, dtype=dtype)


# (name, (N, C, H, W), boxes, out_size, flip, shift)
CASES = [
    ("full_identity_n1", (1, 3, 7, 9), [[0, 0, 7, 9]], (7, 9), None, None),
    ("full_down", (2, 2, 12, 10), [[0, 0, 12, 10], [0, 0, 12, 10]], (5, 4), [True, False], [[1, 2], [-3, 7]]),
    ("down_odd", (2, 3, 15, 13), [[1, 2, 11, 9], [3, 0, 12, 13]], (4, 5), [False, True], [[0, 1], [2, 2]]),
    ("up", (2, 3, 9, 8), [[2, 1, 3, 4], [0, 5, 5, 3]], (10, 13), [True, True], [[-1, 0], [4, -5]]),
    ("row_1px", (2, 2, 8, 11), [[4, 0, 1, 11], [7, 3, 1, 5]], (5, 6), [False, True], [[2, 3], [0, 0]]),
    ("col_1px_and_1x1", (2, 1, 6, 7), [[0, 6, 6, 1], [2, 3, 1, 1]], (3, 4), None, [[1, 1], [5, 9]]),
    ("out_1x1", (3, 2, 9, 9), [[0, 0, 9, 9], [2, 2, 4, 5], [8, 8, 1, 1]], (1, 1), [True, False, True], None),
    ("mixed_big_shift", (3, 3, 10, 12), [[0, 0, 10, 12], [5, 7, 5, 5], [1, 1, 2, 9]], (6, 7),
     [True, False, True], [[100, -100], [-7, 13], [6, 7]]),
]
FRACTIONAL = [
    ("frac_down", (2, 2, 12, 13), [[0.5, 1.25, 9.5, 10.7], [2.3, 0.0, 7.1, 12.2]], (4, 5), [True, False], [[1, 2], [0, 3]]),
    ("frac_up", (2, 3, 9, 8), [[1.3, 0.7, 2.6, 3.1], [0.0, 0.2, 4.4, 6.9]], (9, 11), [False, True], [[2, 1], [-1, 5]]),
    ("frac_sub_pixel", (2, 1, 7, 7), [[2.6, 3.3, 0.4, 0.7], [5.5, 0.5, 1.5, 6.2]], (3, 4), None, [[1, 0], [0, 1]]),
]


def make_case(case, dtype=torch.float64, seed=0):
    name, shape, boxes, out_size, flip, shift = case
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    b = _t(boxes)
    fl = None if flip is None else torch.tensor(flip)
    sh = None if shift is None else torch.tensor(shift)
    return x, b, out_size, fl, sh


def _ids(cases):
    return [c[0] for c in cases]


def backends():
    out = []
    out.append("cpu")
    out.append(pytest.param("triton", marks=pytest.mark.skipif(
        not (triton_available() and triton_interpret()),
        reason="triton missing, or compiled (CUDA machine): the GPU tests cover it there")))
    return out


def to_layout(x, layout):
    return x.contiguous(memory_format=torch.channels_last) if layout == "cl" else x.contiguous()


def run_fwd_bwd(x, boxes, out_size, flip, shift, g, backend, device="cpu"):
    xx = x.to(device).detach().requires_grad_(True)
    y = multicrop_resize(
        xx, boxes.to(device), out_size,
        None if flip is None else flip.to(device), None if shift is None else shift.to(device), backend=backend,
    )
    (gx,) = torch.autograd.grad(y, xx, g.to(device=device, dtype=y.dtype))
    return y, gx


def reference_fwd_bwd(x, boxes, out_size, flip, shift, g):
    xr = x.double().detach().requires_grad_(True)
    y = multicrop_resize_reference(xr, boxes, out_size, flip, shift)
    (gx,) = torch.autograd.grad(y, xr, g.double())
    return y, gx


# --------------------------------------------------------------------------- reference itself
@pytest.mark.parametrize("case", CASES, ids=_ids(CASES))
def test_reference_and_torch_backend_match_interpolate(case):
    x, b, out_size, fl, sh = make_case(case)
    want = plain(x, b, out_size, fl, sh)
    torch.testing.assert_close(multicrop_resize_reference(x, b, out_size, fl, sh), want, rtol=0, atol=1e-12)
    torch.testing.assert_close(multicrop_resize_torch(x, b, out_size, fl, sh), want, rtol=0, atol=1e-12)
    # gradients: reference autograd vs autograd through F.interpolate; torch backend's explicit backward
    g = torch.randn_like(want)
    xa = x.clone().requires_grad_(True)
    (ga,) = torch.autograd.grad(plain(xa, b, out_size, fl, sh), xa, g)
    _, gr = reference_fwd_bwd(x, b, out_size, fl, sh, g)
    torch.testing.assert_close(gr, ga, rtol=0, atol=1e-12)
    _, gt = run_fwd_bwd(x, b, out_size, fl, sh, g, "torch")
    torch.testing.assert_close(gt, ga, rtol=0, atol=1e-12)


@pytest.mark.parametrize("case", FRACTIONAL, ids=_ids(FRACTIONAL))
def test_torch_backend_fractional(case):
    x, b, out_size, fl, sh = make_case(case)
    yr = multicrop_resize_reference(x, b, out_size, fl, sh)
    g = torch.randn_like(yr)
    _, gr = reference_fwd_bwd(x, b, out_size, fl, sh, g)
    y, gx = run_fwd_bwd(x, b, out_size, fl, sh, g, "torch")
    torch.testing.assert_close(y, yr, rtol=0, atol=1e-12)
    torch.testing.assert_close(gx, gr, rtol=0, atol=1e-12)


def test_fractional_reference_definition():
    # a box with integer start and integer size reduces to F.interpolate; shifting it by
    # 0.5 px gives the average of neighbouring samples for a 1:1 resize
    x = torch.randn(1, 1, 6, 8, dtype=torch.float64)
    b = _t([[1.0, 2.0, 4.0, 5.0]])
    torch.testing.assert_close(multicrop_resize_reference(x, b, (4, 5)), x[:, :, 1:5, 2:7])
    b2 = _t([[1.0, 2.5, 4.0, 5.0]])
    got = multicrop_resize_reference(x, b2, (4, 5))
    want = 0.5 * (x[:, :, 1:5, 2:7] + x[:, :, 1:5, 3:8])
    torch.testing.assert_close(got, want)


# --------------------------------------------------------------------------- compiled backends, float64
@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("case", CASES + FRACTIONAL, ids=_ids(CASES + FRACTIONAL))
def test_backend_float64(case, backend, layout):
    x, b, out_size, fl, sh = make_case(case)
    yr = multicrop_resize_reference(x, b, out_size, fl, sh)
    g = torch.randn_like(yr)
    _, gr = reference_fwd_bwd(x, b, out_size, fl, sh, g)
    y, gx = run_fwd_bwd(to_layout(x, layout), b, out_size, fl, sh, g, backend)
    torch.testing.assert_close(y, yr, rtol=0, atol=1e-12)
    torch.testing.assert_close(gx, gr, rtol=0, atol=1e-12)
    if layout == "cl":
        assert y.is_contiguous(memory_format=torch.channels_last)
        assert gx.is_contiguous(memory_format=torch.channels_last)
    else:
        assert y.is_contiguous() and gx.is_contiguous()


TOL = {torch.float32: (1e-5, 2e-5), torch.float16: (2e-3, 4e-3), torch.bfloat16: (1.6e-2, 3e-2)}
DTYPE_CASES = [CASES[2], CASES[3], CASES[4], FRACTIONAL[0]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("case", DTYPE_CASES, ids=_ids(DTYPE_CASES))
def test_backend_low_precision(case, backend, dtype):
    x, b, out_size, fl, sh = make_case(case, dtype=dtype)
    yr = multicrop_resize_reference(x, b, out_size, fl, sh)  # exact on the rounded input
    g = torch.randn_like(yr).to(dtype)
    _, gr = reference_fwd_bwd(x, b, out_size, fl, sh, g)
    layout = "cl" if dtype == torch.float16 else "nchw"
    y, gx = run_fwd_bwd(to_layout(x, layout), b, out_size, fl, sh, g, backend)
    assert y.dtype == dtype and gx.dtype == dtype
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(y.double(), yr, rtol=rtol, atol=atol)
    torch.testing.assert_close(gx.double(), gr, rtol=rtol, atol=atol * 4)


@pytest.mark.parametrize("backend", backends())
def test_float32_matches_torch_backend(backend):
    # fp32 against F.interpolate in fp32 (same arithmetic): tight
    x, b, out_size, fl, sh = make_case(CASES[7], dtype=torch.float32, seed=3)
    want = plain(x, b, out_size, fl, sh)
    got = multicrop_resize(x, b.float(), out_size, fl, sh, backend=backend)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", backends())
def test_gradient_only_in_crop_and_conserved(backend):
    x = torch.randn(3, 2, 16, 15, dtype=torch.float64)
    b = _t([[3, 4, 6, 5], [0, 0, 16, 15], [10, 2, 1, 9]])
    fl, sh = torch.tensor([True, False, True]), torch.tensor([[2, 3], [-1, 0], [5, 5]])
    g = torch.rand(3, 2, 7, 8, dtype=torch.float64)
    _, gx = run_fwd_bwd(x, b, (7, 8), fl, sh, g, backend)
    mask = torch.zeros_like(gx, dtype=torch.bool)
    for n, (t, l, h, w) in enumerate(b.long().tolist()):
        mask[n, :, t : t + h, l : l + w] = True
    assert (gx[~mask] == 0).all()
    assert (gx[mask] >= 0).all()
    # bilinear weights of every output pixel sum to one: the gradient mass is conserved
    torch.testing.assert_close(gx.sum(dim=(2, 3)), g.sum(dim=(2, 3)))


@pytest.mark.parametrize("backend", backends())
def test_noncontiguous_and_expanded_grad(backend):
    base = torch.randn(2, 3, 12, 20, dtype=torch.float64)
    x = base[:, :, :, ::2]  # non-contiguous view (W stride 2)
    b = _t([[1, 1, 9, 8], [0, 2, 12, 5]])
    y = multicrop_resize(x, b, (5, 6), backend=backend)
    torch.testing.assert_close(y, plain(x, b, (5, 6)))
    xx = x.clone().requires_grad_(True)
    multicrop_resize(xx, b, (5, 6), backend=backend).sum().backward()  # grad_out is an expanded scalar
    xa = x.clone().requires_grad_(True)
    plain(xa, b, (5, 6)).sum().backward()
    torch.testing.assert_close(xx.grad, xa.grad)


def test_auto_backend_and_errors():
    x = torch.randn(2, 3, 8, 8)
    b = torch.tensor([[0.0, 0.0, 8.0, 8.0], [1.0, 1.0, 4.0, 4.0]])
    y = multicrop_resize(x, b, (4, 4))  # auto
    torch.testing.assert_close(y, plain(x, b, (4, 4)), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError):
        multicrop_resize(x, b[:1], (4, 4))
    with pytest.raises(ValueError):
        multicrop_resize(x, b.long(), (4, 4))
    with pytest.raises(ValueError):
        multicrop_resize(x[0], b, (4, 4))
    with pytest.raises(ValueError):
        multicrop_resize(x, b, (4, 4), backend="nope")
    with pytest.raises(RuntimeError):
        multicrop_resize(x, b, (4, 4), backend="cuda")


def test_cpu_extension_is_built():
    assert _ext.has_op("multicrop_resize", "cpu"), _ext.load_error()


def test_opcheck():
    x = torch.randn(2, 3, 9, 10, requires_grad=True)
    b = torch.tensor([[0.0, 1.0, 7.0, 8.0], [2.0, 0.0, 3.0, 10.0]])
    fl, sh = torch.tensor([True, False]), torch.tensor([[1, 2], [3, -4]])
    op = torch.ops.srel_fast.multicrop_resize.default
    torch.library.opcheck(op, (x, b, 5, 6, fl, sh, "cpu"), test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    x0 = torch.randn(3, 3, 12, 14)
    b = torch.tensor([[0.0, 0.0, 12.0, 14.0], [2.0, 3.0, 5.0, 9.0], [5.0, 1.0, 1.0, 7.0]])
    fl, sh = torch.tensor([True, False, True]), torch.tensor([[1, -2], [0, 5], [7, 3]])

    def f(x):
        y = multicrop_resize(x * 2.0, b, (8, 9), flip=fl, shift=sh)
        return (y.square() + y).sum()

    xe = x0.clone().requires_grad_(True)
    le = f(xe)
    le.backward()
    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    xc = x0.clone().requires_grad_(True)
    lc = cf(xc)
    lc.backward()
    torch.testing.assert_close(lc, le)
    torch.testing.assert_close(xc.grad, xe.grad)


@pytest.mark.slow
def test_torch_compile_inductor():
    torch._dynamo.reset()
    x0 = torch.randn(2, 3, 10, 10).contiguous(memory_format=torch.channels_last)
    b = torch.tensor([[0.0, 0.0, 10.0, 10.0], [2.0, 3.0, 5.0, 6.0]])

    def f(x):
        return multicrop_resize(torch.sigmoid(x), b, (6, 6), flip=torch.tensor([True, False])).sum()

    xe = x0.clone().requires_grad_(True)
    le = f(xe)
    le.backward()
    xc = x0.clone().requires_grad_(True)
    lc = torch.compile(f, fullgraph=True)(xc)
    lc.backward()
    torch.testing.assert_close(lc, le)
    torch.testing.assert_close(xc.grad, xe.grad)


# --------------------------------------------------------------------------- CUDA source (compile-only here)
def _nvcc_cmd(out):
    from torch.utils.cpp_extension import CUDA_HOME, include_paths

    nvcc = os.path.join(CUDA_HOME or "/usr/local/cuda", "bin", "nvcc")
    incs = include_paths("cuda") + [sysconfig.get_paths()["include"]]
    # headers of the nvidia pip wheels (the toolkit here has no cusparse.h etc.)
    import site

    for sp in site.getsitepackages():
        for sub in ("nvidia/cu13/include", "nvidia/cu12/include"):
            if os.path.isdir(os.path.join(sp, sub)):
                incs.append(os.path.join(sp, sub))
    src = os.path.join(_ext.csrc_dir(), "multicrop_resize_cuda.cu")
    return [
        nvcc, "-c", src, "-o", out, "-std=c++20", *_ext.NVCC_FLAGS,
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}", "-Xcompiler", "-fPIC",
        "-gencode=arch=compute_90,code=sm_90", "--expt-relaxed-constexpr",
        "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
        "-D__CUDA_NO_HALF2_OPERATORS__",
    ] + [f"-I{p}" for p in incs]


@pytest.mark.slow
def test_cuda_source_compiles(tmp_path):
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None or torch.version.cuda is None or not shutil.which(os.path.join(CUDA_HOME, "bin", "nvcc")):
        pytest.skip("nvcc or a CUDA build of torch not present")
    r = subprocess.run(_nvcc_cmd(str(tmp_path / "mc.o")), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "multicrop_resize_cuda.cu(" not in r.stderr, r.stderr[-4000:]  # no warnings in our file


def test_cuda_fp32_division_is_exact(tmp_path):
    # The tap arithmetic divides (s = h / H_out, candidate ranges); with --use_fast_math
    # nvcc emits div.approx / div.full (up to 2 ulp), which moves fp32 samples by
    # ~1e-4 at 224 px. The PTX of the real build flags must divide round-to-nearest.
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None or torch.version.cuda is None or not shutil.which(os.path.join(CUDA_HOME, "bin", "nvcc")):
        pytest.skip("nvcc or a CUDA build of torch not present")
    assert "--use_fast_math" not in _ext.NVCC_FLAGS
    ptx = tmp_path / "mc.ptx"
    cmd = [("--ptx" if a == "-c" else a) for a in _nvcc_cmd(str(ptx))]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-4000:]
    text = ptx.read_text()
    for approx in ("div.approx.f32", "div.full.f32", "div.approx.ftz.f32", "div.full.ftz.f32", "rcp.approx"):
        assert approx not in text, approx  # every fp32 division rounds to nearest


_TRITON_COMPILE = r"""
import triton
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
from srel_fast.kernels import multicrop_resize_triton as mt
tgt = GPUTarget("cuda", 90, 32)
# every kernel variant the launchers use (dtypes, flip/shift, channel counts, constexpr-1 arguments)
for name, fn, sig, cst, opt in mt.compile_variants():
    triton.compile(ASTSource(fn, sig, constexprs=cst), target=tgt, options=opt)
print("compiled")
"""


@pytest.mark.skipif(not triton_available(), reason="triton missing")
def test_triton_kernels_compile_for_sm90():
    # the interpreter accepts things the compiler does not: compile both kernels
    # to a Hopper binary (no GPU needed) in a process without TRITON_INTERPRET
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", _TRITON_COMPILE], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0 and "compiled" in r.stdout, r.stderr[-4000:]


# --------------------------------------------------------------------------- GPU
gpu = pytest.mark.gpu


def _gpu_backends():
    return [b for b in gpu_backends("multicrop_resize") if b != "torch"]


@gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_gpu_backends_realistic(dtype, layout):
    from srel_fast.kernels.crop_sampler import sample_crop_boxes, sample_flip_shift

    gen = torch.Generator(device="cuda").manual_seed(0)
    n = 16
    x = torch.randn(n, 3, 224, 224, device="cuda", generator=gen)
    b = sample_crop_boxes(n, 224, 224, generator=gen)
    fl, sh = sample_flip_shift(n, 32, generator=gen)
    g = torch.randn(n, 3, 224, 224, device="cuda", generator=gen)
    rtol, atol = TOL[dtype]
    atol_g = atol * 8
    if dtype == torch.float32:
        atol, atol_g = fp32_sampling_atol(x, g, b, 224)
    for be in _gpu_backends():
        y, gx = run_fwd_bwd(to_layout(x.to(dtype), layout), b, (224, 224), fl, sh, g.to(dtype), be, device="cuda")
        yr_d, gr_d = reference_fwd_bwd(x.to(dtype), b, (224, 224), fl, sh, g.to(dtype))
        torch.testing.assert_close(y.double(), yr_d, rtol=rtol, atol=atol, msg=be)
        torch.testing.assert_close(gx.double(), gr_d, rtol=rtol, atol=atol_g, msg=be)
        if dtype == torch.float32:  # the bounds are worst cases: the typical error must be rounding-sized
            assert ((y.double() - yr_d).norm() / yr_d.norm()).item() < 1e-5, be
            assert ((gx.double() - gr_d).norm() / gr_d.norm()).item() < 1e-5, be


def fp32_sampling_atol(x, g, boxes, out_len):
    """Absolute error bounds of an exact-division fp32 multicrop against float64.

    The sample position r = (t - b) + s (i + 0.5) - 0.5 with s = h / out_len is
    formed with ~4 fp32 roundings of magnitudes up to the input size H, so
    |dr| <= 4 eps (H + 1) (about 1.1e-4 px at 224). The output moves by at most
    |dr| times the largest difference of neighbouring pixels, plus the rounding of
    the blend (4 eps max|x|). Each grad_x element sums at most K = (ceil(2 / s_min)
    + 1)^2 taps of grad whose weights each move by at most 2 |dr|."""
    eps = torch.finfo(torch.float32).eps
    h = max(x.shape[2], x.shape[3])
    dr = 4 * eps * (h + 1)
    nb = max((x[..., 1:, :] - x[..., :-1, :]).abs().max().item(), (x[..., 1:] - x[..., :-1]).abs().max().item())
    atol_y = dr * nb + 4 * eps * x.abs().max().item()
    s_min = float(boxes[:, 2:].min()) / out_len
    taps = (math.ceil(2 / s_min) + 1) ** 2
    atol_g = 2 * dr * taps * g.abs().max().item() + taps * eps * g.abs().max().item()
    return atol_y, atol_g


@gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("case", CASES + FRACTIONAL, ids=_ids(CASES + FRACTIONAL))
def test_gpu_backends_float64_cases(case):
    x, b, out_size, fl, sh = make_case(case)
    yr = multicrop_resize_reference(x, b, out_size, fl, sh)
    g = torch.randn_like(yr)
    _, gr = reference_fwd_bwd(x, b, out_size, fl, sh, g)
    for be in _gpu_backends():
        y, gx = run_fwd_bwd(x, b, out_size, fl, sh, g, be, device="cuda")
        torch.testing.assert_close(y.cpu(), yr, rtol=0, atol=1e-10, msg=be)
        torch.testing.assert_close(gx.cpu(), gr, rtol=0, atol=1e-10, msg=be)


@gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_gpu_cuda_graph_capture():
    from srel_fast.kernels.crop_sampler import sample_crop_boxes, sample_flip_shift

    x = torch.randn(8, 3, 64, 64, device="cuda", requires_grad=True)
    for be in _gpu_backends():
        def step():
            b = sample_crop_boxes(8, 64, 64, device="cuda")
            fl, sh = sample_flip_shift(8, 4, device="cuda")
            y = multicrop_resize(x, b, (64, 64), fl, sh, backend=be)
            (gx,) = torch.autograd.grad(y.square().sum(), x)
            return y, gx

        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            step()  # warm-up (compiles kernels)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y, gx = step()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.isfinite(y).all() and torch.isfinite(gx).all()


# --------------------------------------------------------------------------- triton: division, grid, channel groups, tables
_TRITON_PTX_DIV = r"""
import triton
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
from srel_fast.kernels import multicrop_resize_triton as mt
tgt = GPUTarget("cuda", 90, 32)
jobs = []
# the launcher's forward kernel, its signature built from its argument names (independent of
# compile_variants, so this check also runs against older versions of the kernel file)
fn = mt._fwd_kernel
sig, cst = {}, {}
for a in fn.arg_names:
    if a.endswith("_ptr"):
        sig[a] = "*i32" if a in ("flip_ptr", "shift_ptr") else "*fp32"
    elif a in ("HAS_FLIP", "HAS_SHIFT"):
        cst[a] = True
    elif a.isupper() and a.startswith(("BLOCK", "B", "NC")):
        cst[a] = {"NC": 3, "BLOCK_C": 4}.get(a, 64)
    else:
        sig[a] = "i32"
sig.update({k: "constexpr" for k in cst})
jobs.append(("fwd-by-name", fn, sig, cst, {}))
jobs += [j for j in getattr(mt, "compile_variants", lambda: [])() if not j[0].startswith("bwd")]
bad = []
for name, fn, sig, cst, opt in jobs:
    ptx = triton.compile(ASTSource(fn, sig, constexprs=cst), target=tgt, options=opt).asm["ptx"]
    for op in ("div.full.f32", "div.approx"):
        if op in ptx:
            bad.append(f"{name}: {op} x{ptx.count(op)}")
print("BAD " + "; ".join(bad) if bad else f"OK {len(jobs)}")
"""


@pytest.mark.skipif(not triton_available(), reason="triton missing")
def test_triton_sm90_ptx_has_exact_division():
    """Compiled Triton lowers an fp32 '/' to the approximate div.full.f32 (the interpreter
    divides exactly): the tap arithmetic of the kernels must use round-to-nearest division."""
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", _TRITON_PTX_DIV], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    assert r.stdout.strip().startswith("OK"), r.stdout[-4000:]


def _mt():
    from srel_fast.kernels import multicrop_resize_triton as mt

    return mt


@pytest.mark.skipif(not triton_available(), reason="triton missing")
def test_triton_launch_grid_is_1d_and_within_limits():
    mt = _mt()
    # 4 x 3 x 4096 x 4096 -> 224 x 224 forward, and a 3 x 1 x 100000 x 64 gradient: far more than
    # 65535 tiles, which a grid axis 1 or 2 could not hold
    for kind, shape in (("fwd", (4, 3, 224, 224, 4096, 4096)), ("bwd", (4, 3, 4096, 4096, 224, 224)),
                        ("fwd", (3, 1, 8, 8, 100000, 64)), ("bwd", (3, 1, 100000, 64, 8, 8))):
        grid = mt.launch_grid(kind, *shape)
        assert len(grid) == 1, grid
        assert 65535 < grid[0] <= mt.MAX_GRID0
    with pytest.raises(ValueError, match="grid limit"):
        mt.launch_grid("fwd", 2**20, 64, 8, 8, 4096, 4096)


@pytest.mark.skipif(not triton_available(), reason="triton missing")
@pytest.mark.parametrize("c", [1, 4, 5, 9])
def test_triton_flat_grid_tiles_and_channel_groups(monkeypatch, c):
    """Tiny tiles: many programs per image and channel group (C = 5, 9: a partial group of the
    NC = 4 channels a program shares), every one decoded from the flat grid axis 0."""
    if CUDA:
        pytest.skip("interpreter test (small tiles change the compiled kernels' constexprs)")
    mt = _mt()
    monkeypatch.setattr(mt, "FWD_BY", 2)
    monkeypatch.setattr(mt, "FWD_BX", 4)
    monkeypatch.setattr(mt, "BWD_BY", 2)
    monkeypatch.setattr(mt, "BWD_BX", 4)
    g = torch.Generator().manual_seed(c)
    x = torch.randn(3, c, 11, 13, generator=g, dtype=torch.float64)
    b = _t([[1, 2, 7, 9], [0, 0, 11, 13], [2.5, 1.25, 6.5, 10.75]])
    fl, sh = torch.tensor([True, False, True]), torch.tensor([[1, -2], [3, 5], [0, 1]])
    out = (9, 7)
    assert mt.launch_grid("fwd", 3, c, 11, 13, *out)[0] == 3 * -(-c // 4) * 5 * 2
    yr = multicrop_resize_reference(x, b, out, fl, sh)
    gr_out = torch.randn(yr.shape, generator=g, dtype=torch.float64)
    _, gr = reference_fwd_bwd(x, b, out, fl, sh, gr_out)
    for layout in ("nchw", "cl"):
        y, gx = run_fwd_bwd(to_layout(x, layout), b, out, fl, sh, gr_out, "triton")
        torch.testing.assert_close(y, yr, rtol=0, atol=1e-12)
        torch.testing.assert_close(gx, gr, rtol=0, atol=1e-12)


EDGE_CASES = [
    # boxes reaching outside the image, strong down- and upsampling, sub-pixel boxes
    ("outside", (2, 2, 12, 10), [[-3.0, -2.0, 8.0, 7.0], [6.0, 5.0, 9.0, 8.0]], (5, 6), [True, False], [[2, -1], [0, 3]]),
    ("down_skips", (2, 1, 40, 37), [[0, 0, 40, 37], [3.0, 5.0, 31.0, 29.0]], (3, 4), [False, True], [[1, 1], [2, 0]]),
    ("up_x10", (2, 3, 9, 9), [[2, 3, 2, 3], [4.5, 0.5, 1.5, 2.0]], (20, 30), [True, False], [[7, -11], [0, 29]]),
    ("tiny_h", (1, 2, 6, 6), [[2.2, 1.0, 0.3, 4.0]], (5, 3), None, [[1, 2]]),
]


@pytest.mark.skipif(not triton_available(), reason="triton missing")
@pytest.mark.parametrize("case", EDGE_CASES, ids=_ids(EDGE_CASES))
def test_triton_edge_boxes_float64(case):
    x, b, out_size, fl, sh = make_case(case)
    yr = multicrop_resize_reference(x, b, out_size, fl, sh)
    g = torch.randn_like(yr)
    _, gr = reference_fwd_bwd(x, b, out_size, fl, sh, g)
    y, gx = run_fwd_bwd(x.to(DEV), b, out_size, fl, sh, g, "triton", device=DEV)
    torch.testing.assert_close(y.cpu(), yr, rtol=0, atol=1e-10)
    torch.testing.assert_close(gx.cpu(), gr, rtol=0, atol=1e-10)


@pytest.mark.skipif(not triton_available(), reason="triton missing")
def test_triton_tap_tables_are_exact():
    """The backward's per-input-index candidate ranges are exactly the resized indices whose
    taps touch the index (weight-0 taps dropped): no tap missed, no wasted iteration."""
    from srel_fast.kernels.multicrop_resize import _axis_taps

    mt = _mt()
    b = _t([[0, 0, 224, 224], [37, 11, 80, 150], [2.5, 3.25, 60.5, 41.0], [-4.0, 200.0, 30.0, 50.0]])
    fl, sh = torch.tensor([1, 0, 1, 0], dtype=torch.int32), torch.tensor([[3, 5], [0, 0], [223, 1], [-7, 9]],
                                                                            dtype=torch.int32)
    n, h, w, ho, wo = 4, 224, 224, 112, 224
    g = torch.empty((n, 3, ho, wo), device=DEV).as_strided((n, 3, ho, wo), (3 * ho * wo, 1, 3 * wo, 3))
    m = max(h, w, ho, wo)
    tap = torch.full((2, n, m, 2), -7, dtype=torch.int32, device=DEV)
    rng = torch.full((2, n, m, 2), -7, dtype=torch.int32, device=DEV)
    lam = torch.zeros((2, n, m), dtype=torch.float64, device=DEV)
    bd, fd, sd = b.to(DEV), fl.to(DEV), sh.to(DEV)
    mt._tables_kernel[(2 * n,)](bd, fd, sd, tap, rng, lam, n, h, w, ho, wo, m, g.stride(2), g.stride(3),
                                ho.bit_length(), wo.bit_length(), HAS_FLIP=True, HAS_SHIFT=True, BLOCK=mt.TAB_BLOCK)
    tap, rng, lam = tap.cpu(), rng.cpu(), lam.cpu()
    for ax, (t, length, out_len, in_len, stride) in enumerate(((b[:, 0], b[:, 2], ho, h, g.stride(2)),
                                                                (b[:, 1], b[:, 3], wo, w, g.stride(3)))):
        i0, i1, lm = _axis_taps(t, length, out_len, in_len)
        i1 = torch.where(lm == 0, i0, i1)
        torch.testing.assert_close(tap[ax, :, :out_len, 0].long(), i0)
        torch.testing.assert_close(lam[ax, :, :out_len], lm)
        idx = torch.arange(out_len)
        fin = torch.where(fl[:, None].bool(), out_len - 1 - idx, idx) if ax == 1 else idx.expand(n, out_len)
        fin = torch.remainder(fin + sh[:, ax:ax + 1].long(), out_len)
        torch.testing.assert_close(tap[ax, :, :out_len, 1].long(), fin * stride)
        for k in range(n):
            for y in range(in_len):
                hit = ((i0[k] == y) | (i1[k] == y)).nonzero().flatten()
                first, count = rng[ax, k, y].tolist()
                assert count == len(hit), (ax, k, y, count, hit)
                if count:
                    assert first == hit.min().item() and hit.max().item() == first + count - 1


@gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_gpu_triton_fp32_matches_interpolate(layout):
    """fp32 on the GPU against per-image F.interpolate + flip + roll on the GPU (the same fp32
    arithmetic: scale = in / out by IEEE division, source index s (i + 0.5) - 0.5), so the
    tolerance can be tight. Against the float64 reference instead, exact fp32 already differs
    by ~1e-4 at 224 px: sample positions near 224 carry ~1.5e-5 px of rounding, times
    neighbour differences of up to ~8 for randn data (fp32 position ulp analysis)."""
    from srel_fast.kernels.crop_sampler import sample_crop_boxes, sample_flip_shift

    gen = torch.Generator(device="cuda").manual_seed(1)
    n = 16
    x = torch.randn(n, 3, 224, 224, device="cuda", generator=gen)
    b = sample_crop_boxes(n, 224, 224, generator=gen)
    fl, sh = sample_flip_shift(n, 32, generator=gen)
    g = torch.randn(n, 3, 224, 224, device="cuda", generator=gen)
    xa = to_layout(x, layout).requires_grad_(True)
    want = plain(xa, b, (224, 224), fl, sh)
    (gwant,) = torch.autograd.grad(want, xa, g)
    y, gx = run_fwd_bwd(to_layout(x, layout), b, (224, 224), fl, sh, g, "triton", device="cuda")
    # an approximate division (div.full.f32) moves samples by ~5e-5 px: errors ~4e-4 here. (Errors
    # ~1e-4 would instead mean that s (i + 0.5) - 0.5 is not contracted to one FMA in both.)
    torch.testing.assert_close(y, want, rtol=1e-6, atol=1e-5)
    # the reference backward accumulates with atomics in another order: fp32 summation noise
    torch.testing.assert_close(gx, gwant, rtol=1e-5, atol=1e-5)
