import os

# Triton reads TRITON_INTERPRET when a kernel is decorated, i.e. when its module is
# first imported; set it before any test module imports srel_fast.kernels so the
# Triton kernels run on CPU tensors wherever there is no GPU.
if not os.path.exists("/dev/nvidia0"):  # no GPU on this machine
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

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
