"""Small JPEG ImageFolder trees written from the embedded Fashion-MNIST data.

A fixture of the loader tests and of ``srel-fast bench loader``: a real JPEG tree
(class sub-folders, ImageNet layout) built from real images, without network. The
images come from srel_fast.data (the Debian package ``dataset-fashion-mnist``).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from srel_fast.data import FASHION_MNIST_CLASSES, load_fashion_mnist

#: Folder names, in Fashion-MNIST label order (0..9): the class names as file names
#: (``tshirt_top``, ..., ``ankle_boot``). Their *sorted* order differs from the label
#: order, so a tree written with them also checks that loaders use ImageFolder's
#: sorted-name mapping.
FOLDER_NAMES = tuple(c.lower().replace("-", "").replace("/", "_").replace(" ", "_") for c in FASHION_MNIST_CLASSES)


def make_fashion_mnist_jpeg_tree(
    out_dir: str | os.PathLike,
    per_class: int,
    split: str = "train",
    size: int | None = None,
    *,
    rgb: bool = False,
    quality: int = 95,
    ext: str = ".jpg",
) -> Path:
    """Write ``per_class`` Fashion-MNIST images of every class as an ImageFolder JPEG tree.

    ``out_dir/<class name>/<split>_<index in the split>.jpg``; the first
    ``per_class`` images of each class in data-set order are used, so the tree
    is deterministic. ``split`` is "train" or "test". ``size`` upsamples the
    28x28 images (PIL bilinear) to ``size x size``; ``rgb=True`` writes 3-channel
    JPEGs (grey replicated), otherwise single-channel (mode "L") JPEGs. Returns
    ``Path(out_dir)``.
    """
    from PIL import Image

    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    data = load_fashion_mnist(split)
    images, labels = data.images[:, 0].numpy(), data.labels.numpy()
    out = Path(out_dir)
    for c, name in enumerate(FOLDER_NAMES):
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
