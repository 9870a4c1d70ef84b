"""torchrun on the CPU (gloo, 2 processes) gives what one process gives, in every stage;
and the compact soft-label store's format (index dtype, memory-mapped reads, spread mode, sizes)."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import tree_bytes
from srel_fast.models import load_model
from srel_fast.recover import RecoverConfig, run_recover
from srel_fast.crop_plan import epoch_plan, make_inputs
from srel_fast.images import load_synthetic
from srel_fast.relabel import RelabelConfig, run_relabel
from srel_fast.soft_labels import SoftLabelStore, index_dtype, reference_bytes
from srel_fast.train import TrainConfig, run_train


def _torchrun(*args, nproc=2, timeout=240):
    launcher = [shutil.which("torchrun")] if shutil.which("torchrun") else [sys.executable, "-m", "torch.distributed.run"]
    cmd = [*launcher, "--standalone", f"--nproc_per_node={nproc}", "-m", "srel_fast.cli", *[str(a) for a in args]]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def _assert_same_weights(path_a, path_b, atol=1e-5, zero_grad_params_free=False):
    """Every tensor equal within float tolerance. With ``zero_grad_params_free`` (Adam/AdamW),
    the bias of a conv that feeds a BatchNorm and that BN's running mean are left out: the
    bias's true gradient is exactly zero (BN subtracts any per-channel constant), so it only
    sees float-rounding noise, which Adam normalises into lr-sized steps whose sign depends
    on the summation order. Those biases change nothing the network computes, so the
    networks' outputs are compared instead."""
    ma, mb = load_model(str(path_a)).model, load_model(str(path_b)).model
    a, b = ma.state_dict(), mb.state_dict()
    assert a.keys() == b.keys()
    free = set()
    if zero_grad_params_free:
        mods = list(mb.named_modules())
        for (n1, m1), (n2, m2) in zip(mods, mods[1:]):
            if isinstance(m1, torch.nn.Conv2d) and isinstance(m2, torch.nn.BatchNorm2d) and m1.bias is not None:
                free |= {f"{n1}.bias", f"{n2}.running_mean"}
        assert free
    for k in b:
        if k not in free:
            torch.testing.assert_close(a[k].double(), b[k].double(), atol=atol, rtol=1e-4, msg=k)
    from srel_fast.data import load_builtin

    x = load_builtin("digits", "test").images.float() / 255
    with torch.no_grad():
        torch.testing.assert_close(ma.eval()(x), mb.eval()(x), atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def syn_tree(digits_teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("dsyn") / "syn"
    run_recover(RecoverConfig(out=str(out), weights=digits_teacher[0], ipc=2, iterations=3, batch_size=10,
                              device="cpu", progress=False))
    return str(out)


def test_recover_torchrun_is_byte_identical_to_one_process(digits_teacher, tmp_path):
    teacher = digits_teacher[0]
    p = _torchrun("recover", "--weights", teacher, "--ipc", 2, "--iterations", 5, "--batch-size", 4,
                  "--device", "cpu", "--no-progress", "--out", tmp_path / "ddp")
    single = run_recover(RecoverConfig(out=str(tmp_path / "one"), weights=teacher, ipc=2, iterations=5, batch_size=4,
                                       device="cpu", progress=False))
    assert tree_bytes(tmp_path / "ddp") == tree_bytes(tmp_path / "one")
    assert len(tree_bytes(tmp_path / "ddp")) == 20
    # Each rank kept its own progress file; the manifest lists every batch.
    assert sorted(f for f in os.listdir(tmp_path / "ddp") if f.startswith("progress")) == \
        ["progress.rank0.jsonl", "progress.rank1.jsonl"]
    manifest = json.load(open(tmp_path / "ddp" / "manifest.json"))
    assert manifest["completed_batches"] == single["completed_batches"] == 6
    assert "recover" not in p.stdout.split("{")[0]  # no progress output on any rank with --no-progress


def test_squeeze_torchrun_resumes_and_matches_one_process(tmp_path, monkeypatch):
    """One process trains epoch 1 and is interrupted; torchrun (2 ranks, DDP + global BN,
    global batch 64 = 2 x 32) resumes it; the result equals one uninterrupted process."""
    from srel_fast import squeeze as sq

    cfg = dict(data="digits", arch="convnet3", width=8, epochs=2, batch_size=64, lr=0.05, device="cpu", progress=False)
    sq.run_squeeze(sq.SqueezeConfig(out=str(tmp_path / "whole.pt"), **cfg))
    real_save = sq.save_resume_state

    def crash_after_first(*a, **k):
        real_save(*a, **k)
        raise KeyboardInterrupt

    monkeypatch.setattr(sq, "save_resume_state", crash_after_first)
    with pytest.raises(KeyboardInterrupt):
        sq.run_squeeze(sq.SqueezeConfig(out=str(tmp_path / "ddp.pt"), **cfg))
    monkeypatch.setattr(sq, "save_resume_state", real_save)
    assert torch.load(tmp_path / "ddp.pt.resume", weights_only=False)["epoch"] == 1
    p = _torchrun("squeeze", "--data", "digits", "--arch", "convnet3", "--width", 8, "--epochs", 2, "--batch-size", 64,
                  "--lr", 0.05, "--device", "cpu", "--no-progress", "--out", tmp_path / "ddp.pt")
    assert p.stdout.count('"test_accuracy"') == 1  # rank 0 alone prints the summary
    _assert_same_weights(tmp_path / "ddp.pt", tmp_path / "whole.pt")
    assert not os.path.exists(tmp_path / "ddp.pt.resume")
    saved = json.load(open(tmp_path / "ddp.pt.json"))
    assert saved["results"]["world_size"] == 2 and len(saved["results"]["history"]) == 1  # epoch 0 came from the resume


def test_relabel_and_train_under_torchrun_equal_one_process(syn_tree, digits_teacher, tmp_path):
    teacher = digits_teacher[0]
    # Batch 7 over 20 images: batches of 7, 7, 6 -> uneven rank slices (3/4); CutMix on.
    common = ["--syn", syn_tree, "--batch-size", 7, "--cutmix", 0.5, "--device", "cpu", "--no-progress"]
    _torchrun("relabel", *common, "--teacher", teacher, "--epochs", 3, "--topk", 3, "--topk-mode", "spread",
              "--out", tmp_path / "l_ddp")
    run_relabel(RelabelConfig(syn=syn_tree, out=str(tmp_path / "l_one"), teacher=teacher, epochs=3, batch_size=7,
                              cutmix=0.5, topk=3, topk_mode="spread", device="cpu", progress=False))
    files = sorted(f for f in os.listdir(tmp_path / "l_one") if f.endswith(".npy"))
    assert len(files) == 9 and files == sorted(f for f in os.listdir(tmp_path / "l_ddp") if f.endswith(".npy"))
    for f in files:
        assert (tmp_path / "l_ddp" / f).read_bytes() == (tmp_path / "l_one" / f).read_bytes(), f
    res = json.load(open(tmp_path / "l_ddp" / "relabel_results.json"))["results"]
    assert res["world_size"] == 2 and res["store_bytes"] == SoftLabelStore(str(tmp_path / "l_one")).nbytes()

    args = dict(arch="convnet3", width=8, val="digits", epochs=3, batch_size=7, cutmix=0.5, device="cpu")
    _torchrun("train", *common, "--labels", tmp_path / "l_ddp", "--arch", "convnet3", "--width", 8, "--val", "digits",
              "--epochs", 3, "--out", tmp_path / "t_ddp")
    run_train(TrainConfig(syn=syn_tree, out=str(tmp_path / "t_one"), labels=str(tmp_path / "l_one"), progress=False,
                          **args))
    _assert_same_weights(tmp_path / "t_ddp" / "student.pt", tmp_path / "t_one" / "student.pt", zero_grad_params_free=True)
    assert json.load(open(tmp_path / "t_ddp" / "train_results.json"))["world_size"] == 2
    assert not os.path.exists(tmp_path / "t_ddp" / "train.resume")


def test_rank_slice_of_a_planned_batch_equals_the_whole_batch(syn_tree, digits_teacher):
    images, _, _ = load_synthetic(syn_tree, load_model(digits_teacher[0]), torch.device("cpu"))
    plan = RelabelConfig(syn_tree, "", "", batch_size=7, cutmix=1.0).plan(images.shape)
    for pb in epoch_plan(plan, 2, 20, 8, 8):
        whole = make_inputs(images, pb, (8, 8))
        parts = [make_inputs(images, pb, (8, 8), rows=slice(lo, hi)) for lo, hi in ((0, 3), (3, len(pb.indices)))]
        torch.testing.assert_close(torch.cat(parts), whole, atol=1e-6, rtol=0)


def test_index_dtype_and_reference_bytes():
    assert index_dtype(10) == np.int16 and index_dtype(32767) == np.int16 and index_dtype(32768) == np.int32
    ref = reference_bytes(epochs=2, num_images=10, num_classes=5, batch_size=4, cutmix=0.5)
    # per crop: fp16 logits 10 B, coords 16 B, flip 1 B, mix index 8 B; per batch (3): lambda 8 B + box 32 B
    assert ref == {"logits": 200, "crop_flip": 340, "mix": 2 * (80 + 120), "total": 940}
    assert reference_bytes(2, 10, 5, 4, 0.0)["mix"] == 0


def test_spread_store_keeps_true_probabilities_and_reads_are_mapped(syn_tree, digits_teacher, tmp_path):
    teacher = load_model(digits_teacher[0])
    res = run_relabel(RelabelConfig(syn=syn_tree, out=str(tmp_path / "s"), teacher=digits_teacher[0], epochs=1,
                                    batch_size=8, topk=2, topk_mode="spread", device="cpu", progress=False))
    store = SoftLabelStore(str(tmp_path / "s"))
    values, indices = store.epoch_logits(0)
    assert isinstance(values, np.memmap) and isinstance(indices, np.memmap)
    assert values.dtype == np.float16 and indices.dtype == np.int16 and store.meta["index_dtype"] == "int16"
    assert np.load(store._path(0, "lse"), mmap_mode="r").dtype == np.float16
    # payload: 20 crops x (2 fp16 values + 2 int16 indices + 1 fp16 lse gap) = 20 x 10 bytes
    assert res["store_payload_bytes"] == 200 and res["full_fp16_bytes"] == 20 * 10 * 2
    images, _, _ = load_synthetic(syn_tree, teacher, torch.device("cpu"))
    row = 0
    for pb in epoch_plan(RelabelConfig(syn_tree, "", "", batch_size=8).plan(images.shape), 0, 20, 8, 8):
        with torch.no_grad():
            p = F.softmax(teacher.model.eval()(make_inputs(images, pb, (8, 8))) / 20.0, 1)
        got = store.soft_targets(0, slice(row, row + len(pb.indices)), 20.0, "cpu")
        torch.testing.assert_close(got.sum(1), torch.ones(len(pb.indices)), atol=1e-5, rtol=0)
        top = p.topk(2, 1)
        torch.testing.assert_close(got.gather(1, top.indices), top.values, atol=2e-3, rtol=0)
        rest = (1 - top.values.sum(1, keepdim=True)) / 8
        mask = torch.ones_like(p, dtype=torch.bool).scatter_(1, top.indices, False)
        torch.testing.assert_close(got[mask].view(-1, 8), rest.expand(-1, 8), atol=2e-3, rtol=0)
        row += len(pb.indices)
    from srel_fast.errors import UserError

    with pytest.raises(UserError, match="same --temperature"):
        store.soft_targets(0, slice(0, 4), 4.0, "cpu")
