"""Issue 19: any ImageFolder works with no flags (size, channels, normalisation, evaluation transform,
arch, batch, memory), resume states load safely, and recover's progress line moves."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from own_data_trees import tree_mean_std, write_tree
from srel_fast import inspect_data
from srel_fast.errors import UserError
from srel_fast.inspect_data import choose_for_folder
from srel_fast.models import IMAGENET_MEAN_STD
from srel_fast.recover import RecoverConfig, run_recover
from srel_fast.relabel import RelabelConfig, run_relabel
from srel_fast.squeeze import SqueezeConfig, run_squeeze
from srel_fast.train import TrainConfig, run_train

TREES = {
    # name: (write_tree kwargs, size, channels, val_resize, arch)
    "grey28png": (dict(size=28, channels=1, fmt="png"), 28, 1, "none", "convnet3"),
    "colour32png": (dict(size=32, channels=3, fmt="png"), 32, 3, "none", "convnet3"),
    "colour64jpg": (dict(size=64, channels=3, fmt="jpg"), 64, 3, "none", "resnet18-small"),
    # shorter sides 40, 96, 150, 150 (one image in four of each): median 123 -> resize-crop, resnet18-small
    "mixed": (dict(size=[(40, 40), (96, 120), (150, 150), (200, 150)], channels=3, fmt="png"), 123, 3,
              "resize-crop", "resnet18-small"),
}


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    root = tmp_path_factory.mktemp("own_data")
    return {name: write_tree(root / name, classes=3, per_class=8, **kw) for name, (kw, *_) in TREES.items()}


@pytest.mark.parametrize("name", list(TREES))
def test_inferred_choices(trees, name, capsys):
    _, size, channels, val_resize, arch = TREES[name]
    ch = choose_for_folder(trees[name], trees[name], None, "auto", None, None, 256)
    assert (ch.image_size, ch.channels, ch.val_resize, ch.arch) == (size, channels, val_resize, arch)
    assert ch.batch_size == 24   # 256 > the 24 images: the data set's size
    mean, std = tree_mean_std(trees[name], channels)
    np.testing.assert_allclose(ch.norm.mean, mean, atol=1e-4)
    np.testing.assert_allclose(ch.norm.std, std, atol=1e-4)
    err = capsys.readouterr().err
    assert f"image size {size}" in err and f"arch {arch}" in err and "warning: squeeze: --batch-size 256" in err
    # the statistics are cached beside the data and reused
    assert os.path.exists(os.path.join(trees[name], inspect_data.STATS_CACHE))
    again = choose_for_folder(trees[name], trees[name], None, "dataset", None, None, 8)
    assert again.norm == ch.norm and again.reasons["normalization"].startswith("cached")


def test_flags_override_and_imagenet(trees, tmp_path):
    ch = choose_for_folder(trees["colour64jpg"], trees["colour64jpg"], 48, "imagenet", "resize-crop", "convnet4", 8)
    assert (ch.image_size, ch.val_resize, ch.arch) == (48, "resize-crop", "convnet4")
    assert (ch.norm.mean, ch.norm.std) == IMAGENET_MEAN_STD
    with pytest.raises(UserError, match="3-channel images but .* 1-channel"):
        choose_for_folder(trees["grey28png"], trees["grey28png"], None, "imagenet", None, None, 8)
    # ImageNet-sized colour images: capped at 224, ImageNet's statistics, resize + crop, ResNet-18
    big = write_tree(tmp_path / "big", classes=2, per_class=2, size=[(300, 256)], channels=3, fmt="jpg")
    ch = choose_for_folder(big, big, None, "auto", None, None, 4)
    assert (ch.image_size, ch.val_resize, ch.arch) == (224, "resize-crop", "resnet18")
    assert (ch.norm.mean, ch.norm.std) == IMAGENET_MEAN_STD


def test_eval_transform_by_size(trees):
    """The evaluation loader of the inferred choice: raw images at <= 64 px, resize + crop above."""
    from srel_fast.loaders import LoaderConfig, build_loader

    for name in ("grey28png", "mixed"):
        ch = choose_for_folder(trees[name], trees[name], None, "auto", None, None, 8)
        loader = build_loader(LoaderConfig(root=trees[name], train=False, image_size=ch.image_size, batch_size=24,
                                           mean=ch.norm.mean, std=ch.norm.std, channels=ch.channels, loader="torch",
                                           num_workers=0, val_resize=ch.val_resize == "resize-crop"))
        x, _ = next(iter(loader))
        assert tuple(x.shape[1:]) == (ch.channels, ch.image_size, ch.image_size)
        if name == "grey28png":   # exactly the stored pixels, normalised
            first = os.path.join(trees[name], "class0", "img0000.png")
            raw = torch.from_numpy(np.asarray(Image.open(first), dtype=np.float32) / 255)
            torch.testing.assert_close(x[0, 0], (raw - ch.norm.mean[0]) / ch.norm.std[0], atol=1e-5, rtol=0)


def test_default_arch_and_size_rules():
    assert [inspect_data.default_arch(s)[0] for s in (8, 28, 32, 63, 64, 100, 128, 224)] == [
        "convnet3", "convnet3", "convnet3", "convnet3", "resnet18-small", "resnet18-small", "resnet18", "resnet18"]


# -- end to end on the 28x28 grey tree -------------------------------------------------------------

@pytest.fixture(scope="module")
def grey_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("grey28")
    write_tree(root / "train", classes=4, per_class=60, size=28, channels=1, seed=0)
    write_tree(root / "val", classes=4, per_class=20, size=28, channels=1, seed=1)
    return str(root)


def _pipeline(data, out, explicit: bool):
    flags = dict(image_size=28, arch="convnet3", normalization="dataset", val_resize="none") if explicit else {}
    teacher = os.path.join(out, "teacher.pt")
    sq = run_squeeze(SqueezeConfig(data=data, out=teacher, width=16, epochs=2, batch_size=48, lr=0.05, num_workers=0,
                                   device="cpu", progress=False, **flags))
    syn = os.path.join(out, "syn")
    run_recover(RecoverConfig(out=syn, weights=teacher, ipc=2, iterations=30, device="cpu", progress=False))
    student = {"arch": "convnet3", "val_resize": "none"} if explicit else {}
    tr = run_train(TrainConfig(syn=syn, out=os.path.join(out, "student"), val=data, teacher=teacher, width=16,
                               epochs=20, lr=0.01, batch_size=4, device="cpu", loader="torch", progress=False,
                               **student))
    return sq, tr, teacher, syn


def test_end_to_end_without_size_flags(grey_data, tmp_path, capsys):
    sq_auto, tr_auto, teacher, syn = _pipeline(grey_data, str(tmp_path / "auto"), explicit=False)
    err = capsys.readouterr().err
    assert "image size 28" in err and "channels 1" in err and "arch convnet3" in err
    ck = torch.load(teacher, map_location="cpu", weights_only=True)
    assert ck["model"]["image_size"] == 28 and ck["model"]["in_channels"] == 1
    assert ck["inferred"]["image_size"] == 28 and ck["inferred"]["val_resize"] == "none"
    mean, std = tree_mean_std(os.path.join(grey_data, "train"), 1)
    np.testing.assert_allclose(ck["mean"], mean, atol=1e-4)
    # recover keeps size and channels: 28x28 grey PNGs
    with Image.open(os.path.join(syn, "00000", "ipc00000.png")) as im:
        assert im.size == (28, 28) and im.mode == "L"
    student = torch.load(os.path.join(tmp_path / "auto", "student", "student.pt"), weights_only=True)
    assert student["model"]["in_channels"] == 1 and student["model"]["arch"] == "convnet3"
    sq_flags, tr_flags, _, _ = _pipeline(grey_data, str(tmp_path / "flags"), explicit=True)
    assert sq_auto["test_accuracy"] == sq_flags["test_accuracy"]
    assert tr_auto["test_accuracy"] == tr_flags["test_accuracy"]
    assert sq_auto["test_accuracy"] > 50 and tr_auto["test_accuracy"] > 40   # 4 classes: chance is 25
    print(f"\nown data end to end: teacher {sq_auto['test_accuracy']:.2f} / {sq_flags['test_accuracy']:.2f}, "
          f"student {tr_auto['test_accuracy']:.2f} / {tr_flags['test_accuracy']:.2f} (no flags / flags)")
    # relabel keeps the grey channel too
    res = run_relabel(RelabelConfig(syn=syn, out=str(tmp_path / "labels"), teacher=teacher, epochs=1, batch_size=4,
                                    device="cpu", progress=False))
    assert res is not None


def test_small_data_set_uses_its_size(tmp_path, capsys):
    data = write_tree(tmp_path / "d", classes=3, per_class=32, size=28, channels=1)   # 96 images, batch 256
    res = run_squeeze(SqueezeConfig(data=data, out=str(tmp_path / "t.pt"), width=8, epochs=1, num_workers=0,
                                    device="cpu", progress=False))
    assert 0 <= res["test_accuracy"] <= 100
    assert "--batch-size 256 is larger than the 96 training images; using a batch of 96" in capsys.readouterr().err
    assert json.load(open(tmp_path / "t.pt.json"))["config"]["batch_size"] == 96


# -- memory ----------------------------------------------------------------------------------------

_MEASURE = r"""
import json, sys
sys.path.insert(0, {tests!r})
from own_data_trees import write_tree
from srel_fast.squeeze import SqueezeConfig, run_squeeze
data = write_tree({root!r}, classes=4, per_class={batch} // 4, size={size}, channels={channels}, fmt={fmt!r})
r = run_squeeze(SqueezeConfig(data=data, out={out!r}, arch={arch!r}, epochs=1, batch_size={batch}, num_workers=0,
                              device="cpu", progress=False))
print(json.dumps(r["memory"]))
"""


@pytest.mark.parametrize("arch,size,channels,batch,fmt", [
    ("convnet3", 28, 1, 256, "png"), ("resnet18-small", 64, 3, 64, "jpg"), ("resnet18", 128, 3, 32, "jpg")])
def test_memory_estimate_within_30_percent(tmp_path, arch, size, channels, batch, fmt):
    """The estimate made before the first step against the peak RSS of the whole squeeze run,
    each in its own process."""
    code = _MEASURE.format(tests=os.path.dirname(__file__), root=str(tmp_path / "d"), batch=batch, size=size,
                           channels=channels, fmt=fmt, out=str(tmp_path / "t.pt"), arch=arch)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    mem = json.loads(out.stdout.strip().splitlines()[-1])
    ratio = mem["estimate_bytes"] / mem["peak_rss_bytes"]
    print(f"\n{arch} {size}px batch {batch}: estimate {mem['estimate_bytes'] / 2**20:.0f} MiB, "
          f"peak RSS {mem['peak_rss_bytes'] / 2**20:.0f} MiB, ratio {ratio:.3f}")
    assert 0.7 <= ratio <= 1.3


def test_memory_refusal(tmp_path, monkeypatch):
    data = write_tree(tmp_path / "d", classes=2, per_class=8, size=28, channels=1)
    teacher = str(tmp_path / "ok.pt")
    run_squeeze(SqueezeConfig(data=data, out=teacher, width=8, epochs=1, batch_size=8, num_workers=0, device="cpu",
                              progress=False))
    run_recover(RecoverConfig(out=str(tmp_path / "syn"), weights=teacher, ipc=1, iterations=2, device="cpu",
                              progress=False))
    monkeypatch.setattr(inspect_data, "available_bytes", lambda device: 1 << 20)   # 1 MiB free
    with pytest.raises(UserError) as exc:
        run_squeeze(SqueezeConfig(data=data, out=str(tmp_path / "t.pt"), width=8, epochs=1, batch_size=8,
                                  num_workers=0, device="cpu", progress=False))
    msg = str(exc.value)
    assert msg.startswith("squeeze would need about ") and "(convnet3 at 28 px, batch 8)" in msg
    assert msg.endswith("0.0 GiB available; lower --batch-size (or --image-size).") and "\n" not in msg
    assert not os.path.exists(tmp_path / "t.pt")
    with pytest.raises(UserError, match=r"^train would need about .*; lower --batch-size \(or --image-size\)\.$"):
        run_train(TrainConfig(syn=str(tmp_path / "syn"), out=str(tmp_path / "st"), val=data, teacher=teacher,
                              epochs=1, batch_size=2, device="cpu", loader="torch", progress=False))


def test_issue_scenario_estimate():
    """ConvNet-3 at 224 px, batch 256 (the issue's 19 GB run): the estimate is above 15 GiB."""
    from srel_fast.models import ModelSpec

    est = inspect_data.estimate_peak_memory(ModelSpec("convnet3", 10, 1, 224), 256, "sgd", torch.device("cpu"))
    assert est["estimate_bytes"] > 15 * 2 ** 30


# -- resume states ---------------------------------------------------------------------------------

class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_resume_file_with_payload_is_refused(tmp_path):
    data = write_tree(tmp_path / "d", classes=2, per_class=8, size=28, channels=1)
    out = str(tmp_path / "t.pt")
    marker = str(tmp_path / "pwned")
    torch.save({"epoch": 1, "config": {}, "model": _Payload(marker)}, out + ".resume")
    with pytest.raises(UserError) as exc:
        run_squeeze(SqueezeConfig(data=data, out=out, width=8, epochs=1, batch_size=8, num_workers=0, device="cpu",
                                  progress=False))
    assert not os.path.exists(marker)
    msg = str(exc.value)
    assert msg.startswith(f"resume file {out}.resume cannot be loaded safely") and "\n" not in msg


def test_resume_state_round_trip_weights_only(tmp_path):
    from srel_fast.optimizers import make_optimizer, make_schedule
    from srel_fast.resume import load_resume_state, save_resume_state

    for name in ("sgd", "adamw"):
        model = torch.nn.Linear(3, 2)
        opt = make_optimizer(name, model.parameters(), 0.1, 0.01)
        sched = make_schedule(opt, "iteration", 2, 3, 1)
        for _ in range(3):   # past the warm-up: the cosine's lr values are in the states
            model(torch.randn(4, 3)).sum().backward()
            opt.step()
            sched.step()
        gen = torch.Generator().manual_seed(1)
        path = str(tmp_path / f"{name}.resume")
        save_resume_state(path, 1, model, opt, sched, gen, {"config": {"a": [1, 2.5, None, "x"]}})
        opt2 = make_optimizer(name, model.parameters(), 0.1, 0.01)
        sched2 = make_schedule(opt2, "iteration", 2, 3, 1)
        assert load_resume_state(path, {"a": [1, 2.5, None, "x"]}, model, opt2, sched2, torch.Generator()) == 1
        assert opt2.state_dict()["state"].keys() == opt.state_dict()["state"].keys()


# -- recover's progress line -----------------------------------------------------------------------

def test_recover_progress_counts_batches(tmp_path, capsys):
    data = write_tree(tmp_path / "d", classes=4, per_class=4, size=8, channels=1)
    teacher = str(tmp_path / "t.pt")
    run_squeeze(SqueezeConfig(data=data, out=teacher, width=4, epochs=1, batch_size=8, num_workers=0, device="cpu",
                              progress=False))
    capsys.readouterr()
    run_recover(RecoverConfig(out=str(tmp_path / "syn"), weights=teacher, ipc=3, batch_size=2, iterations=3,
                              device="cpu", progress=True))
    err = capsys.readouterr().err
    assert "(0 of 6 batches done)" in err
    for k in range(1, 7):
        assert f"({k} of 6 batches done, {2 * k} images written, about " in err
    assert "0s left" in err
