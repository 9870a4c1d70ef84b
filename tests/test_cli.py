import os
import subprocess
import sys

import pytest

from conftest import run_cli


def _one_sentence(err):
    lines = [l for l in err.strip().splitlines() if l.strip()]
    return len(lines) == 1 and lines[0].startswith("srel-fast: error:") and "Traceback" not in err


@pytest.mark.parametrize("sub", ["squeeze", "recover", "relabel", "train", "demo"])
def test_help(sub):
    out = subprocess.run([sys.executable, "-m", "srel_fast.cli", sub, "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--seed" in out.stdout


def test_missing_data_path(tmp_path, capsys):
    code, err = run_cli(["squeeze", "--data", tmp_path / "nope", "--out", tmp_path / "t.pt", "--epochs", 1], capsys)
    assert code == 2 and _one_sentence(err) and "does not exist" in err
    assert not os.path.exists(tmp_path / "t.pt")


def test_unknown_arch(tmp_path, capsys):
    code, err = run_cli(["squeeze", "--data", "digits", "--arch", "resnet9000", "--out", tmp_path / "t.pt", "--epochs", 1], capsys)
    assert code == 2 and _one_sentence(err) and "unknown arch" in err
    assert not os.listdir(tmp_path)


def test_model_without_bn(tmp_path, capsys):
    code, err = run_cli(["squeeze", "--data", "digits", "--arch", "convnet3-in", "--out", tmp_path / "t.pt", "--epochs", 1], capsys)
    assert code == 2 and _one_sentence(err) and "no BatchNorm" in err
    assert not os.listdir(tmp_path)


def test_ipc_zero(digits_teacher, tmp_path, capsys):
    code, err = run_cli(["recover", "--weights", digits_teacher[0], "--ipc", 0, "--out", tmp_path / "s"], capsys)
    assert code == 2 and _one_sentence(err) and "--ipc" in err
    assert not os.path.exists(tmp_path / "s")


def test_nonfinite_loss(digits_teacher, tmp_path, capsys):
    # SRe2L's objective from noise (the first layer x10 makes the BN term overflow at r_bn 1e38)
    code, err = run_cli(["recover", "--weights", digits_teacher[0], "--ipc", 1, "--iterations", 3, "--r-bn", 1e38,
                         "--init", "noise", "--r-class", 0, "--first-bn-multiplier", 10,
                         "--device", "cpu", "--no-progress", "--out", tmp_path / "s"], capsys)
    assert code == 2 and _one_sentence(err) and "non-finite" in err
    assert not [f for f in os.listdir(tmp_path / "s") if f.isdigit()]


def test_recover_from_cli(digits_teacher, tmp_path, capsys):
    code, _ = run_cli(["recover", "--weights", digits_teacher[0], "--ipc", 1, "--iterations", 2, "--device", "cpu",
                       "--no-progress", "--out", tmp_path / "s"], capsys)
    assert code == 0 and len(os.listdir(tmp_path / "s" / "00009")) == 1
    assert os.path.exists(tmp_path / "s" / "manifest.json")
