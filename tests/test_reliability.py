"""Interrupted runs resume exactly; failures keep finished work; nothing is half-written."""
import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import recover, run_cli, tree_bytes
from srel_fast.models import load_model


def _cli(*args):
    return [sys.executable, "-m", "srel_fast.cli", *[str(a) for a in args]]


def _kill_when(cmd, ready, timeout=240, env=None):
    """Start ``cmd``, SIGKILL it as soon as ``ready()`` holds, return True if it was killed mid-run."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if ready():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.05)
    proc.wait()
    return False


def _lines(path):
    return sum(1 for _ in open(path)) if os.path.exists(path) else 0


def test_recover_sigkill_then_rerun_is_byte_identical(digits_teacher, tmp_path):
    teacher = digits_teacher[0]
    args = ["recover", "--weights", teacher, "--ipc", 3, "--iterations", 40, "--batch-size", 4,
            "--device", "cpu", "--no-progress"]
    killed = _kill_when(_cli(*args, "--out", tmp_path / "killed"),
                        lambda: _lines(tmp_path / "killed" / "progress.jsonl") >= 2)
    assert killed, "the run finished before it could be killed"
    n_before = len(tree_bytes(tmp_path / "killed"))
    assert 0 < n_before < 30
    assert subprocess.run(_cli(*args, "--out", tmp_path / "killed"), capture_output=True).returncode == 0
    assert subprocess.run(_cli(*args, "--out", tmp_path / "whole"), capture_output=True).returncode == 0
    whole = tree_bytes(tmp_path / "whole")
    assert len(whole) == 30 and tree_bytes(tmp_path / "killed") == whole
    assert not [f for _, _, fs in os.walk(tmp_path / "killed") for f in fs if f.endswith(".tmp")]


def test_recover_two_processes_equal_one(digits_teacher, tmp_path):
    teacher = digits_teacher[0]
    args = ["recover", "--weights", teacher, "--ipc", 2, "--iterations", 5, "--batch-size", 4,
            "--device", "cpu", "--no-progress", "--out", tmp_path / "sharded"]
    procs = [subprocess.Popen(_cli(*args), env={**os.environ, "RANK": str(r), "WORLD_SIZE": "2"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for r in range(2)]
    for p in procs:
        assert p.wait() == 0, p.stderr.read().decode()
    recover(teacher, tmp_path / "single", ipc=2, iterations=5, batch_size=4)
    assert tree_bytes(tmp_path / "sharded") == tree_bytes(tmp_path / "single")


def test_train_sigkill_then_rerun_gives_same_weights(digits_teacher, tmp_path):
    teacher = digits_teacher[0]
    recover(teacher, tmp_path / "syn", ipc=2, iterations=3, batch_size=10)
    args = ["train", "--syn", tmp_path / "syn", "--teacher", teacher, "--arch", "convnet3", "--width", 8,
            "--val", "digits", "--epochs", 40, "--batch-size", 8, "--device", "cpu", "--no-progress"]
    resume = tmp_path / "killed" / "train.resume"
    killed = _kill_when(_cli(*args, "--out", tmp_path / "killed"), lambda: os.path.exists(resume))
    assert killed and not os.path.exists(tmp_path / "killed" / "student.pt")
    epoch_at_kill = torch.load(resume, weights_only=False)["epoch"]
    assert 0 < epoch_at_kill < 40
    assert subprocess.run(_cli(*args, "--out", tmp_path / "killed"), capture_output=True).returncode == 0
    assert subprocess.run(_cli(*args, "--out", tmp_path / "whole"), capture_output=True).returncode == 0
    a = load_model(str(tmp_path / "killed" / "student.pt")).model.state_dict()
    b = load_model(str(tmp_path / "whole" / "student.pt")).model.state_dict()
    for k in b:
        assert torch.equal(a[k], b[k]), k


def test_squeeze_resumes_from_epoch_checkpoint(tmp_path, monkeypatch):
    from srel_fast import squeeze as sq

    cfg = dict(data="digits", arch="convnet3", width=8, epochs=3, batch_size=64, lr=0.05, device="cpu", progress=False)
    sq.run_squeeze(sq.SqueezeConfig(out=str(tmp_path / "whole.pt"), **cfg))
    # Interrupt after the second epoch's checkpoint: the epoch-end save raises on the 2nd call.
    real_save, calls = sq.save_resume_state, []

    def crash_after_two(*a, **k):
        real_save(*a, **k)
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(sq, "save_resume_state", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        sq.run_squeeze(sq.SqueezeConfig(out=str(tmp_path / "part.pt"), **cfg))
    monkeypatch.setattr(sq, "save_resume_state", real_save)
    assert not os.path.exists(tmp_path / "part.pt") and os.path.exists(tmp_path / "part.pt.resume")
    sq.run_squeeze(sq.SqueezeConfig(out=str(tmp_path / "part.pt"), **cfg))
    a, b = load_model(str(tmp_path / "whole.pt")), load_model(str(tmp_path / "part.pt"))
    for k, v in a.model.state_dict().items():
        assert torch.equal(v, b.model.state_dict()[k]), k
    assert not os.path.exists(tmp_path / "part.pt.resume")
    # Another config is not mixed into an interrupted run.
    torch.save({"config": {"other": 1}}, tmp_path / "x.pt.resume")
    with pytest.raises(Exception, match="different config"):
        sq.run_squeeze(sq.SqueezeConfig(out=str(tmp_path / "x.pt"), **cfg))


def test_every_stage_treats_an_existing_output_alike(tmp_path):
    """srel_fast.files.check_output: the rules of --overwrite and resuming that every stage follows."""
    from srel_fast.errors import UserError
    from srel_fast.files import NEW, REPLACE, RESUME, check_output, write_json

    f = tmp_path / "teacher.pt"   # a finished output file (squeeze, train)
    assert check_output(str(f), False) == NEW
    f.write_text("x")
    with pytest.raises(UserError, match="already exists; use --overwrite"):
        check_output(str(f), False)
    assert check_output(str(f), True) == REPLACE
    d, record = tmp_path / "run", tmp_path / "run" / "run.json"   # an output directory (recover, relabel)
    same, other = (lambda old: []), (lambda old: ["lr"])
    kw = dict(record=str(record), what="run")
    assert check_output(str(d), False, differences=same, **kw) == NEW
    d.mkdir()
    (d / ".run.json.x1.tmp").write_text("")   # another process's record being written
    assert check_output(str(d), False, differences=same, **kw) == NEW
    write_json(str(record), {})
    assert check_output(str(d), False, differences=same, **kw) == RESUME
    with pytest.raises(UserError, match=r"different config \(lr\); use another --out or --overwrite"):
        check_output(str(d), False, differences=other, **kw)
    assert check_output(str(d), True, differences=other, **kw) == REPLACE
    with pytest.raises(UserError, match="several processes"):
        check_output(str(d), True, differences=same, processes=2, **kw)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    kw = dict(record=str(tmp_path / "mine" / "run.json"), what="run")
    with pytest.raises(UserError, match="not empty and holds no run"):
        check_output(str(tmp_path / "mine"), False, **kw)
    with pytest.raises(UserError, match="refusing to delete them even with --overwrite"):
        check_output(str(tmp_path / "mine"), True, **kw)
    with pytest.raises(UserError, match="is not a directory"):
        check_output(str(f), False, record=str(tmp_path / "x.json"))


def test_full_disk_leaves_no_truncated_image_and_rerun_completes(digits_teacher, tmp_path, monkeypatch, capsys):
    from srel_fast import files

    teacher = digits_teacher[0]
    real_replace, count = os.replace, []

    def replace_fails_on_fifth(src, dst):
        count.append(dst)
        if str(dst).endswith(".png") and len([d for d in count if str(d).endswith(".png")]) == 5:
            with open(src, "r+b") as f:  # the disk filled up half-way through this image
                f.truncate(10)
            raise OSError(errno.ENOSPC, "No space left on device", str(dst))
        return real_replace(src, dst)

    monkeypatch.setattr(files.os, "replace", replace_fails_on_fifth)
    args = ["recover", "--weights", teacher, "--ipc", 1, "--iterations", 3, "--batch-size", 4, "--device", "cpu",
            "--no-progress", "--out", tmp_path / "s"]
    code, err = run_cli(args, capsys)
    assert code == 2 and "No space left on device" in err and "Traceback" not in err
    pngs = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "s") for f in fs if f.endswith(".png")]
    assert len(pngs) == 4 and not [f for _, _, fs in os.walk(tmp_path / "s") for f in fs if f.endswith(".tmp")]
    from PIL import Image

    for p in pngs:
        Image.open(p).load()  # every image on disk is complete
    monkeypatch.setattr(files.os, "replace", real_replace)
    assert run_cli(args, capsys)[0] == 0
    assert tree_bytes(tmp_path / "s") == tree_bytes(recover(teacher, tmp_path / "ref", ipc=1, iterations=3)["config"]["out"])


def test_unreadable_synthetic_image_is_named(digits_teacher, tmp_path, capsys):
    teacher = digits_teacher[0]
    recover(teacher, tmp_path / "syn", ipc=1, iterations=2, batch_size=10)
    bad = tmp_path / "syn" / "00004" / "ipc00000.png"
    bad.write_bytes(b"\x89PNG broken")
    code, err = run_cli(["train", "--syn", tmp_path / "syn", "--teacher", teacher, "--arch", "convnet3", "--val", "digits",
                         "--epochs", 1, "--device", "cpu", "--no-progress", "--out", tmp_path / "st"], capsys)
    assert code == 2 and str(bad) in err and not os.path.exists(tmp_path / "st")


def test_weights_that_are_not_a_checkpoint(tmp_path, capsys):
    junk = tmp_path / "w.pt"
    junk.write_text("hello")
    code, err = run_cli(["recover", "--weights", junk, "--arch", "resnet18", "--ipc", 1, "--out", tmp_path / "s"], capsys)
    assert code == 2 and "not a PyTorch checkpoint" in err and not os.path.exists(tmp_path / "s")


def test_skip_mode_reports_failed_batches_and_exits_nonzero(digits_teacher, tmp_path, capsys):
    code, err = run_cli(["recover", "--weights", digits_teacher[0], "--ipc", 1, "--iterations", 2, "--r-bn", 1e38,
                         "--init", "noise", "--r-class", 0, "--first-bn-multiplier", 10,
                         "--on-nonfinite", "skip", "--device", "cpu", "--no-progress", "--out", tmp_path / "s"], capsys)
    assert code == 1 and "(ipc 0, batch 0)" in err


@pytest.fixture()
def small_jpeg_tree(tmp_path):
    from srel_fast.bench.jpeg_tree import make_fashion_mnist_jpeg_tree

    root = tmp_path / "tree"
    make_fashion_mnist_jpeg_tree(root, per_class=4, split="test")
    return root


@pytest.mark.parametrize("loader", ["torch", "dali"])
def test_corrupt_image_in_data_tree_is_named(small_jpeg_tree, tmp_path, capsys, loader):
    from srel_fast.loaders import dali_available

    if loader == "dali" and not dali_available():
        pytest.skip("NVIDIA DALI is not installed")
    first_class = sorted(os.listdir(small_jpeg_tree))[0]
    bad = small_jpeg_tree / first_class / sorted(os.listdir(small_jpeg_tree / first_class))[0]
    bad.write_bytes(b"\xff\xd8\xff not really a jpeg")
    code, err = run_cli(["squeeze", "--data", small_jpeg_tree, "--arch", "convnet3", "--width", 4, "--epochs", 1,
                         "--batch-size", 8, "--image-size", 16, "--loader", loader, "--num-workers", 1,
                         "--device", "cpu", "--no-progress", "--out", tmp_path / "t.pt"], capsys)
    assert code == 2 and "Traceback" not in err and bad.name in err
    assert not os.path.exists(tmp_path / "t.pt")


def test_empty_class_folder_refused(small_jpeg_tree, tmp_path, capsys):
    (small_jpeg_tree / "zz-empty").mkdir()
    code, err = run_cli(["squeeze", "--data", small_jpeg_tree, "--epochs", 1, "--out", tmp_path / "t.pt"], capsys)
    assert code == 2 and "zz-empty" in err and "is empty" in err and not os.listdir(tmp_path / "tree" / "zz-empty")
    assert not os.path.exists(tmp_path / "t.pt")


@pytest.mark.parametrize("args,msg", [(["--batch-size", 0], "--batch-size"), (["--epochs", 0], "--epochs")])
def test_bad_ranges_at_the_cli(tmp_path, capsys, args, msg):
    code, err = run_cli(["squeeze", "--data", "digits", "--out", tmp_path / "t.pt", *args], capsys)
    assert code == 2 and msg in err and not os.listdir(tmp_path)


def test_recover_batch_size_zero(digits_teacher, tmp_path, capsys):
    code, err = run_cli(["recover", "--weights", digits_teacher[0], "--ipc", 1, "--batch-size", 0, "--out", tmp_path / "s"],
                        capsys)
    assert code == 2 and "--batch-size" in err and not os.path.exists(tmp_path / "s")


def test_atomic_write_removes_what_a_killed_writer_of_the_same_file_left(tmp_path):
    """A writer killed between mkstemp and rename leaves '.NAME.HOST.PID.XXXX.tmp' (or, before
    writers were tagged, '.NAME.XXXX.tmp'); the next successful write of NAME removes those of
    dead writers, and leaves alone other files' temporaries and those of writers still running
    (recovery's ranks may write the same record at once) or running on another host."""
    import platform
    import subprocess

    from srel_fast.files import atomic_write_bytes

    host = platform.node() or "host"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    dead_pid = int(dead.stdout)
    stale = tmp_path / ".ipc00002.png.abc123.tmp"
    stale_tagged = tmp_path / f".ipc00002.png.{host}.{dead_pid}.x1y2z3.tmp"
    live = tmp_path / f".ipc00002.png.{host}.{os.getppid()}.q9w8e7.tmp"
    other_host = tmp_path / f".ipc00002.png.{host}-elsewhere.{dead_pid}.r5t6y7.tmp"
    other = tmp_path / ".ipc00003.png.def456.tmp"
    for f in (stale, stale_tagged, live, other_host, other):
        f.write_bytes(b"partial")
    atomic_write_bytes(str(tmp_path / "ipc00002.png"), b"image")
    assert (tmp_path / "ipc00002.png").read_bytes() == b"image"
    assert not stale.exists() and not stale_tagged.exists()
    assert live.exists() and other_host.exists() and other.exists()
    assert sorted(os.listdir(tmp_path)) == sorted(f.name for f in (tmp_path / "ipc00002.png", live, other_host, other))


def _write_the_same_record(path: str, writer: int, times: int) -> None:
    from srel_fast.files import write_json

    for i in range(times):
        write_json(path, {"writer": writer, "i": i})


def test_processes_writing_the_same_record_at_once_all_succeed(tmp_path):
    """Recovery's ranks share no process group, so each may write recover_config.json at once:
    one writer's clean-up must not delete another's temporary file in flight."""
    import multiprocessing

    path = str(tmp_path / "recover_config.json")
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_write_the_same_record, args=(path, w, 300)) for w in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert json.load(open(path))["i"] == 299
    assert os.listdir(tmp_path) == ["recover_config.json"]
