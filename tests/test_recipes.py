"""Recipes: the paper's settings exactly, srel-fast's own under its name.

Every test here checks one departure from the official SRe2L code that a recipe
closes; each compares against an independent statement of the official
behaviour (its formula, or torch/PIL called the way the official scripts call
them), so it fails when the mechanism or the value is wrong."""
import argparse
import dataclasses
import io
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch import nn

from conftest import run_cli
from srel_fast import recipes as R
from srel_fast.augment import apply_crops, draw_crop_params
from srel_fast.data import Normalization
from srel_fast.errors import UserError
from srel_fast.images import encode_image
from srel_fast.models import TINY_IMAGENET_MEAN_STD, ModelSpec, build_model, load_model
from srel_fast.recover import BatchResult, Recoverer, RecoverConfig, _save_batch, class_batches, run_recover
from srel_fast.crop_plan import epoch_plan, make_inputs
from srel_fast.relabel import RelabelConfig
from srel_fast.squeeze import SqueezeConfig
from srel_fast.train import TrainConfig, make_evaluator, make_student_optimizer, train_student
from srel_fast.optimizers import make_schedule
from srel_fast.seeds import seed_everything

TINY_MEAN, TINY_STD = TINY_IMAGENET_MEAN_STD
CONFIGS = {"squeeze": SqueezeConfig, "recover": RecoverConfig, "relabel": RelabelConfig, "train": TrainConfig}


# ----------------------------------------------------------------------------- the mechanism


def test_recipes_set_every_recipe_field_and_nothing_else():
    from srel_fast.demo import DemoConfig

    configs = dict(CONFIGS, demo=DemoConfig)
    for stage, cls in configs.items():
        fields = {f.name: f for f in dataclasses.fields(cls)}
        assert "recipe" in fields and fields["recipe"].default is None
        for name in cls.RECIPE_FIELDS:  # None means "not given": the recipe fills it
            assert fields[name].default is None, (stage, name)
        for recipe in R.RECIPES.values():
            if stage in recipe.not_covered:
                continue
            values = recipe.values.get(stage, {})
            assert set(values) <= set(cls.RECIPE_FIELDS), (recipe.name, stage)
            if recipe.name.startswith("sre2l-") and stage != "demo":
                # A paper recipe states every value, so a new field never leaks in from srel.
                assert set(values) == set(cls.RECIPE_FIELDS), (recipe.name, stage)
    srel = R.RECIPES["srel"]
    for stage, cls in CONFIGS.items():
        assert set(srel.values[stage]) | set(srel.stage_rules.get(stage, {})) == set(cls.RECIPE_FIELDS), stage


def test_explicit_values_override_the_recipe_and_the_record_says_so():
    cfg = RecoverConfig(out="x", recipe="sre2l-tiny", lr=0.05, jitter_range="symmetric")
    resolved, record = R.resolve_recipe(cfg, "recover")
    assert resolved.lr == 0.05 and resolved.r_bn == 1.0 and resolved.class_layout == "consecutive"
    assert record["name"] == "sre2l-tiny"
    assert record["overrides"] == {"lr": {"value": 0.05, "recipe": 0.1}}   # same as the recipe: no override
    assert "r_bn" in record["from_recipe"] and "lr" not in record["from_recipe"]
    assert R.resolve_recipe(resolved, "recover")[0] == resolved              # idempotent
    default = R.apply_recipe(RecoverConfig(out="x"), "recover")
    assert default.recipe == "srel" and default.class_layout == "round-robin" and default.image_format == "png"
    with pytest.raises(UserError, match="unknown recipe 'paper'"):
        R.apply_recipe(RecoverConfig(out="x", recipe="paper"), "recover")
    with pytest.raises(UserError, match="sre2l-imagenet recipe has no squeeze stage"):
        R.apply_recipe(SqueezeConfig(data="digits", out="t.pt", recipe="sre2l-imagenet"), "squeeze")


