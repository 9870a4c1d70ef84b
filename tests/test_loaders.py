"""Tests for srel_fast.loaders: DALI CPU and torch image loaders.

Small trees in tmp dirs; every sample of an epoch is identified by matching
its pixels against the decoded source files, so label mapping, coverage and
sharding are checked on what the loaders actually yield.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from srel_fast.bench.jpeg_tree import make_fashion_mnist_jpeg_tree
from srel_fast.data import FASHION_MNIST_DIR
from srel_fast.loaders import (
    CorruptImageError,
    LoaderConfig,
    build_loader,
    dali_available,
    find_corrupt_images,
)

HAVE_DALI = dali_available()
needs_fmnist = pytest.mark.skipif(
    not os.path.exists(os.path.join(FASHION_MNIST_DIR, "t10k-images-idx3-ubyte.gz")),
    reason="Fashion-MNIST idx files not installed (apt-get install dataset-fashion-mnist)")
BACKENDS = [
    "torch",
    pytest.param("dali", marks=pytest.mark.skipif(not HAVE_DALI, reason="nvidia.dali not importable")),
]
MEAN, STD = (0.5,), (0.25,)


def _cfg(root, backend, train, **kw):
    base = dict(root=str(root), train=train, image_size=28, batch_size=4, mean=MEAN, std=STD,
                channels=1, loader=backend, num_workers=1, resize_size=28)
    base.update(kw)
    return LoaderConfig(**base)


@pytest.fixture(scope="module")
def fm_tree(tmp_path_factory):
    """39 grey 28x28 Fashion-MNIST JPEGs in 10 class folders (odd count: uneven shards)."""
    if not os.path.exists(os.path.join(FASHION_MNIST_DIR, "t10k-images-idx3-ubyte.gz")):
        pytest.skip("Fashion-MNIST idx files not installed")
    root = make_fashion_mnist_jpeg_tree(tmp_path_factory.mktemp("fm") / "tree", per_class=4, split="test")
    victim = sorted((root / "bag").iterdir())[-1]
    victim.unlink()
    from torchvision.datasets import ImageFolder

    ds = ImageFolder(str(root))
    refs = np.stack([np.asarray(Image.open(p).convert("L"), dtype=np.float32) for p, _ in ds.samples])
    return root, ds, refs


def _identify(images: torch.Tensor, refs: np.ndarray, allow_flip: bool = False) -> list[int]:
    """Index of the reference image each output equals (to JPEG-decoder tolerance)."""
    px = (images[:, 0].numpy() * STD[0] + MEAN[0]) * 255.0          # [B,28,28] pixel units
    cands = [refs] + ([refs[:, :, ::-1]] if allow_flip else [])
    out = []
    for img in px:
        d = np.min(np.stack([np.abs(c - img[None]).mean(axis=(1, 2)) for c in cands]), axis=0)
        best = int(np.argmin(d))
        second = np.partition(d, 1)[1]
        assert d[best] < 3.0, f"no reference matches (best mean |diff| {d[best]:.2f} grey levels)"
        assert second > 3 * d[best] + 5.0, "ambiguous identification"
        out.append(best)
    return out


def _epoch(loader):
    ids, labels, nb = [], [], 0
    for x, y in loader:
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert x.ndim == 4 and x.shape[1:] == (1, 28, 28) and y.shape == (x.shape[0],)
        assert x.device.type == "cpu" and y.device.type == "cpu"
        nb += 1
        ids.append(x)
        labels += y.tolist()
    assert nb == len(loader)
    return torch.cat(ids), labels


# ---------------------------------------------------------------------------

@needs_fmnist
@pytest.mark.parametrize("backend", BACKENDS)
def test_val_labels_cover_every_sample_once(fm_tree, backend):
    root, ds, refs = fm_tree
    loader = build_loader(_cfg(root, backend, train=False))
    assert loader.backend == backend
    assert loader.classes == ds.classes and loader.classes == sorted(loader.classes)
    assert loader.num_samples == len(ds) == 39 and len(loader) == 10   # partial last batch kept
    x, labels = _epoch(loader)
    ids = _identify(x, refs)
    assert sorted(ids) == list(range(len(ds)))                       # every sample exactly once
    assert ids == list(range(len(ds)))                               # val: file order
    assert labels == [ds.targets[i] for i in ids]                    # ImageFolder's mapping
    # a second epoch is identical
    x2, labels2 = _epoch(loader)
    assert labels2 == labels and torch.allclose(x, x2)


@needs_fmnist
@pytest.mark.parametrize("backend", BACKENDS)
def test_train_labels_shuffle_and_epochs(fm_tree, backend):
    root, ds, refs = fm_tree
    # full-image crops so the identity of each training sample stays recoverable (up to a flip)
    loader = build_loader(_cfg(root, backend, train=True, scale=(1.0, 1.0), ratio=(1.0, 1.0), seed=3))
    assert len(loader) == 39 // 4 and loader.num_samples == 39          # drop_last by default for train
    loader.set_epoch(5)
    x, labels = _epoch(loader)
    ids = _identify(x, refs, allow_flip=True)
    assert len(ids) == len(set(ids)) == 36
    assert labels == [ds.targets[i] for i in ids]
    assert ids == loader.shard_indices(5)[:36]                           # shared, documented order
    assert ids != sorted(ids)                                            # shuffled
    loader.set_epoch(5)
    _, labels_again = _epoch(loader)
    assert labels_again == labels                                        # set_epoch reproducible
    _, labels_next = _epoch(loader)                                      # epoch advanced to 6
    assert labels_next != labels


@needs_fmnist
@pytest.mark.skipif(not HAVE_DALI, reason="nvidia.dali not importable")
def test_dali_and_torch_share_epoch_order(fm_tree):
    root, _, _ = fm_tree
    a = build_loader(_cfg(root, "dali", train=True, seed=11))
    b = build_loader(_cfg(root, "torch", train=True, seed=11))
    a.set_epoch(2)
    b.set_epoch(2)
    assert [y.tolist() for _, y in a] == [y.tolist() for _, y in b]


@needs_fmnist
@pytest.mark.skipif(not HAVE_DALI, reason="nvidia.dali not importable")
@pytest.mark.parametrize("channels", [3, 1])
def test_dali_cpu_matches_torch_on_validation(tmp_path, channels):
    # upsampled RGB JPEGs, resized again (36 -> 40) and centre-cropped to 32
    root = make_fashion_mnist_jpeg_tree(tmp_path / "rgb", per_class=2, split="test", size=36, rgb=True)
    mean, std = (0.485, 0.456, 0.406)[:channels], (0.229, 0.224, 0.225)[:channels]
    kw = dict(root=str(root), train=False, image_size=32, resize_size=40, batch_size=8,
              mean=mean, std=std, channels=channels, num_workers=1)
    outs = {}
    for backend in ("dali", "torch"):
        xs, ys = zip(*build_loader(LoaderConfig(loader=backend, **kw)))
        outs[backend] = (torch.cat(xs), torch.cat(ys))
    (xd, yd), (xt, yt) = outs["dali"], outs["torch"]
    assert xd.shape == xt.shape == (20, channels, 32, 32)
    assert torch.equal(yd, yt)
    s = torch.tensor(std).view(1, -1, 1, 1) * 255.0
    diff = ((xd - xt) * s).abs()                                         # grey levels
    assert diff.mean() < 1.5, f"mean |diff| {diff.mean():.2f} grey levels"
    assert diff.max() < 24, f"max |diff| {diff.max():.1f} grey levels"
    # sanity: the comparison is sensitive (a different image is far away)
    assert ((xd - xt.roll(1, 0)) * s).abs().mean() > 10


@pytest.fixture(scope="module")
def coord_tree(tmp_path_factory):
    """256x256 PNGs whose R channel is the x coordinate and G the y coordinate (lossless)."""
    root = tmp_path_factory.mktemp("coord") / "tree"
    yy, xx = np.mgrid[0:256, 0:256]
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(16):
            arr = np.stack([xx, yy, np.full_like(xx, 40 * i)], -1).astype(np.uint8)
            Image.fromarray(arr).save(root / c / f"{i:02d}.png")
    return root


def _recover_crops(x: torch.Tensor, S: int):
    """(width, height, flipped) of the source region of each output crop, in source pixels."""
    px = x * 255.0                                  # mean 0, std 1 below
    r, g = px[:, 0], px[:, 1]
    lo, hi = 3, S - 4                               # interior: avoid antialias border effects
    slope_x = (r[:, :, hi] - r[:, :, lo]).mean(dim=1) / (hi - lo)
    slope_y = (g[:, hi, :] - g[:, lo, :]).mean(dim=1) / (hi - lo)
    return slope_x.abs() * S, slope_y * S, slope_x < 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale,ratio", [((0.08, 1.0), (3 / 4, 4 / 3)), ((0.25, 0.35), (0.5, 0.6))])
def test_train_crops_within_scale_and_ratio(coord_tree, backend, scale, ratio):
    S = 32
    cfg = LoaderConfig(root=str(coord_tree), train=True, image_size=S, batch_size=8, mean=(0, 0, 0),
                       std=(1, 1, 1), loader=backend, num_workers=1, scale=scale, ratio=ratio, seed=1)
    loader = build_loader(cfg)
    w, h, flipped = [], [], []
    for ep in range(2):
        loader.set_epoch(ep)
        for x, _ in loader:
            a, b, f = _recover_crops(x, S)
            w.append(a)
            h.append(b)
            flipped.append(f)
    w, h, flipped = torch.cat(w), torch.cat(h), torch.cat(flipped)
    assert len(w) == 64
    area = w * h / (256 * 256)
    ar = w / h
    tol = 0.04
    assert (area >= scale[0] * (1 - tol)).all() and (area <= scale[1] * (1 + tol)).all(), area
    assert (ar >= ratio[0] * (1 - tol)).all() and (ar <= ratio[1] * (1 + tol)).all(), ar
    # the ranges are actually explored, and both flip states occur
    assert area.max() - area.min() > 0.4 * (scale[1] - scale[0])
    assert ar.max() - ar.min() > 0.3 * (ratio[1] - ratio[0])
    assert 0.2 < flipped.float().mean() < 0.8


@needs_fmnist
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("train", [False, True])
def test_two_shards_cover_every_sample_once(fm_tree, backend, train):
    root, ds, refs = fm_tree
    kw = dict(scale=(1.0, 1.0), ratio=(1.0, 1.0)) if train else {}
    per_rank = []
    for rank in range(2):
        loader = build_loader(_cfg(root, backend, train, shard_id=rank, num_shards=2, seed=7, **kw))
        loader.set_epoch(1)
        x, labels = _epoch(loader)
        ids = _identify(x, refs, allow_flip=train)
        assert labels == [ds.targets[i] for i in ids]
        assert ids == loader.shard_indices(1)[: len(ids)]
        per_rank.append((ids, len(loader), loader.num_samples))
    (ids0, n0, s0), (ids1, n1, s1) = per_rank
    assert not set(ids0) & set(ids1)
    if train:   # 39 -> 38 (multiple of 2), 19 per rank, 4 full batches of 4 each
        assert s0 == s1 == 19 and n0 == n1 == 4 and len(ids0) == len(ids1) == 16
        assert len(set(ids0) | set(ids1)) == 32
    else:       # every sample exactly once across the ranks, no padding duplicates
        assert s0 + s1 == 39 and {s0, s1} == {19, 20}
        assert sorted(ids0 + ids1) == list(range(39))


@needs_fmnist
@pytest.mark.skipif(not HAVE_DALI, reason="nvidia.dali not importable")
def test_dali_and_torch_shards_agree(fm_tree):
    root, _, _ = fm_tree
    for rank in range(2):
        got = []
        for backend in ("dali", "torch"):
            loader = build_loader(_cfg(root, backend, train=False, shard_id=rank, num_shards=2))
            got.append(torch.cat([y for _, y in loader]).tolist())
        assert got[0] == got[1]


@needs_fmnist
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_jpeg_raises_naming_the_file(tmp_path, backend, damage):
    root = make_fashion_mnist_jpeg_tree(tmp_path / "t", per_class=3, split="test", size=64)
    bad = sorted((root / "pullover").iterdir())[1]
    if damage == "garbage":
        bad.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg" * 8)
    else:
        bad.write_bytes(bad.read_bytes()[:-300])
    assert find_corrupt_images(str(root)) == [str(bad)]
    loader = build_loader(_cfg(root, backend, train=False, num_workers=2, image_size=56, resize_size=64))
    with pytest.raises(CorruptImageError, match="cannot decode image file") as ei:
        for _ in loader:
            pass
    assert str(bad) in str(ei.value)
    assert ei.value.paths == [str(bad)]


def test_dali_requested_but_missing_gives_install_hint(tmp_path, monkeypatch):
    root = tmp_path / "t"
    (root / "c0").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "c0" / "x.png")
    for mod in ("nvidia.dali", "nvidia.dali.plugin", "nvidia.dali.plugin.pytorch"):
        monkeypatch.setitem(sys.modules, mod, None)       # makes `import nvidia.dali` fail
    cfg = _cfg(root, "dali", train=False, image_size=8, resize_size=8)
    with pytest.raises(RuntimeError, match=r"pip install 'srel-fast\[dali\]'"):
        build_loader(cfg)
    cfg.loader = "auto"
    loader = build_loader(cfg)
    assert loader.backend == "torch"
    (x, y), = list(loader)
    assert x.shape == (1, 1, 8, 8) and torch.allclose(x, torch.full_like(x, -2.0)) and y.tolist() == [0]


def test_bad_config_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError):
        build_loader(_cfg(tmp_path / "missing", "torch", train=False))
    (tmp_path / "c").mkdir()
    with pytest.raises(ValueError, match="mean and std"):
        build_loader(LoaderConfig(root=str(tmp_path), train=False, image_size=8, batch_size=2,
                                  mean=(0.5,), std=(0.5,), channels=3))


@needs_fmnist
@pytest.mark.parametrize("backend", BACKENDS)
def test_train_augmentation_reproducible(fm_tree, backend):
    root, _, _ = fm_tree

    def epoch(workers, ep):
        loader = build_loader(_cfg(root, backend, train=True, seed=5, num_workers=workers, scale=(0.3, 1.0)))
        loader.set_epoch(ep)
        out = torch.cat([x for x, _ in loader])
        loader.close()
        return out

    a = epoch(1, 4)
    assert torch.equal(a, epoch(1, 4))
    assert not torch.equal(a, epoch(1, 5))
    if backend == "torch":   # per-sample seeds: independent of the worker count
        assert torch.equal(a, epoch(0, 4)) and torch.equal(a, epoch(2, 4))


@needs_fmnist
def test_bench_loader_smoke(tmp_path):
    from srel_fast.bench import bench_loader

    out = tmp_path / "r" / "loader.json"
    rc = bench_loader.main(["--per-class", "6", "--epochs", "1", "--warmup", "0", "--batch-size", "16",
                            "--workers", "1", "--out", str(out)])
    assert rc == 0
    import json

    rec = json.loads(out.read_text())
    names = [r["loader"] for r in rec["results"]]
    assert "torch" in names and (("dali-cpu" in names) == HAVE_DALI)
    assert all(r["img_per_s"] > 0 and r["images_per_epoch"] == 48 for r in rec["results"])
    assert rec["command"].startswith("srel-fast bench loader") and rec["environment"]["torch"]
    assert "| torch |" in out.with_suffix(".md").read_text()
