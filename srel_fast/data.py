"""Data: the built-in real data sets and ImageFolder trees.

Built-in names (no network needed):
- ``fashion-mnist``: Fashion-MNIST from the Debian package dataset-fashion-mnist
  (/usr/share/datasets/fashion-mnist/), 60k train / 10k test, 28x28 grey.
- ``digits``: scikit-learn's bundled 8x8 digits (1797 images), split 75/25
  with a seeded stratified split.
Built-in sets are held in memory as uint8 tensors; augmentation runs batched
on the tensor's device. A directory is an ImageFolder tree (ImageNet layout)
read by srel_fast.loaders (DALI or a torch DataLoader).
"""
from __future__ import annotations

import gzip
import os
from dataclasses import dataclass

import numpy as np
import torch

from .errors import UserError

FASHION_MNIST_DIR = os.environ.get("SREL_FAST_FASHION_MNIST", "/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]


BUILTIN = ("fashion-mnist", "digits")


@dataclass
class TensorData:
    """An in-memory labelled image set: uint8 images (N, C, H, W), int64 labels."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]

    def __len__(self) -> int:
        return int(self.labels.numel())

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.images.shape[-1])


@dataclass
class Normalization:
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def tensors(self, device=None, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        m = torch.tensor(self.mean, device=device, dtype=dtype).view(1, -1, 1, 1)
        s = torch.tensor(self.std, device=device, dtype=dtype).view(1, -1, 1, 1)
        return m, s

    def normalize(self, images_uint8_or_unit: torch.Tensor) -> torch.Tensor:
        x = images_uint8_or_unit
        if x.dtype == torch.uint8:
            x = x.float().div_(255.0)
        m, s = self.tensors(x.device)
        return (x - m) / s

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        m, s = self.tensors(x.device, x.dtype)
        return x * s + m

    def clamp_bounds(self, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel bounds of the normalised image of [0, 1] pixels."""
        m, s = self.tensors(device)
        return (0 - m) / s, (1 - m) / s


def is_builtin(name: str) -> bool:
    return name in BUILTIN


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """One unsigned-byte idx file (gzipped when its name ends in .gz) as a numpy array."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path} is not an idx file (bad magic number)")
    dtype_code, ndim = data[2], data[3]
    if dtype_code != 0x08:
        raise ValueError(f"{path}: only unsigned-byte idx files are supported (type 0x{dtype_code:02x})")
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise ValueError(f"{path}: expected {int(np.prod(shape))} values, found {arr.size}")
    return arr.reshape(shape)


def load_fashion_mnist(split: str) -> TensorData:
    prefix = "train" if split == "train" else "t10k"
    img_path = os.path.join(FASHION_MNIST_DIR, f"{prefix}-images-idx3-ubyte.gz")
    lbl_path = os.path.join(FASHION_MNIST_DIR, f"{prefix}-labels-idx1-ubyte.gz")
    for p in (img_path, lbl_path):
        if not os.path.exists(p):
            raise UserError(
                f"Fashion-MNIST file {p} is missing; install it with "
                "'apt-get install dataset-fashion-mnist' or set SREL_FAST_FASHION_MNIST."
            )
    images = torch.from_numpy(read_idx(img_path).copy()).unsqueeze(1)
    labels = torch.from_numpy(read_idx(lbl_path).astype(np.int64))
    return TensorData(images, labels, list(FASHION_MNIST_CLASSES))


def load_digits(split: str, seed: int = 0) -> TensorData:
    from sklearn.datasets import load_digits as _load
    from sklearn.model_selection import train_test_split

    d = _load()
    # sklearn's digits are 0..16; scale to 0..255 grey.
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    idx = np.arange(len(d.target))
    train_idx, test_idx = train_test_split(idx, test_size=0.25, stratify=d.target, random_state=seed)
    pick = train_idx if split == "train" else test_idx
    pick = np.sort(pick)
    return TensorData(
        torch.from_numpy(images[pick].copy()),
        torch.from_numpy(d.target[pick].astype(np.int64)),
        [str(i) for i in range(10)],
    )


def load_builtin(name: str, split: str, seed: int = 0) -> TensorData:
    if split not in ("train", "test"):
        raise UserError(f"unknown split {split!r}; use 'train' or 'test'.")
    if name == "fashion-mnist":
        return load_fashion_mnist(split)
    if name == "digits":
        return load_digits(split, seed)
    raise UserError(f"unknown built-in data set {name!r}; built-in names are {', '.join(BUILTIN)}.")


def random_real_subset(data: TensorData, ipc: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``ipc`` random real images of every class (the random-real baseline's memory): images, labels."""
    g = torch.Generator().manual_seed(seed)
    picks = []
    for c in range(data.num_classes):
        idx = torch.nonzero(data.labels == c).flatten()
        picks.append(idx[torch.randperm(len(idx), generator=g)[:ipc]])
    idx = torch.cat(picks)
    return data.images[idx], data.labels[idx]


def dataset_normalization(data: TensorData) -> Normalization:
    """Per-channel mean/std of a training set, in [0,1] pixel units."""
    x = data.images.float().div_(255.0)
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3))
    return Normalization(tuple(round(float(v), 4) for v in mean), tuple(round(float(v), 4) for v in std))


def check_data_path(data: str) -> None:
    """Refuse a data argument that is neither a built-in name nor an ImageFolder tree."""
    if is_builtin(data):
        return
    if not os.path.exists(data):
        raise UserError(f"data path {data} does not exist (and is not a built-in name: {', '.join(BUILTIN)}).")
    if not os.path.isdir(data):
        raise UserError(f"data path {data} is not a directory; expected an ImageFolder tree with one folder per class.")
    classes = [d for d in sorted(os.listdir(data)) if os.path.isdir(os.path.join(data, d))]
    if not classes:
        raise UserError(f"data path {data} has no class folders; expected an ImageFolder tree with one folder per class.")
    for c in classes:
        if not any(not f.startswith(".") for f in os.listdir(os.path.join(data, c))):
            raise UserError(f"class folder {os.path.join(data, c)} is empty.")