def test_recipe_defaults_and_overrides_in_the_saved_config(digits_teacher, tmp_path, capsys):
    code, err = run_cli(["recover", "--weights", digits_teacher[0], "--recipe", "sre2l-tiny", "--ipc", 1,
                         "--iterations", 2, "--lr", 0.05, "--device", "cpu", "--no-progress", "--out", tmp_path / "s"],
                        capsys)
    assert code == 0, err
    saved = json.load(open(tmp_path / "s" / "recover_config.json"))
    cfg, rec = saved["config"], saved["recipe"]
    assert cfg["recipe"] == "sre2l-tiny" and cfg["lr"] == 0.05 and cfg["iterations"] == 2
    assert (cfg["r_bn"], cfg["jitter"], cfg["jitter_range"], cfg["class_layout"]) == (1.0, 4, "symmetric", "consecutive")
    assert (cfg["image_format"], cfg["jpeg_quality"], cfg["pixel_rounding"]) == ("jpg", 75, "truncate")
    assert rec["overrides"] == {"iterations": {"value": 2, "recipe": 4000}, "lr": {"value": 0.05, "recipe": 0.1}}
    assert rec["from_recipe"]["r_bn"] == 1.0 and "lr" not in rec["from_recipe"]
    assert sorted(os.listdir(tmp_path / "s" / "00003")) == ["ipc00000.jpg"]
    # No --recipe: srel, recorded by name.
    assert run_cli(["recover", "--weights", digits_teacher[0], "--ipc", 1, "--iterations", 2, "--device", "cpu",
                    "--no-progress", "--out", tmp_path / "d"], capsys)[0] == 0
    saved = json.load(open(tmp_path / "d" / "recover_config.json"))
    # srel on small images with known real data: the class-aware rule (1,000 iterations at IPC 1)
    assert saved["config"]["recipe"] == "srel" and saved["recipe"]["overrides"] == {"iterations": {"value": 2, "recipe": 1000}}
    assert saved["recipe"]["from_recipe"]["init"] == "real" and saved["config"]["r_class"] == 1.0


@pytest.mark.parametrize("ipc, size, real_data, recipe, iterations", [
    (1, 28, True, None, 3000),          # srel, small images with real data, IPC 1: stored as tiles, longer still
    (1, 29, True, None, 1000),          # ... an odd size, whole images: the longer recovery of IPC 1
    (1, 8, True, None, 1000),           # ... too small for tiles
    (2, 28, True, None, 1000),          # ... IPC 2: one image of tiles and one whole, the whole one 1,000
    (2, 8, True, None, 100),            # ... two whole images (too small for tiles): 100
    (3, 28, True, None, 100),           # ... IPC 3: one image of tiles and two whole, the whole ones 100
    (4, 28, True, None, 100),           # ... above IPC 3: whole images, 100
    (10, 8, True, None, 100),
    (1, 28, False, None, 1000),         # no real data: SRe2L's objective from noise, 1,000 at every IPC
    (10, 28, False, None, 1000),
    (1, 224, True, None, 1000),         # large images: the paper's objective
    (1, 28, True, "sre2l-tiny", 4000),  # a paper recipe sets its own
])
def test_srel_recovery_iterations_rule(ipc, size, real_data, recipe, iterations):
    cfg = RecoverConfig(out="", ipc=ipc, recipe=recipe, device="cpu").resolved(size, real_data=real_data)
    assert cfg.iterations == iterations
    # An explicit value always wins over the rule.
    given = RecoverConfig(out="", ipc=ipc, recipe=recipe, iterations=7, device="cpu")
    assert given.resolved(size, real_data=real_data).iterations == 7


def test_train_records_the_imagenet_recipe(digits_teacher, tmp_path):
    syn = tmp_path / "syn"
    run_recover(RecoverConfig(out=str(syn), weights=digits_teacher[0], ipc=1, iterations=2, device="cpu",
                              progress=False))
    from srel_fast.train import run_train

    run_train(TrainConfig(syn=str(syn), out=str(tmp_path / "st"), val="digits", arch="convnet3", width=8,
                          teacher=digits_teacher[0], recipe="sre2l-imagenet", epochs=1, batch_size=4, device="cpu",
                          progress=False))
    saved = json.load(open(tmp_path / "st" / "train_results.json"))
    cfg = saved["config"]
    assert cfg["recipe"] == "sre2l-imagenet" and cfg["optimizer"] == "adamw" and cfg["decay_bn_bias"] is False
    assert (cfg["lr_step"], cfg["grad_accumulation"], cfg["cutmix"], cfg["kd_t2"]) == ("epoch", 2, 1.0, False)
    assert saved["recipe"]["overrides"] == {"batch_size": {"value": 4, "recipe": 1024},
                                            "epochs": {"value": 1, "recipe": 300}}


