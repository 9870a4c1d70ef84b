"""Write small JPEG ImageFolder trees from the embedded Fashion-MNIST data.

Used by the loader tests and by ``bench/bench_loader.py``: a real JPEG tree
(class sub-folders, ImageNet layout) built from real images, without network.

The raw idx files come from the Debian package ``dataset-fashion-mnist``
(``/usr/share/datasets/fashion-mnist/``); they are read with gzip + numpy.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

FASHION_MNIST_DIR = os.environ.get("SREL_FAST_FASHION_MNIST", "/usr/share/datasets/fashion-mnist")

#: Folder names, in Fashion-MNIST label order (0..9). Their *sorted* order
#: differs from the label order, so a tree written with them also checks that
#: loaders use ImageFolder's sorted-name mapping.
FASHION_MNIST_CLASSES = (
    "tshirt_top", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle_boot",
)

_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def _read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one (optionally gzipped) idx file into a numpy array."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path} is not an idx file (bad magic number)")
    dtype_code, ndim = data[2], data[3]
    if dtype_code != 0x08:
        raise ValueError(f"{path}: only unsigned-byte idx files are supported (type 0x{dtype_code:02x})")
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    arr = np.frombuffer(data, dtype=np.uint8, offset=offset)
    if arr.size != int(np.prod(shape)):
        raise ValueError(f"{path}: expected {int(np.prod(shape))} values, found {arr.size}")
    return arr.reshape(shape)


def load_fashion_mnist(split: str = "train", root: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(images uint8 [N,28,28], labels int64 [N])`` for ``split`` in {"train", "test"}."""
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(root or FASHION_MNIST_DIR)
    img_name, lab_name = _FILES[split]
    img_path, lab_path = root / img_name, root / lab_name
    for p in (img_path, lab_path):
        if not p.exists():
            raise FileNotFoundError(
                f"Fashion-MNIST file {p} not found; install it with "
                "`apt-get install dataset-fashion-mnist` or set SREL_FAST_FASHION_MNIST.")
    images = _read_idx(img_path)
    labels = _read_idx(lab_path).astype(np.int64)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{img_path} and {lab_path} disagree on the number of samples")
    return images, labels


def make_fashion_mnist_jpeg_tree(
    out_dir: str | os.PathLike,
    per_class: int,
    split: str = "train",
    size: int | None = None,
    *,
    rgb: bool = False,
    quality: int = 95,
    ext: str = ".jpg",
    root: str | os.PathLike | None = None,
) -> Path:
    """Write ``per_class`` Fashion-MNIST images of every class as an ImageFolder JPEG tree.

    ``out_dir/<class name>/<split>_<index in the split>.jpg``; the first
    ``per_class`` images of each class in data-set order are used, so the tree
    is deterministic. ``size`` upsamples the 28x28 images (PIL bilinear) to
    ``size x size``; ``rgb=True`` writes 3-channel JPEGs (grey replicated),
    otherwise single-channel (mode "L") JPEGs. Returns ``Path(out_dir)``.
    """
    from PIL import Image

    images, labels = load_fashion_mnist(split, root)
    out = Path(out_dir)
    for c, name in enumerate(FASHION_MNIST_CLASSES):
        idx = np.flatnonzero(labels == c)[:per_class]
        if len(idx) < per_class:
            raise ValueError(f"class {name} has only {len(idx)} {split} images, asked for {per_class}")
        d = out / name
        d.mkdir(parents=True, exist_ok=True)
        for i in idx:
            im = Image.fromarray(images[i], mode="L")
            if size is not None and size != 28:
                im = im.resize((size, size), Image.BILINEAR)
            if rgb:
                im = im.convert("RGB")
            im.save(d / f"{split}_{int(i):05d}{ext}", quality=quality)
    return out
