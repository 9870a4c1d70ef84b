"""The torch back-end of the ImageFolder loaders: PIL decode and torchvision.transforms.functional
ops with per-sample seeded random draws, driven by a torch DataLoader whose workers persist across
epochs (semantics: srel_fast.loaders)."""
from __future__ import annotations

import math
import random

import torch

from .image_folder import CorruptImageError, ImageLoader, LoaderConfig, mix_seed
from .kernels.crop_sampler import fallback_crop_box


class _FolderDataset(torch.utils.data.Dataset):
    """ImageFolder samples; items are ``(index, seed)`` pairs from :class:`_EpochSampler`.

    The random transform of each sample runs under its own RNG seed (derived
    from ``(seed, epoch, index)``), so augmentation is reproducible and
    independent of the worker count and of which worker gets the sample.
    """

    def __init__(self, samples, transform, mode: str):
        self.samples = samples
        self.transform = transform
        self.mode = mode

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, item):
        from PIL import Image

        i, seed = item if isinstance(item, tuple) else (item, None)
        path, target = self.samples[i]
        try:
            with open(path, "rb") as f:
                img = Image.open(f)
                img = img.convert(self.mode)
        except Exception as e:
            raise CorruptImageError(f"cannot decode image file {path}: {type(e).__name__}: {e}", [path]) from e
        return self.transform(img, random.Random(seed)), target


def _rrc_params(rng: random.Random, width: int, height: int, scale, ratio) -> tuple[int, int, int, int]:
    """``torchvision.transforms.RandomResizedCrop.get_params`` (same algorithm), drawing from ``rng``."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    return fallback_crop_box(height, width, ratio)


class _TorchTransform:
    """Train: random resized crop + flip (bilinear, antialiased); val: resize + centre crop; then normalise.

    Equivalent to ``Compose([RandomResizedCrop(size, scale, ratio, antialias=True),
    RandomHorizontalFlip()])`` / ``Compose([Resize(r), CenterCrop(size)])`` +
    ``ToTensor()`` + ``Normalize``, with the random draws taken from a
    per-sample ``random.Random`` (seeding torch's global RNG per sample costs
    about 0.3 ms, more than the whole transform of a small image).
    """

    def __init__(self, cfg: LoaderConfig):
        self.train = bool(cfg.train)
        self.size = int(cfg.image_size)
        self.resize = cfg.effective_resize_size if cfg.val_resize else None
        self.scale, self.ratio = tuple(cfg.scale), tuple(cfg.ratio)
        self.mean, self.std = list(cfg.mean), list(cfg.std)

    def __call__(self, img, rng: random.Random):
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as F

        bilinear = InterpolationMode.BILINEAR
        if self.train:
            i, j, h, w = _rrc_params(rng, img.width, img.height, self.scale, self.ratio)
            img = F.resized_crop(img, i, j, h, w, [self.size, self.size], bilinear, antialias=True)
            if rng.random() < 0.5:
                img = F.hflip(img)
        else:
            if self.resize is not None:
                img = F.resize(img, self.resize, bilinear, antialias=True)
            img = F.center_crop(img, [self.size, self.size])
        return F.normalize(F.to_tensor(img), self.mean, self.std)


class _EpochSampler(torch.utils.data.Sampler):
    """Yields ``(index, per-sample seed)`` for the current epoch; mutated between epochs."""

    def __init__(self):
        self.items: list[tuple[int, int]] = []

    def __iter__(self):
        return iter(list(self.items))

    def __len__(self) -> int:
        return len(self.items)


class TorchImageLoader(ImageLoader):
    """torchvision transforms + DataLoader back-end (persistent workers across epochs)."""

    backend = "torch"

    def __init__(self, cfg: LoaderConfig):
        super().__init__(cfg)
        self.transform = _TorchTransform(cfg)
        self.dataset = _FolderDataset(self.samples, self.transform, "RGB" if cfg.channels == 3 else "L")
        self._sampler = _EpochSampler()
        self._dl = None

    def _dataloader(self):
        if self._dl is None:
            cfg = self.cfg
            workers = int(cfg.num_workers)
            g = torch.Generator()
            g.manual_seed(int(cfg.seed))
            self._dl = torch.utils.data.DataLoader(
                self.dataset,
                batch_size=self.batch_size,
                sampler=self._sampler,
                num_workers=workers,
                drop_last=self.drop_last,
                pin_memory=self.device.type == "cuda",
                generator=g,
                persistent_workers=workers > 0,
                prefetch_factor=2 if workers > 0 else None,
            )
        return self._dl

    def _iter_epoch(self, epoch: int):
        base = mix_seed(self.cfg.seed, epoch, 0)
        self._sampler.items = [(i, (base * 2_654_435_761 + i) % (2**63 - 1)) for i in self.shard_indices(epoch)]
        on_cuda = self.device.type == "cuda"
        it = iter(self._dataloader())
        try:
            for images, labels in it:
                labels = labels.to(torch.int64)
                if on_cuda:
                    images = images.to(self.device, non_blocking=True)
                    labels = labels.to(self.device, non_blocking=True)
                yield images, labels
        except CorruptImageError as e:
            # DataLoader workers re-raise with the worker traceback in the
            # message; keep only our one-line message.
            msg = str(e).strip().splitlines()
            line = next((m for m in reversed(msg) if "cannot decode image file" in m), msg[-1] if msg else str(e))
            line = line.split("CorruptImageError: ", 1)[-1]
            paths = [p for p, _ in self.samples if p in line]
            # The epoch is over: stop the workers now. A DataLoader abandoned
            # after a worker exception otherwise takes ~5 s per worker to join
            # when it is garbage-collected.
            self._dl = None
            for w in getattr(it, "_workers", ()):
                if w.is_alive():
                    w.terminate()
            shutdown = getattr(it, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
            raise CorruptImageError(line, paths) from None
        finally:
            it = None  # noqa: F841

    def close(self) -> None:
        """Stop the persistent DataLoader workers (they also stop when the loader is garbage-collected)."""
        self._dl = None