def test_cli_lists_recipes_and_separates_speed_from_algorithm():
    out = subprocess.run([sys.executable, "-m", "srel_fast.cli", "recipes"], capture_output=True, text=True)
    assert out.returncode == 0
    for name in R.RECIPES:
        assert name in out.stdout
    assert "--class-layout consecutive" in out.stdout and "--jitter-range symmetric" in out.stdout
    assert "--no-decay-bn-bias" in out.stdout and "--kd-t2" in out.stdout
    h = subprocess.run([sys.executable, "-m", "srel_fast.cli", "recover", "--help"], capture_output=True, text=True).stdout
    algorithm = h[h.index("\nalgorithm:"):h.index("\nspeed switches:")]
    speed = h[h.index("\nspeed switches:"):h.index("\nrun:")]
    for flag in ("--recipe", "--class-layout", "--crop-mode", "--jitter-range", "--image-format", "--lr", "--r-bn"):
        assert flag in algorithm and flag not in speed, flag
    for flag in ("--bn-matching", "--backend", "--amp", "--channels-last", "--compile", "--cuda-graphs", "--group-batches"):
        assert flag in speed and flag not in algorithm, flag


# ----------------------------------------------------------------------------- recover


def test_consecutive_class_layout():
    assert class_batches(250, 100, "consecutive") == [list(range(0, 100)), list(range(100, 200)),
                                                      list(range(200, 250))]
    assert class_batches(1000, 100, "consecutive")[3] == list(range(300, 400))
    assert class_batches(5, 2, "round-robin") == [[0, 3], [1, 4], [2]]
    for name in ("sre2l-imagenet", "sre2l-tiny"):
        assert R.RECIPES[name].values["recover"]["class_layout"] == "consecutive"


def test_recovery_batches_follow_the_layout(digits_teacher, tmp_path):
    def classes(layout):
        m = run_recover(RecoverConfig(out=str(tmp_path / layout), weights=digits_teacher[0], ipc=1, iterations=1,
                                      batch_size=4, class_layout=layout, device="cpu", progress=False))
        return [e["classes"] for e in m["batches"]]

    assert classes("consecutive") == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert classes("round-robin") == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]


