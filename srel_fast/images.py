"""Synthetic image trees: one folder per class, one lossless PNG per image.

Folder names are zero-padded class indices (``00000``, ``00001``, ...), so
that sorting them (as torchvision's ImageFolder does) gives back the class
index; the class names are kept in the manifest."""
from __future__ import annotations

import io
import os
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from .data import Normalization
from .errors import UserError
from .files import atomic_write_bytes, read_json

if TYPE_CHECKING:
    from .models import LoadedModel

IMAGE_EXTS = (".png", ".jpg", ".jpeg")


def class_dir(out: str, class_index: int) -> str:
    return os.path.join(out, f"{class_index:05d}")


def image_path(out: str, class_index: int, ipc_index: int, fmt: str = "png") -> str:
    return os.path.join(class_dir(out, class_index), f"ipc{ipc_index:05d}.{fmt}")


def pack_tiles(tiles: torch.Tensor, per_side: int) -> torch.Tensor:
    """(n * k * k, C, h, w) -> (n, C, k * h, k * w): tile t of image i (tiles i*k*k .. i*k*k+k*k-1)
    goes to row t // k, column t % k (IDC's multi-formation storage)."""
    k = per_side
    if k == 1:
        return tiles
    n, c, h, w = tiles.shape
    if n % (k * k):
        raise ValueError(f"{n} tiles do not fill images of {k} x {k} tiles")
    return tiles.reshape(n // (k * k), k, k, c, h, w).permute(0, 3, 1, 4, 2, 5).reshape(n // (k * k), c, k * h, k * w)


def unpack_tiles(images: torch.Tensor, per_side: int) -> torch.Tensor:
    """The inverse of pack_tiles: (n, C, H, W) -> (n * k * k, C, H / k, W / k)."""
    k = per_side
    n, c, hh, ww = images.shape
    if hh % k or ww % k:
        raise ValueError(f"images of {hh} x {ww} do not split into {k} x {k} tiles")
    h, w = hh // k, ww // k
    return images.reshape(n, c, k, h, k, w).permute(0, 2, 4, 1, 3, 5).reshape(n * k * k, c, h, w)


def decode_tiles(images: torch.Tensor, per_side: int) -> torch.Tensor:
    """Stored images of k x k tiles -> k*k images each, upsampled to the stored size the way
    recovery saw them (the multi-crop resize of the whole tile: bilinear, align_corners=False,
    no antialias)."""
    if per_side == 1:
        return images
    tiles = unpack_tiles(images, per_side)
    tiles = tiles if tiles.is_floating_point() else tiles.float()
    return torch.nn.functional.interpolate(tiles, size=images.shape[-2:], mode="bilinear", align_corners=False,
                                           antialias=False)


IMAGE_FORMATS = ("png", "jpg")
PIXEL_ROUNDINGS = ("round", "truncate")


def to_uint8(x01: torch.Tensor, rounding: str = "round") -> np.ndarray:
    """(C, H, W) float in [0,1] -> (H, W, C) uint8.

    ``round``: to the nearest level, as torchvision.utils.save_image.
    ``truncate``: the official SRe2L code's ``(x * 255).astype(np.uint8)`` (x * 255 in
    float32, then towards zero), which darkens every pixel by half a level on average."""
    x255 = x01.detach().float().mul(255)
    if rounding == "round":
        x255 = x255.add_(0.5).clamp_(0, 255)
    elif rounding == "truncate":
        x255 = x255.clamp_(0, 255)  # x01 is in [0, 1]; the clamp only guards the cast
    else:
        raise UserError(f"unknown pixel rounding {rounding!r}; use {' or '.join(PIXEL_ROUNDINGS)}.")
    return x255.to(torch.uint8).permute(1, 2, 0).cpu().numpy()


def encode_image(x01: torch.Tensor, fmt: str = "png", jpeg_quality: int = 95, rounding: str = "round") -> bytes:
    """PNG (lossless) or JPEG bytes of a [0, 1] image. JPEG uses PIL's encoder with its
    other defaults (4:2:0 chroma subsampling, baseline); at quality 75 it is byte for
    byte the official code's ``Image.fromarray(...).save(path)``, which relies on
    PIL's default quality of 75."""
    arr = to_uint8(x01, rounding)
    img = Image.fromarray(arr[:, :, 0], mode="L") if arr.shape[2] == 1 else Image.fromarray(arr, mode="RGB")
    buf = io.BytesIO()
    if fmt == "png":
        img.save(buf, format="PNG")
    elif fmt in ("jpg", "jpeg"):
        img.save(buf, format="JPEG", quality=int(jpeg_quality))
    else:
        raise UserError(f"unknown image format {fmt!r}; use png or jpg.")
    return buf.getvalue()


def save_image(path: str, x01: torch.Tensor, fmt: str = "png", jpeg_quality: int = 95, rounding: str = "round") -> None:
    atomic_write_bytes(path, encode_image(x01, fmt, jpeg_quality, rounding))


def tree_files(root: str) -> tuple[list[tuple[str, int]], list[str]]:
    """The image files of a tree as (path, label), in load_tree's order, and the classes: the
    sorted folder names, as in torchvision's ImageFolder."""
    if not os.path.isdir(root):
        raise UserError(f"image folder {root} does not exist.")
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))
    if not classes:
        raise UserError(f"image folder {root} has no class folders.")
    listing = []
    for label, c in enumerate(classes):
        files = sorted(f for f in os.listdir(os.path.join(root, c)) if f.lower().endswith(IMAGE_EXTS) and not f.startswith("."))
        if not files:
            raise UserError(f"class folder {os.path.join(root, c)} holds no images.")
        listing += [(os.path.join(root, c, f), label) for f in files]
    return listing, classes


