"""An ImageFolder tree and what every loader over it shares (srel_fast.loaders has the semantics):
the files and labels exactly as torchvision's ImageFolder finds them, the check for files that do
not decode, the loader config, and the ImageLoader base (epoch order, sharding, batches per epoch)
that the torch (loader_torch.py) and DALI (loader_dali.py) back-ends extend."""
from __future__ import annotations

import abc
import math
import os
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from .distributed import resolve_device, shard_bounds
from .errors import UserError


class CorruptImageError(UserError, RuntimeError):
    """An image file in the data tree cannot be decoded. ``paths`` lists the offending files.
    A UserError, so the CLI reports it as one sentence naming the file."""

    def __init__(self, message: str, paths: Sequence[str] = ()):
        super().__init__(message)
        self.paths = list(paths)


@dataclass
class LoaderConfig:
    root: str                 # ImageFolder tree (class subfolders, ImageNet layout ok)
    train: bool               # True: RandomResizedCrop+flip; False: resize + centre crop
    image_size: int           # output side
    batch_size: int
    mean: tuple[float, ...]   # normalisation, in [0,1] pixel units
    std: tuple[float, ...]
    channels: int = 3         # 3 = RGB, 1 = grey
    loader: str = "auto"      # auto | dali | torch
    num_workers: int = 2
    shard_id: int = 0         # torchrun rank
    num_shards: int = 1       # world size
    seed: int = 0
    drop_last: bool | None = None   # default: train
    device: str = "cpu"       # where the batches should land; "cuda" -> DALI device="mixed" decode
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    resize_size: int | None = None  # val: shorter side before centre crop; default round(image_size / 0.875)
    val_resize: bool = True   # False: validation images as they are, centre-cropped to image_size but never
                              # resized (the official Tiny-ImageNet evaluation of the raw 64 px images)

    # -- derived values -------------------------------------------------------
    @property
    def effective_drop_last(self) -> bool:
        return bool(self.train) if self.drop_last is None else bool(self.drop_last)

    @property
    def effective_resize_size(self) -> int:
        return int(round(self.image_size / 0.875)) if self.resize_size is None else int(self.resize_size)

    def validate(self) -> None:
        if not os.path.isdir(self.root):
            raise FileNotFoundError(f"data root {self.root!r} is not a directory")
        if self.loader not in ("auto", "dali", "torch"):
            raise ValueError(f"loader must be 'auto', 'dali' or 'torch', got {self.loader!r}")
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 (grey) or 3 (RGB), got {self.channels}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(f"mean and std need {self.channels} values each, got {len(self.mean)} and {len(self.std)}")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std must be positive, got {self.std}")
        if self.image_size < 1 or self.batch_size < 1:
            raise ValueError("image_size and batch_size must be positive")
        if self.num_workers < 0:
            raise ValueError("num_workers must be >= 0")
        if not (0 <= self.shard_id < self.num_shards):
            raise ValueError(f"shard_id must be in [0, num_shards), got {self.shard_id} of {self.num_shards}")
        if not (0 < self.scale[0] <= self.scale[1] <= 1.0):
            raise ValueError(f"scale must satisfy 0 < lo <= hi <= 1, got {self.scale}")
        if not (0 < self.ratio[0] <= self.ratio[1]):
            raise ValueError(f"ratio must satisfy 0 < lo <= hi, got {self.ratio}")
        if not self.train and self.val_resize and self.effective_resize_size < self.image_size:
            raise ValueError(f"resize_size ({self.effective_resize_size}) must be >= image_size ({self.image_size})")


def scan_image_folder(root: str) -> tuple[list[str], dict[str, int], list[tuple[str, int]]]:
    """``(classes, class_to_idx, samples)`` exactly as ``torchvision.datasets.ImageFolder`` builds them."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    classes, class_to_idx = find_classes(root)
    samples = make_dataset(root, class_to_idx, extensions=IMG_EXTENSIONS)
    if not samples:
        raise FileNotFoundError(f"no image files found under {root!r}")
    return classes, class_to_idx, samples


def _pil_decodes(path: str) -> bool:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
        return True
    except Exception:
        return False


def find_corrupt_images(paths: Sequence[str] | str) -> list[str]:
    """Files among ``paths`` (or all images of an ImageFolder tree) that PIL cannot fully decode.

    A full decode (not ``Image.verify()``, which does not check JPEG data),
    so it costs about one decode per file.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [p for p, _ in scan_image_folder(str(paths))[2]]
    return [p for p in paths if not _pil_decodes(p)]


def mix_seed(seed: int, epoch: int, shard_id: int) -> int:
    """The augmentation seed of an epoch on a shard (both back-ends derive theirs from it)."""
    return (int(seed) * 1_000_003 + int(epoch) * 7_919 + int(shard_id) * 104_729 + 12_345) % (2**31 - 1)


def _resolve_device(device: str) -> torch.device:
    """srel_fast.distributed.resolve_device, with the CUDA index made explicit (DALI's device_id)."""
    dev = resolve_device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    elif dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda[:i]', got {device!r}")
    return dev


# -----------------------------------------------------------------------------
# the loader
# -----------------------------------------------------------------------------

class ImageLoader(abc.ABC):
    """Iterable over epochs yielding ``(images, labels)``; see the module docstring."""

    backend: str = ""

    def __init__(self, cfg: LoaderConfig):
        self.cfg = cfg
        self.device = _resolve_device(cfg.device)
        self.classes, self.class_to_idx, self.samples = scan_image_folder(cfg.root)
        self.drop_last = cfg.effective_drop_last
        self.batch_size = int(cfg.batch_size)
        n = len(self.samples)
        self._epoch_total = (n // cfg.num_shards) * cfg.num_shards if self.drop_last else n
        if self._epoch_total == 0:
            raise ValueError(f"{n} samples cannot be split over {cfg.num_shards} shards with drop_last=True")
        lo, hi = shard_bounds(self._epoch_total, cfg.shard_id, cfg.num_shards)
        self.num_samples = hi - lo
        self.epoch = 0

    # -- epoch bookkeeping ----------------------------------------------------
    def __len__(self) -> int:
        if self.drop_last:
            return self.num_samples // self.batch_size
        return math.ceil(self.num_samples / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Use ``epoch`` for the next iteration (shuffle order and augmentation seeds)."""
        self.epoch = int(epoch)

    def epoch_order(self, epoch: int) -> list[int]:
        """Global sample order of ``epoch`` (before sharding, after drop_last truncation)."""
        n = len(self.samples)
        if self.cfg.train:
            g = torch.Generator()
            g.manual_seed(int(self.cfg.seed) + int(epoch))
            order = torch.randperm(n, generator=g).tolist()
        else:
            order = list(range(n))
        return order[: self._epoch_total]

    def shard_indices(self, epoch: int) -> list[int]:
        """Sample indices this shard visits in ``epoch``, in order (before dropping the last partial batch)."""
        order = self.epoch_order(epoch)
        lo, hi = shard_bounds(len(order), self.cfg.shard_id, self.cfg.num_shards)
        return order[lo:hi]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch = self.epoch
        self.epoch += 1
        return self._iter_epoch(epoch)

    @abc.abstractmethod
    def _iter_epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield one epoch's batches; each back-end implements it."""

    def close(self) -> None:
        """Release worker processes/threads held between epochs (no-op when none)."""

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(backend={self.backend!r}, root={self.cfg.root!r}, train={self.cfg.train}, "
                f"samples={self.num_samples}/{len(self.samples)}, batches={len(self)}, device={str(self.device)!r})")