def _official_jpeg(x01: torch.Tensor) -> bytes:
    """SRe2L save_images: Image.fromarray((x * 255).astype(np.uint8)).save(path) (PIL's default quality)."""
    image_np = x01.data.cpu().numpy().transpose((1, 2, 0))
    buf = io.BytesIO()
    Image.fromarray((image_np * 255).astype(np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def test_jpeg_output_is_the_official_quality_75_truncation():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 64, 64, generator=g)
    x[:, :4] = torch.tensor([0.0, 1.0, 0.5 / 255, 254.6 / 255]).view(1, 4, 1)  # where truncation and rounding part
    assert encode_image(x, "jpg", 75, "truncate") == _official_jpeg(x)
    assert encode_image(x, "jpg", 75, "round") != _official_jpeg(x)
    assert encode_image(x, "jpg", 95, "truncate") != _official_jpeg(x)


def test_recovered_jpeg_files_equal_the_official_save_of_the_same_tensor(tmp_path):
    """recover's writer under sre2l-tiny: the official denormalize_tiny (clamp(x * s + m, 0, 1),
    numpy float64 mean/std) and save_images, byte for byte."""
    g = torch.Generator().manual_seed(1)
    images = torch.randn(3, 3, 64, 64, generator=g) * 1.5    # normalised space, some out of [0, 1]
    cfg = R.apply_recipe(RecoverConfig(out=str(tmp_path), recipe="sre2l-tiny"), "recover")
    result = BatchResult(0, 0, [0, 1, 2], 0.0, 0.0, 0.0, 0.0, images=images.clone())
    _save_batch(cfg, Normalization(TINY_MEAN, TINY_STD), result, None)
    official = images.clone()
    mean, std = np.array([0.4802, 0.4481, 0.3975]), np.array([0.2302, 0.2265, 0.2262])
    for c in range(3):
        official[:, c] = torch.clamp(official[:, c] * std[c] + mean[c], 0, 1)
    for k in range(3):
        assert (tmp_path / f"{k:05d}" / "ipc00000.jpg").read_bytes() == _official_jpeg(official[k]), k


def _tiny_model(size=64, channels=3, classes=10):
    torch.manual_seed(0)
    return build_model(ModelSpec("convnet3", classes, channels, size, width=4)).eval()


@pytest.mark.parametrize("recipe,expected", [
    ("sre2l-tiny", set(range(0, 5)) | set(range(60, 64))),   # randint(-4, 4), as a circular roll of 64 px
    ("srel", set(range(0, 5))),                                # srel at 64 px: 0..64 // 16
    ("sre2l-imagenet", set(range(0, 33))),                     # randint(0, 32)
])
def test_roll_range_per_recipe(recipe, expected):
    cfg = RecoverConfig(out="", recipe=recipe, device="cpu").resolved(64)
    rec = Recoverer(_tiny_model(), Normalization(TINY_MEAN, TINY_STD), 64, 3, cfg, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(600):
        p = rec._crop_params(2, [g])
        assert torch.equal(p.shift[0], p.shift[1])                # one roll for the whole batch (crop mode batch)
        seen |= set(p.shift.flatten().tolist())
    assert seen == expected


def test_symmetric_roll_is_the_official_negative_roll():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 16, 16)
    for _ in range(20):
        p = draw_crop_params(2, 16, 16, g, per_image=False, jitter=4, jitter_range="symmetric")
        raw = [int(s) if s <= 4 else int(s) - 16 for s in p.shift[0]]   # back to randint(-4, 4)
        top, left, h, w = (int(v) for v in p.boxes[0])
        want = F.interpolate(x[:, :, top:top + h, left:left + w], size=(16, 16), mode="bilinear", align_corners=False)
        if bool(p.flip[0]):
            want = want.flip(3)
        want = torch.roll(want, shifts=tuple(raw), dims=(2, 3))
        torch.testing.assert_close(apply_crops(x, p, (16, 16), "torch", shared=True), want)
        torch.testing.assert_close(apply_crops(x, p, (16, 16), "torch"), want, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- official checkpoints


def _official_tiny_teacher(classes=10):
    """tiny-imagenet classification/train.py's model: torchvision resnet18, 3x3 stem, no max-pool."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=classes)
    model.conv1 = nn.Conv2d(3, 64, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), bias=False)
    model.maxpool = nn.Identity()
    model.train()
    with torch.no_grad():   # non-trivial BN running statistics
        model(torch.randn(8, 3, 64, 64))
    return model.eval()


def test_official_tiny_checkpoint_loads_with_tiny_normalization(tmp_path, capsys):
    model = _official_tiny_teacher()
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    # What train.py saves (here as if the model had been wrapped in DataParallel: "module." keys).
    ckpt = {"model": {"module." + k: v for k, v in model.state_dict().items()}, "optimizer": opt.state_dict(),
            "lr_scheduler": {"last_epoch": 49, "_milestones": [5]}, "epoch": 49,
            "args": argparse.Namespace(model="resnet18", lr=0.2, epochs=50, output_dir="save/rn18_50ep")}
    path = tmp_path / "checkpoint.pth"
    torch.save(ckpt, path)
    loaded = load_model(str(path), "resnet18-small", image_size=64, normalization="tiny-imagenet")
    assert (loaded.mean, loaded.std) == (TINY_MEAN, TINY_STD)
    assert loaded.spec.num_classes == 10 and loaded.spec.image_size == 64
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model.eval()(x), model(x), rtol=0, atol=0)
    # The recipe brings the normalisation and the size; the recovery records them.
    code, err = run_cli(["recover", "--recipe", "sre2l-tiny", "--arch", "resnet18-small", "--weights", path,
                         "--ipc", 1, "--iterations", 1, "--device", "cpu", "--no-progress", "--out", tmp_path / "s"],
                        capsys)
    assert code == 0, err
    saved = json.load(open(tmp_path / "s" / "recover_config.json"))
    assert (tuple(saved["mean"]), tuple(saved["std"])) == (TINY_MEAN, TINY_STD)
    assert saved["model"]["image_size"] == 64 and saved["model"]["num_classes"] == 10
    assert Image.open(tmp_path / "s" / "00000" / "ipc00000.jpg").size == (64, 64)
    # Under srel a plain checkpoint is an ImageNet model: ImageNet mean/std, 224 px.
    srel = load_model(str(path), "resnet18-small")
    assert srel.mean == (0.485, 0.456, 0.406) and srel.spec.image_size == 224


# ----------------------------------------------------------------------------- Tiny-ImageNet data


def test_tiny_validation_is_the_raw_image_with_tiny_normalization(tmp_path):
    from srel_fast.loaders import LoaderConfig, build_loader

    rng = np.random.default_rng(0)
    arrays = []
    for c in ("n01", "n02"):
        (tmp_path / "val" / c).mkdir(parents=True)
        for i in range(3):
            a = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
            Image.fromarray(a).save(tmp_path / "val" / c / f"{i}.png")
            arrays.append(a)
    # tiny-imagenet train.py: transforms.Compose([ToTensor(), Normalize(tiny mean, tiny std)]).
    want = torch.stack([torchvision.transforms.functional.normalize(
        torchvision.transforms.functional.to_tensor(a), TINY_MEAN, TINY_STD) for a in arrays])

    def batches(val_resize):
        cfg = LoaderConfig(root=str(tmp_path / "val"), train=False, image_size=64, batch_size=6, mean=TINY_MEAN,
                           std=TINY_STD, loader="torch", num_workers=0, val_resize=val_resize)
        return torch.cat([x for x, _ in build_loader(cfg)])

    torch.testing.assert_close(batches(False), want, rtol=0, atol=1e-6)
    assert not torch.allclose(batches(True), want, atol=1e-3)   # resize to 73 + centre crop is not raw
    # The student's evaluator under sre2l-tiny reads the raw images: a model that reports its
    # input's mean per image finds the raw normalised images.
    train_cfg = R.apply_recipe(TrainConfig(syn="", out="", val="", arch="x", recipe="sre2l-tiny"), "train")
    assert train_cfg.val_resize == "none" and train_cfg.normalization == "tiny-imagenet"
    evaluate = make_evaluator(str(tmp_path / "val"), Normalization(TINY_MEAN, TINY_STD), 64, torch.device("cpu"),
                              loader="torch", val_resize=train_cfg.val_resize)
    seen = []

    class Probe(nn.Module):
        def forward(self, x):
            seen.append(x.clone())
            return torch.zeros(x.shape[0], 2)

    evaluate(Probe())
    torch.testing.assert_close(torch.cat(seen), want, rtol=0, atol=1e-6)


def test_tiny_squeeze_uses_tiny_normalization_and_warm_up(tmp_path):
    from srel_fast.squeeze import run_squeeze

    rng = np.random.default_rng(1)
    for split in ("train", "val"):
        for c in ("a", "b"):
            (tmp_path / "d" / split / c).mkdir(parents=True)
            for i in range(4):
                Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(
                    tmp_path / "d" / split / c / f"{i}.jpg")
    out = str(tmp_path / "t.pt")
    run_squeeze(SqueezeConfig(data=str(tmp_path / "d"), out=out, recipe="sre2l-tiny", arch="convnet3", width=4,
                              epochs=2, batch_size=4, loader="torch", num_workers=0, device="cpu", progress=False))
    loaded = load_model(out)
    assert (loaded.mean, loaded.std) == (TINY_MEAN, TINY_STD) and loaded.spec.image_size == 64
    saved = json.load(open(out + ".json"))["config"]
    assert (saved["warmup_epochs"], saved["lr_step"], saved["val_resize"]) == (5, "epoch", "none")


# ----------------------------------------------------------------------------- student training


def test_optimizer_groups_no_decay_on_bn_and_bias():
    model = build_model(ModelSpec("resnet18-small", 10, 3, 32))
    params = dict(model.named_parameters())
    imagenet = make_student_optimizer(model, TrainConfig(syn="", out="", val="", arch="", recipe="sre2l-imagenet"))
    assert isinstance(imagenet, torch.optim.AdamW) and len(imagenet.param_groups) == 2
    decay, no_decay = imagenet.param_groups
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    bn = {n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    want_no_decay = {n for n in params if n.rsplit(".", 1)[0] in bn or n.endswith("bias")}
    assert want_no_decay >= {"bn1.weight", "bn1.bias", "fc.bias", "layer1.0.bn2.weight"}
    ids = {id(p): n for n, p in params.items()}
    assert {ids[id(p)] for p in no_decay["params"]} == want_no_decay
    assert {ids[id(p)] for p in decay["params"]} == set(params) - want_no_decay   # conv and fc weights
    # The official rule itself (SRe2L validate/utils.py get_parameters).
    assert {n for n, p in params.items() if "weight" in n and p.ndim > 1} == set(params) - want_no_decay
    # srel and sre2l-tiny (train_kd.py: no norm/bias exception) decay everything.
    for recipe in ("srel", "sre2l-tiny"):
        opt = make_student_optimizer(model, TrainConfig(syn="", out="", val="", arch="", recipe=recipe))
        assert len(opt.param_groups) == 1 and len(opt.param_groups[0]["params"]) == len(params)
        assert opt.param_groups[0]["weight_decay"] == R.RECIPES[recipe].values["train"]["weight_decay"]


def _lrs(schedule_kw, epochs, steps, lr=1.0, stepping="epoch"):
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)
    sched = make_schedule(opt, stepping, epochs, steps, **schedule_kw)
    out = []
    for _ in range(epochs):
        for _ in range(steps):
            out.append(opt.param_groups[0]["lr"])
            opt.step()   # no gradient: a no-op, in the order a training loop calls it
            if stepping == "iteration":
                sched.step()
        if stepping == "epoch":
            sched.step()
    return out


def test_per_epoch_cosine_is_the_official_schedule():
    epochs, steps = 300, 3
    lrs = _lrs({}, epochs, steps, lr=1e-3)
    # train_FKD.py: LambdaLR(lambda step: 0.5 * (1 + cos(pi * step / epochs))), stepped once per epoch.
    opt = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=1e-3)
    official = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: 0.5 * (1. + math.cos(math.pi * step / epochs)) if step <= epochs else 0)
    for e in range(epochs):
        assert lrs[e * steps:(e + 1) * steps] == [pytest.approx(opt.param_groups[0]["lr"], rel=1e-12, abs=1e-18)] * steps
        opt.step()
        official.step()
    # Per iteration it moves within an epoch.
    per_it = _lrs({}, epochs, steps, lr=1e-3, stepping="iteration")
    assert per_it[1] < per_it[0] and per_it[1] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi / (epochs * steps))))


def test_warm_up_then_cosine_is_torchvisions_reference_schedule():
    """tiny-imagenet train.py / train_kd.py: SequentialLR(LinearLR(0.01, 5), CosineAnnealingLR(E - 5))."""
    epochs = 100
    lrs = _lrs({"warmup_epochs": 5, "warmup_start": 0.01}, epochs, 1, lr=0.2)
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.2, momentum=0.9)
    warm = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.01, total_iters=5)
    cos = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs - 5, eta_min=0.0)
    official = torch.optim.lr_scheduler.SequentialLR(opt, schedulers=[warm, cos], milestones=[5])
    for e in range(epochs):
        assert lrs[e] == pytest.approx(opt.param_groups[0]["lr"], rel=1e-6, abs=1e-12), e
        opt.step()
        official.step()
    assert lrs[:6] == pytest.approx([0.002, 0.0416, 0.0812, 0.1208, 0.1604, 0.2])


def _digits_batch(teacher_path, n=8):
    from srel_fast.data import load_builtin

    teacher = load_model(teacher_path)
    data = load_builtin("digits", "train")
    images = Normalization(teacher.mean, teacher.std).normalize(data.images[:n])
    return images, data.labels[:n], teacher


def test_training_steps_the_schedule_per_epoch(digits_teacher, monkeypatch):
    import srel_fast.train as T

    images, labels, teacher = _digits_batch(digits_teacher[0], 20)
    seen = []
    real = T.make_student_optimizer

    def recording(model, cfg):
        opt = real(model, cfg)
        opt.register_step_pre_hook(lambda o, args, kwargs: seen.append(o.param_groups[0]["lr"]))
        return opt

    monkeypatch.setattr(T, "make_student_optimizer", recording)
    spec = ModelSpec("convnet3", 10, 1, 8, width=8)
    for lr_step in ("epoch", "iteration"):
        seen.clear()
        cfg = TrainConfig(syn="", out="", val="digits", arch="convnet3", epochs=3, batch_size=8, lr=0.1,
                          lr_step=lr_step, device="cpu", progress=False)
        train_student(images, labels, 10, spec, cfg, lambda m: 0.0, teacher=teacher.model)
        if lr_step == "epoch":   # 3 steps per epoch at the epoch's lr
            want = [0.1 * 0.5 * (1 + math.cos(math.pi * e / 3)) for e in range(3) for _ in range(3)]
        else:
            want = [0.1 * 0.5 * (1 + math.cos(math.pi * i / 9)) for i in range(9)]
        assert seen == pytest.approx(want, rel=1e-9)


def test_accumulated_step_equals_one_step_with_bn_over_each_half(digits_teacher):
    """batch 8 as two accumulated micro-batches of 4 (train_FKD.py's 1024 = 2 x 512): one step
    on the whole batch's mean loss, each half through BatchNorm on its own."""
    images, labels, teacher = _digits_batch(digits_teacher[0])
    spec = ModelSpec("convnet3", 10, 1, 8, width=8)
    cfg = TrainConfig(syn="", out="", val="digits", arch="convnet3", epochs=1, batch_size=8, grad_accumulation=2,
                      optimizer="sgd", lr=0.5, momentum=0.0, weight_decay=0.0, cutmix=1.0, lr_step="epoch",
                      device="cpu", progress=False)
    got = train_student(images, labels, 10, spec, cfg, lambda m: 0.0, teacher=teacher.model)["model"]

    def one_step(bn_over_halves: bool):
        seed_everything(cfg.seed)
        model = build_model(spec).train()
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        (pb,) = epoch_plan(cfg.plan(images.shape), 0, 8, 8, 8)
        assert pb.mix_perm is not None   # CutMix pastes across the halves
        x = make_inputs(images, pb, (8, 8))
        with torch.no_grad():
            target = F.softmax(teacher.model.eval()(x) / 20.0, 1)
        out = torch.cat([model(x[:4]), model(x[4:])]) if bn_over_halves else model(x)
        F.kl_div(F.log_softmax(out / 20.0, 1), target, reduction="batchmean").backward()
        opt.step()
        return model.state_dict()

    halves, whole = one_step(True), one_step(False)
    for k, v in got.state_dict().items():
        torch.testing.assert_close(v, halves[k], rtol=1e-5, atol=1e-6, msg=k)
    assert any(not torch.allclose(halves[k].float(), whole[k].float(), atol=1e-5) for k in halves)


def test_tiny_kd_loss_is_multiplied_by_t_squared():
    from srel_fast.train import _student_loss

    torch.manual_seed(0)
    out, t_logits = torch.randn(4, 10), torch.randn(4, 10)
    teacher = lambda x: t_logits  # noqa: E731
    pb = epoch_plan(RelabelConfig("", "", "", batch_size=4).plan((4, 1, 8, 8)), 0, 4, 8, 8)[0]
    base = TrainConfig(syn="", out="", val="", arch="", temperature=20.0)
    plain = _student_loss(out, None, pb, None, 0, None, R.apply_recipe(base, "train"), 0, teacher, None, "cpu")
    tiny = R.apply_recipe(dataclasses.replace(base, recipe="sre2l-tiny"), "train")
    scaled = _student_loss(out, None, pb, None, 0, None, tiny, 0, teacher, None, "cpu")
    # train_kd.py: KLDivLoss(batchmean, log_target=True)(log_softmax(s/T), log_softmax(t/T)) * T^2
    official = nn.KLDivLoss(reduction="batchmean", log_target=True)(
        F.log_softmax(out / 20.0, 1), F.log_softmax(t_logits / 20.0, 1)) * 20.0 ** 2
    torch.testing.assert_close(scaled, official, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(plain * 400.0, official, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("num_images,batch,epochs", [(100, 100, 2000), (100, 50, 1000), (10, 50, 2000),
                                                     (500, 50, 300), (10000, 100, 300), (333, 100, 500)])
def test_srel_student_epochs_rule(num_images, batch, epochs):
    """srel's student length: 300 epochs, but at least 2,000 optimiser steps."""
    assert R.srel_student_epochs(num_images, batch) == epochs
    steps = epochs * math.ceil(num_images / batch)
    assert steps >= R.SREL_STUDENT_MIN_STEPS and (epochs == R.SREL_STUDENT_EPOCHS or
                                                  (epochs - 1) * math.ceil(num_images / batch) < R.SREL_STUDENT_MIN_STEPS)


@pytest.mark.parametrize("height,width,min_scale", [(8, 8, 0.5), (28, 28, 0.5), (64, 64, 0.5), (127, 300, 0.5),
                                                     (128, 128, 0.08), (224, 224, 0.08), (300, 160, 0.08)])
def test_srel_student_crops_rule(height, width, min_scale):
    """srel's student crops: scale 0.5-1 on images under 128 px (by the shorter side), else 0.08-1."""
    assert R.srel_student_min_scale(height, width) == min_scale


def test_relabel_and_train_share_the_student_rules_and_record_them(digits_teacher, tmp_path, monkeypatch):
    """With no --epochs and no --min-scale, relabel and train both take the rules' values for the
    synthetic set (its size and its images' size: 8-px digits get crops of 0.5-1), so a store made
    with the defaults covers a student trained with the defaults; explicit values win; the paper
    recipes keep their fixed ones; a student whose crops differ from the store's is refused with
    the flags that match it. The epochs' rule is scaled down here (4 epochs, at least 10 steps)
    to keep the test short."""
    from srel_fast.relabel import run_relabel
    from srel_fast.train import run_train

    monkeypatch.setattr(R, "SREL_STUDENT_EPOCHS", 4)
    monkeypatch.setattr(R, "SREL_STUDENT_MIN_STEPS", 10)
    syn = tmp_path / "syn"
    run_recover(RecoverConfig(out=str(syn), weights=digits_teacher[0], ipc=1, iterations=2, device="cpu",
                              progress=False))   # 10 images: 2 batches of 8 an epoch -> 5 epochs
    common = dict(syn=str(syn), batch_size=8, cutmix=0.0, device="cpu", progress=False)
    run_relabel(RelabelConfig(out=str(tmp_path / "labels"), teacher=digits_teacher[0], **common))
    store_meta = json.load(open(tmp_path / "labels" / "labels.json"))
    assert (store_meta["epochs"], store_meta["min_scale"]) == (5, 0.5)
    relabel_record = json.load(open(tmp_path / "labels" / "relabel_results.json"))["recipe"]["from_recipe"]
    assert (relabel_record["epochs"], relabel_record["min_scale"]) == (5, 0.5)
    run_train(TrainConfig(out=str(tmp_path / "st"), val="digits", arch="convnet3", width=8,
                          labels=str(tmp_path / "labels"), **common))
    saved = json.load(open(tmp_path / "st" / "train_results.json"))
    assert (saved["config"]["epochs"], saved["config"]["min_scale"]) == (5, 0.5)
    assert (saved["recipe"]["from_recipe"]["epochs"], saved["recipe"]["from_recipe"]["min_scale"]) == (5, 0.5)
    with pytest.raises(UserError, match=r"crops of scale 0.5-1.0 .* --min-scale 0.5 --max-scale 1.0 --cutmix 0.0"):
        run_train(TrainConfig(out=str(tmp_path / "st08"), val="digits", arch="convnet3", width=8, min_scale=0.08,
                              labels=str(tmp_path / "labels"), **common))
    run_train(TrainConfig(out=str(tmp_path / "seeds"), val="digits", arch="convnet3", width=8, seeds="0,1",
                          teacher=digits_teacher[0], **common))
    summary = json.load(open(tmp_path / "seeds" / "train_results.json"))["config"]
    assert (summary["epochs"], summary["min_scale"]) == (5, 0.5)
    shape = (10, 1, 8, 8)
    explicit = TrainConfig(syn="", out="", val="", arch="", epochs=3, batch_size=8, min_scale=0.2)
    resolved = R.with_student_rules(R.apply_recipe(explicit, "train"), shape)
    assert (resolved.epochs, resolved.min_scale) == (3, 0.2)
    for paper in ("sre2l-imagenet", "sre2l-tiny"):
        cfg = R.with_student_rules(R.apply_recipe(TrainConfig(syn="", out="", val="", arch="", recipe=paper),
                                                  "train"), shape)
        assert (cfg.epochs, cfg.min_scale) == (R.RECIPES[paper].values["train"]["epochs"], 0.08)


def test_relabel_and_train_refuse_a_bad_crop_scale_range(digits_teacher, tmp_path):
    """Explicit ranges, and a --max-scale under the rule's lower bound (0.5 on 8-px images)."""
    from srel_fast.relabel import run_relabel
    from srel_fast.train import run_train

    syn = str(tmp_path / "syn")
    run_recover(RecoverConfig(out=syn, weights=digits_teacher[0], ipc=1, iterations=1, device="cpu", progress=False))
    for min_scale, max_scale in [(0.0, 1.0), (0.6, 0.5), (0.5, 1.5), (-0.1, 1.0), (None, 0.3)]:
        common = dict(syn=syn, min_scale=min_scale, max_scale=max_scale, device="cpu", progress=False)
        with pytest.raises(UserError, match="crop scale range"):
            run_relabel(RelabelConfig(out=str(tmp_path / "labels"), teacher=digits_teacher[0], epochs=1, **common))
        with pytest.raises(UserError, match="crop scale range"):
            run_train(TrainConfig(out=str(tmp_path / "st"), val="digits", arch="convnet3", width=8, epochs=1,
                                  teacher=digits_teacher[0], **common))
        assert not os.path.exists(tmp_path / "labels") and not os.path.exists(tmp_path / "st")
