import os

import pytest
import torch

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
