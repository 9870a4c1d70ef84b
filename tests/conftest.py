import os

import pytest
import torch


def wants_triton_interpreter() -> bool:
    """Run Triton kernels in the interpreter (on CPU tensors) exactly when torch sees
    no CUDA device. Asking torch, not the file system (/dev/nvidia0), matters: a GPU
    test that ran in the interpreter would pass while testing no compiled kernel."""
    return not torch.cuda.is_available()


# Triton reads TRITON_INTERPRET when a kernel is decorated, i.e. when its module is
# first imported; set it before any test module imports srel_fast.kernels.
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