def load_tree(root: str, channels: int | None = None) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Read an image tree into uint8 images (N, C, H, W) and labels; classes are
    the sorted folder names, as in torchvision's ImageFolder."""
    listing, classes = tree_files(root)
    images, labels = read_listing(root, listing, channels)
    return images, labels, classes


def read_listing(root: str, listing: list[tuple[str, int]], channels: int | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The uint8 images (N, C, H, W) and labels of tree_files' listing of ``root``."""
    images, labels = [], []
    for path, label in listing:
        try:
            with Image.open(path) as im:
                mode = {1: "L", 3: "RGB"}.get(channels or (1 if im.mode in ("L", "I", "1") else 3))
                arr = np.asarray(im.convert(mode))
        except Exception as exc:  # noqa: BLE001
            raise UserError(f"image {path} cannot be read ({type(exc).__name__}).") from None
        if arr.ndim == 2:
            arr = arr[:, :, None]
        images.append(torch.from_numpy(arr.copy()).permute(2, 0, 1))
        labels.append(label)
    shapes = {tuple(t.shape) for t in images}
    if len(shapes) != 1:
        raise UserError(f"images under {root} have different shapes {sorted(shapes)[:3]}; expected one size.")
    return torch.stack(images), torch.tensor(labels, dtype=torch.int64)


def save_grid(path: str, images01: torch.Tensor, labels: torch.Tensor, per_class: int = 10, class_names=None) -> None:
    """A per-class grid PNG: one row per class, up to ``per_class`` images."""
    import torchvision

    rows = []
    for c in sorted(set(labels.tolist())):
        sel = images01[labels == c][:per_class]
        if sel.shape[0] < per_class:
            sel = torch.cat([sel, torch.ones(per_class - sel.shape[0], *sel.shape[1:])])
        rows.append(sel)
    grid = torchvision.utils.make_grid(torch.cat(rows), nrow=per_class, padding=2, pad_value=1.0)
    scale = max(1, 64 // images01.shape[-1])
    arr = to_uint8(grid)
    img = Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def load_synthetic(root: str, teacher: "LoadedModel | None", device) -> tuple[torch.Tensor, torch.Tensor, Normalization]:
    """Synthetic tree -> normalised float images on ``device``, labels, normalisation.
    The normalisation is the recovery run's (manifest) or the teacher's. Stored images that
    hold tiles (``tiles_per_side`` k > 1, the first ``tiled_images`` of each class) come back
    decoded: k*k full-size images each, before the whole images."""
    config_path = os.path.join(root, "recover_config.json")
    per_side, tiled_images = 1, 0
    if os.path.exists(config_path):
        rec = read_json(config_path)
        norm = Normalization(tuple(rec["mean"]), tuple(rec["std"]))
        n_cls = len(rec["classes"])
        per_side = int(rec["config"].get("tiles_per_side") or 1)
        # before --tiled-images every stored image of a tiled run held tiles
        tiled_images = int(rec["config"].get("tiled_images", rec["config"]["ipc"] if per_side > 1 else 0))
    elif teacher is not None:
        norm, n_cls = Normalization(teacher.mean, teacher.std), teacher.spec.num_classes
    else:
        raise UserError(f"{root} has no recover_config.json; pass --teacher so its normalisation can be used.")
    listing, classes = tree_files(root)
    images, labels = read_listing(root, listing)
    folder_ids = [int(c) if c.isdigit() else None for c in classes]
    if None not in folder_ids:  # srel-fast trees name folders by class index
        labels = torch.tensor(folder_ids)[labels]
    if teacher is not None and teacher.spec.num_classes != n_cls:
        raise UserError(f"the teacher has {teacher.spec.num_classes} classes but the synthetic set {root} has {n_cls}.")
    if int(labels.max()) >= n_cls:
        raise UserError(f"the synthetic set {root} has class folders beyond its {n_cls} classes.")
    images, labels = norm.normalize(images.to(device)), labels.to(device)
    if per_side == 1:
        return images, labels, norm
    tiled = torch.tensor([stored_ipc_index(path) < tiled_images for path, _ in listing], device=device)
    images = torch.cat([decode_tiles(images[tiled], per_side), images[~tiled]])
    labels = torch.cat([labels[tiled].repeat_interleave(per_side * per_side), labels[~tiled]])
    return images, labels, norm


def stored_ipc_index(path: str) -> int:
    """The index of a recovered image within its class, from its name (image_path)."""
    name = os.path.basename(path)
    if not (name.startswith("ipc") and name.split(".")[0][3:].isdigit()):
        raise UserError(f"{path} is not named as a recovered image (ipcNNNNN.png); its tiles cannot be told.")
    return int(name.split(".")[0][3:])
