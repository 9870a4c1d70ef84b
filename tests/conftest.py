import os

import pytest
import torch


def wants_triton_interpreter() -> bool:
    """Run Triton kernels in the interpreter (on CPU tensors) exactly when torch sees
    no CUDA device. Asking torch, not the file system (/dev/nvidia0), matters: a GPU
    test that ran in the interpreter would pass while testing no compiled kernel."""
    return not torch.cuda.is_available()


# Triton reads TRITON_INTERPRET when a kernel is decorated, i.e. when its module is
# first imported; set it before any test module imports srel_fast.kernels. This is the
# one place the test suite sets it.
if wants_triton_interpreter():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def digits_teacher(tmp_path_factory):
    """A small BN ConvNet squeezed on scikit-learn's digits (seconds on a CPU)."""
    from srel_fast.squeeze import SqueezeConfig, run_squeeze

    path = str(tmp_path_factory.mktemp("teacher") / "teacher.pt")
    res = run_squeeze(SqueezeConfig(data="digits", out=path, arch="convnet3", width=16, epochs=4, batch_size=64,
                                    lr=0.05, min_scale=0.5, device="cpu", progress=False))
    return path, res


def run_cli(args, capsys=None):
    """Run the CLI in-process; returns (exit code, stderr)."""
    from srel_fast.cli import main

    code = main([str(a) for a in args])
    err = capsys.readouterr().err if capsys is not None else ""
    return code, err


@pytest.fixture(autouse=True)
def _gpu_tests_need_the_cuda_extension(request):
    """On a CUDA machine a GPU test fails, with the compiler's message, when the CUDA
    kernels of the extension did not build: otherwise the tests would silently drop the
    cuda backend and pass having tested nothing of it (SREL_FAST_NO_EXT=1 opts out)."""
    if request.node.get_closest_marker("gpu") is not None and torch.cuda.is_available():
        from srel_fast.kernels import _ext

        _ext.require_cuda_extension()


# ----------------------------------------------------------------------------- kernel backends
@pytest.fixture
def triton_interpret():
    """Triton kernels on CPU tensors, in the interpreter (set above when torch sees no GPU).
    On a CUDA machine Triton runs compiled, and the GPU tests cover it instead."""
    pytest.importorskip("triton")
    from srel_fast.kernels._backend import triton_interpret as interpreted

    if not interpreted():
        pytest.skip("Triton runs compiled on this machine (CUDA); the interpreter tests are for CPU-only machines")


@pytest.fixture
def cpu_ext():
    from srel_fast.kernels import _ext

    if not _ext.has_op("bn_stat_loss", "cpu"):
        pytest.skip(f"C++ extension with bn_stat_loss could not be built/loaded: {_ext.load_error()}")


@pytest.fixture
def backend(request):
    """An indirectly parametrised kernel backend of the BN statistics ops, skipped where it cannot run."""
    name = request.param
    if name == "cpu":
        request.getfixturevalue("cpu_ext")
    elif name == "triton":
        request.getfixturevalue("triton_interpret")
    return name


# dtype -> (loss rtol, grad tol relative to max |grad|) of the BN statistics ops
BN_TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (1e-4, 2e-3), torch.bfloat16: (1e-4, 1.6e-2)}


def make_bn_input(shape, layout, dtype, seed=0, loc=0.5, scale=2.0):
    """A BN input (contiguous, channels_last or (N, L, C) "transposed") and running mean/var."""
    g = torch.Generator().manual_seed(seed)
    if layout == "transposed":
        n, c, l = shape
        x = (torch.randn(n, l, c, generator=g) * scale + loc).to(dtype).transpose(1, 2)
    else:
        x = (torch.randn(shape, generator=g) * scale + loc).to(dtype)
        if layout == "channels_last":
            x = x.to(memory_format=torch.channels_last)
    c = shape[1]
    rm = torch.randn(c, generator=g)
    rv = torch.rand(c, generator=g) * 3 + 0.5
    return x, rm, rv


def gpu_backends(op):
    """The backends of kernel op ``op`` that run on CUDA tensors here."""
    from srel_fast.kernels import _ext
    from srel_fast.kernels._backend import triton_available

    out = ["torch"]
    if triton_available():
        out.append("triton")
    if _ext.has_op(op, "cuda"):
        out.append("cuda")
    return out


# ----------------------------------------------------------------------------- recovery runs
def recover(teacher, out, **kw):
    """A small recovery run (2 images per class, 6 iterations) on the CPU."""
    from srel_fast.recover import RecoverConfig, run_recover

    cfg = dict(out=str(out), weights=teacher, ipc=2, iterations=6, batch_size=4, device="cpu", progress=False)
    cfg.update(kw)
    return run_recover(RecoverConfig(**cfg))


def tree_bytes(root):
    """{relative path: bytes} of the PNG images of a recovery tree."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            if f.endswith(".png"):
                out[os.path.relpath(os.path.join(dirpath, f), root)] = open(os.path.join(dirpath, f), "rb").read()
    return out
