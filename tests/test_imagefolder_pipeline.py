"""Squeeze -> recover -> train on an ImageFolder JPEG tree, through each loader."""
import json
import os

import pytest

from srel_fast.bench.jpeg_tree import make_fashion_mnist_jpeg_tree
from srel_fast.loaders import dali_available
from srel_fast.recover import RecoverConfig, run_recover
from srel_fast.squeeze import SqueezeConfig, run_squeeze
from srel_fast.train import TrainConfig, run_train


@pytest.fixture(scope="module")
def jpeg_tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("fmnist_jpeg")
    make_fashion_mnist_jpeg_tree(root / "train", per_class=12, split="train")
    make_fashion_mnist_jpeg_tree(root / "val", per_class=5, split="test")
    return root


@pytest.mark.parametrize("loader", ["torch", pytest.param("dali", marks=pytest.mark.skipif(
    not dali_available(), reason="NVIDIA DALI is not installed"))])
def test_imagefolder_pipeline(jpeg_tree, tmp_path, loader):
    teacher = str(tmp_path / "teacher.pt")
    res = run_squeeze(SqueezeConfig(data=str(jpeg_tree), out=teacher, arch="convnet3", width=8, epochs=2, batch_size=32,
                                    lr=0.05, image_size=28, loader=loader, num_workers=1, device="cpu", progress=False))
    assert 0 <= res["test_accuracy"] <= 100
    meta = json.load(open(teacher + ".json"))
    assert meta["model"]["num_classes"] == 10 and meta["model"]["in_channels"] == 1   # grey JPEGs: inferred (issue 19)
    run_recover(RecoverConfig(out=str(tmp_path / "syn"), weights=teacher, ipc=1, iterations=2, device="cpu",
                              progress=False))
    assert sorted(os.listdir(tmp_path / "syn" / "00000")) == ["ipc00000.png"]
    r = run_train(TrainConfig(syn=str(tmp_path / "syn"), out=str(tmp_path / "student"), val=str(jpeg_tree),
                              arch="convnet3", width=8, teacher=teacher, epochs=1, batch_size=10, loader=loader,
                              device="cpu", progress=False))
    assert 0 <= r["test_accuracy"] <= 100
