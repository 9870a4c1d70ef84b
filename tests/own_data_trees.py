"""ImageFolder trees written by the tests of issue 19 (the user's own data)."""
from __future__ import annotations

import os

import numpy as np
from PIL import Image


def class_image(c: int, classes: int, w: int, h: int, channels: int, rng: np.random.Generator) -> np.ndarray:
    """A learnable image of class ``c``: a bright horizontal band whose height depends on the class,
    on a noisy background; colour images tint the band by class too."""
    img = rng.integers(0, 90, size=(h, w, channels)).astype(np.float64)
    top = int(c * h / classes)
    band = slice(top, max(top + 1, int((c + 1) * h / classes)))
    img[band] += 150
    if channels == 3:
        img[band, :, c % 3] += 40
    return np.clip(img, 0, 255).astype(np.uint8)


def write_tree(root, classes: int = 4, per_class: int = 10, size=28, channels: int = 1, fmt: str = "png",
               seed: int = 0) -> str:
    """``size``: one int (square images), or a list of (width, height) used in turn (mixed sizes)."""
    rng = np.random.default_rng(seed)
    sizes = [(size, size)] if isinstance(size, int) else list(size)
    k = 0
    for c in range(classes):
        d = os.path.join(str(root), f"class{c}")
        os.makedirs(d, exist_ok=True)
        for i in range(per_class):
            w, h = sizes[k % len(sizes)]
            k += 1
            arr = class_image(c, classes, w, h, channels, rng)
            im = Image.fromarray(arr[:, :, 0], mode="L") if channels == 1 else Image.fromarray(arr, mode="RGB")
            im.save(os.path.join(d, f"img{i:04d}.{fmt}"), quality=90) if fmt == "jpg" else im.save(
                os.path.join(d, f"img{i:04d}.{fmt}"))
    return str(root)


def tree_mean_std(root, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std of every pixel of every image (the reference for the fast pass)."""
    px = []
    for dirpath, _, files in sorted(os.walk(str(root))):
        for f in sorted(files):
            if f.startswith("."):
                continue
            with Image.open(os.path.join(dirpath, f)) as im:
                a = np.asarray(im.convert("L" if channels == 1 else "RGB"), dtype=np.float64) / 255
            px.append(a.reshape(-1, channels))
    px = np.concatenate(px)
    return px.mean(0), px.std(0, ddof=1)
