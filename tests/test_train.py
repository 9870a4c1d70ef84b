import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from srel_fast.errors import UserError
from srel_fast.models import ModelSpec, build_model, load_model, save_checkpoint
from srel_fast.recover import RecoverConfig, run_recover
from srel_fast.crop_plan import epoch_plan, make_inputs
from srel_fast.images import load_synthetic
from srel_fast.relabel import RelabelConfig, run_relabel
from srel_fast.soft_labels import SoftLabelStore
from srel_fast.train import TrainConfig, run_train


@pytest.fixture(scope="module")
def syn_tree(digits_teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("syn") / "syn"
    run_recover(RecoverConfig(out=str(out), weights=digits_teacher[0], ipc=2, iterations=5, batch_size=10,
                              device="cpu", progress=False))
    return str(out)


def _train(syn, teacher, out, **kw):
    cfg = dict(syn=syn, out=str(out), val="digits", arch="convnet3", teacher=teacher, epochs=2, batch_size=8,
               width=8, device="cpu", progress=False)
    cfg.update(kw)
    return run_train(TrainConfig(**cfg))


def test_train_online_is_reproducible_and_writes_results(syn_tree, digits_teacher, tmp_path):
    r1 = _train(syn_tree, digits_teacher[0], tmp_path / "s1")
    _train(syn_tree, digits_teacher[0], tmp_path / "s2")
    a, b = load_model(str(tmp_path / "s1" / "student.pt")), load_model(str(tmp_path / "s2" / "student.pt"))
    for k, v in a.model.state_dict().items():
        assert torch.equal(v, b.model.state_dict()[k])
    saved = json.load(open(tmp_path / "s1" / "train_results.json"))
    assert saved["results"]["test_accuracy"] == r1["test_accuracy"] and saved["num_images"] == 20
    assert not os.path.exists(tmp_path / "s1" / "train.resume")


@pytest.mark.parametrize("topk", [None, 3])
def test_stored_labels_match_online_teacher(syn_tree, digits_teacher, tmp_path, topk):
    teacher = load_model(digits_teacher[0])
    res = run_relabel(RelabelConfig(syn=syn_tree, out=str(tmp_path / "labels"), teacher=digits_teacher[0], epochs=2,
                                    batch_size=8, topk=topk, cutmix=0.5, device="cpu", progress=False))
    store = SoftLabelStore(str(tmp_path / "labels"))
    assert res["store_bytes"] == store.nbytes() > 0
    images, _, _ = load_synthetic(syn_tree, teacher, torch.device("cpu"))
    row = 0
    model = teacher.model.eval()
    for pb in epoch_plan(RelabelConfig(syn_tree, "", "", batch_size=8, cutmix=0.5).plan(images.shape), 1, 20, 8, 8):
        with torch.no_grad():
            logits = model(make_inputs(images, pb, (8, 8)))
        got = store.soft_targets(1, slice(row, row + len(pb.indices)), 20.0, "cpu")
        if topk is None:
            want = F.softmax(logits / 20.0, 1)
        else:
            v, i = logits.topk(topk, 1)
            want = torch.zeros_like(logits).scatter_(1, i, F.softmax(v / 20.0, 1))
            assert int((got > 0).sum(1).max()) == topk
        torch.testing.assert_close(got, want, atol=2e-3, rtol=0)
        row += len(pb.indices)
    assert row == 20
    # The student trains from the store with the same crop plan.
    r = _train(syn_tree, None, tmp_path / "from_store", labels=str(tmp_path / "labels"), cutmix=0.5)
    assert 0 <= r["test_accuracy"] <= 100
    with pytest.raises(UserError, match="same --batch-size"):
        _train(syn_tree, None, tmp_path / "wrong", labels=str(tmp_path / "labels"), cutmix=0.5, batch_size=4)
    with pytest.raises(UserError, match="no labels for epoch 2"):
        _train(syn_tree, None, tmp_path / "long", labels=str(tmp_path / "labels"), cutmix=0.5, epochs=3)


def test_epoch_plan_is_deterministic_and_covers_every_image():
    from srel_fast.crop_plan import CropPlanConfig

    p1 = epoch_plan(CropPlanConfig(seed=3, batch_size=7), 4, 30, 16, 16)
    p2 = epoch_plan(CropPlanConfig(seed=3, batch_size=7), 4, 30, 16, 16)
    assert sorted(torch.cat([b.indices for b in p1]).tolist()) == list(range(30))
    for a, b in zip(p1, p2):
        assert torch.equal(a.indices, b.indices) and torch.equal(a.params.boxes, b.params.boxes)
    p3 = epoch_plan(CropPlanConfig(seed=3, batch_size=7), 5, 30, 16, 16)
    assert not torch.equal(p1[0].params.boxes, p3[0].params.boxes)


def test_teacher_class_count_mismatch_refused(syn_tree, tmp_path):
    spec = ModelSpec("convnet3", 5, 1, 8, width=8)
    path = str(tmp_path / "t5.pt")
    save_checkpoint(path, build_model(spec), spec, (0.3,), (0.3,), list("abcde"))
    with pytest.raises(UserError, match="teacher has 5 classes but the synthetic set"):
        _train(syn_tree, path, tmp_path / "x")


def test_hard_label_mode_needs_no_teacher(syn_tree, tmp_path):
    r = _train(syn_tree, None, tmp_path / "hard", label_mode="hard")
    assert 0 <= r["test_accuracy"] <= 100
    with pytest.raises(UserError, match="needs --teacher"):
        _train(syn_tree, None, tmp_path / "soft")
