"""Image data pipelines for squeeze, training and evaluation.

One entry point, :func:`build_loader`, returns an :class:`ImageLoader` over an
ImageFolder tree (class sub-folders, ImageNet train/val layout). Three
back-ends share one set of semantics:

* ``dali`` on a GPU: NVIDIA DALI, JPEG decode with ``device="mixed"``
  (nvJPEG / hardware decoder), crop, resize, flip and normalisation on the GPU.
* ``dali`` on the CPU: the same DALI graph with CPU operators
  (``device_id=None``), batches land in CPU tensors.
* ``torch``: ``torchvision.datasets.ImageFolder``-equivalent data set with
  PIL decode and ``torchvision.transforms.functional`` ops, driven by a
  ``torch.utils.data.DataLoader``.

``loader="auto"`` picks DALI when ``nvidia.dali`` (and its PyTorch plugin) is
importable, else torch.

Shared semantics (all back-ends)
--------------------------------
* File set and label mapping: exactly ``torchvision.datasets.ImageFolder``'s
  (``find_classes`` / ``make_dataset``, sorted class folder names, IMG_EXTENSIONS).
  DALI is fed the same explicit ``files``/``labels`` lists, never its own
  directory walk. ``loader.classes`` / ``loader.class_to_idx`` / ``loader.samples``.
* Sample order: one global order per epoch, computed in Python and shared by
  all back-ends and ranks. Train: ``torch.randperm(N, generator=seed + epoch)``
  (DistributedSampler's convention); validation: file order. Consequently the
  DALI and torch loaders visit the very same files in the same batches.
* Sharding (``shard_id`` / ``num_shards``, i.e. torchrun rank / world size):
  contiguous blocks of the epoch order, rank ``r`` gets
  ``order[n*r//S : n*(r+1)//S]`` (DALI's ``fn.readers.file`` sharding rule; the
  DALI reader does the split, the torch sampler replicates it).
  - ``drop_last=True`` (the default for train): the epoch order is first
    truncated to a multiple of ``num_shards`` (like DistributedSampler with
    ``drop_last=True``; with shuffling the dropped samples change every epoch),
    so every rank has the same number of samples and of batches, and the last
    partial batch is dropped (DALI ``LastBatchPolicy.DROP``).
  - ``drop_last=False`` (the default for validation): no truncation and no
    padding duplicates: across the ranks every sample is seen exactly once per
    epoch; shard sizes may differ by one sample (so batch counts may differ by
    one between ranks: reduce per-rank *sums*, not means); the last batch is
    partial (DALI ``pad_last_batch=True`` + ``LastBatchPolicy.PARTIAL``).
* ``len(loader)``: batches per epoch on this shard; ``loader.num_samples``:
  samples assigned to this shard per epoch (with ``drop_last`` only
  ``len(loader) * batch_size`` of them are yielded).
* Epochs: every ``iter(loader)`` is one epoch. ``set_epoch(e)`` fixes the
  epoch number used for the next iteration (shuffle order and augmentation
  seed derive from ``(seed, epoch, shard_id)``); without it the epoch counter
  advances by one after each iteration, so the data are reshuffled anyway.
* Train transform: random resized crop with area fraction in ``scale`` and
  aspect ratio (width / height) in ``ratio`` (log-uniform in torchvision,
  10 attempts), resized to ``image_size x image_size`` (bilinear, antialiased),
  horizontal flip with probability 0.5.
  Validation transform: shorter side resized to ``resize_size`` (default
  ``round(image_size / 0.875)``, bilinear antialiased), centre crop
  ``image_size``; with ``val_resize=False`` no resize, only the centre crop
  (the identity on images of ``image_size``: raw-image evaluation).
* Output: ``(images, labels)``; images float32 NCHW, ``(x/255 - mean)/std``
  (mean/std in [0,1] pixel units), ``channels`` 3 = RGB, 1 = grey; labels
  int64 ``[N]``; both on ``cfg.device``.

Documented differences between back-ends
----------------------------------------
* Decoders: PIL/libjpeg-turbo (torch) vs DALI's nvImageCodec (libjpeg-turbo on
  the CPU, nvJPEG on the GPU; ``jpeg_fancy_upsampling=True`` is set for the GPU
  decoder so chroma upsampling matches libjpeg's). Decoded pixels may differ
  by a few grey levels, mostly for colour JPEGs.
* Resampling: PIL's antialiased bilinear (torch) vs DALI's linear resampling
  with antialiasing. Agreement is within a few grey levels; for non-square
  images DALI's ``resize_shorter`` rounds the long side while torchvision
  truncates it, and the centre-crop offset can then differ by one pixel.
* Grey output of colour JPEGs: PIL ``convert("L")`` (ITU-R 601 luma) vs
  DALI's GRAY decode; identical for grey JPEGs.
* Random crop: DALI uses ``fn.decoders.image_random_crop`` (the ROI-decoding
  fused decode + random crop that DALI recommends for ImageNet training;
  same ``random_area`` / ``random_aspect_ratio`` / ``num_attempts``
  semantics as ``fn.random_resized_crop``) followed by ``fn.resize``. When all
  10 attempts fail (only with extreme ``ratio`` ranges), torchvision falls back
  to a centre crop with the ratio clamped into range, DALI to its own fallback.
  The random streams differ, so the crops themselves are not identical across
  back-ends; only their distribution is.
* Reproducibility of augmentation: both back-ends are reproducible given
  ``(seed, epoch)``. DALI seeds its pipeline from ``(seed, epoch, shard_id)``
  (so crops depend on the thread/batch layout); the torch back-end runs each
  sample's transform with a ``random.Random`` seeded from
  ``(seed, epoch, index)`` (independent of worker count and sharding; torch's
  global RNG is not used). Its crop sampler is torchvision's
  ``RandomResizedCrop.get_params`` algorithm, re-implemented on that RNG.
* Workers: the torch DataLoader keeps its workers alive across epochs
  (``persistent_workers``); the DALI pipeline is rebuilt for every epoch
  (it is fed that epoch's file order) and shut down at the end of it, so no
  DALI threads outlive an epoch. ``loader.close()`` releases the workers.

Corrupt images
--------------
Policy: a clear error, never a silent skip. A file that cannot be decoded
raises :class:`CorruptImageError` (a ``RuntimeError``) naming the file. There
is no pre-scan (too expensive at ImageNet scale): the torch back-end catches
the PIL error at decode time; DALI's decode error does not name the file, so
on a pipeline error the loader re-decodes the files of the failing and
prefetched batches with PIL (a few batches, only on the error path) and
names the undecodable one(s). Garbage files and truncated JPEGs are both
errors in both back-ends (PIL: "image file is truncated"; DALI's
libjpeg-turbo: "Premature end of JPEG data"). A DALI error that is not a
decode failure, or a decode failure PIL cannot reproduce, is re-raised as is.
:func:`find_corrupt_images` is a stand-alone full-decode scan for users who
want to clean a tree up-front.
"""

from __future__ import annotations

import abc
import math
import os
import random
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from .distributed import resolve_device, shard_bounds
from .errors import UserError
from .kernels.crop_sampler import fallback_crop_box

__all__ = [
    "LoaderConfig",
    "ImageLoader",
    "build_loader",
    "dali_available",
    "CorruptImageError",
    "find_corrupt_images",
    "scan_image_folder",
]

DALI_INSTALL_HINT = (
    "NVIDIA DALI is not installed; install it with `pip install 'srel-fast[dali]'` "
    "(or use loader='torch' / loader='auto')."
)


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


# -----------------------------------------------------------------------------
# helpers shared by the back-ends
# -----------------------------------------------------------------------------

def dali_available() -> bool:
    """True when ``nvidia.dali`` and its PyTorch plugin import."""
    try:
        import nvidia.dali  # noqa: F401
        import nvidia.dali.plugin.pytorch  # noqa: F401
    except Exception:
        return False
    return True


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


def _mix_seed(seed: int, epoch: int, shard_id: int) -> int:
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


# -- torch back-end -------------------------------------------------------------

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
        base = _mix_seed(self.cfg.seed, epoch, 0)
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


# -- DALI back-end --------------------------------------------------------------

class DaliImageLoader(ImageLoader):
    """NVIDIA DALI back-end: mixed (GPU) decode on CUDA, CPU operators otherwise."""

    backend = "dali"
    _READER = "reader"

    def __init__(self, cfg: LoaderConfig):
        super().__init__(cfg)
        import nvidia.dali  # noqa: F401  (fail early, clearly)
        import nvidia.dali.plugin.pytorch  # noqa: F401

        self.dali_device = "gpu" if self.device.type == "cuda" else "cpu"
        self.prefetch_queue_depth = 2

    def _build_pipeline(self, files: list[str], labels: list[int], seed: int):
        from nvidia.dali import fn, pipeline_def, types

        cfg = self.cfg
        gpu = self.dali_device == "gpu"
        out_type = types.RGB if cfg.channels == 3 else types.GRAY
        size = int(cfg.image_size)
        mean = [float(m) * 255.0 for m in cfg.mean]
        std = [float(s) * 255.0 for s in cfg.std]
        dec_device = "mixed" if gpu else "cpu"
        dec_kw = dict(device=dec_device, output_type=out_type)
        if gpu:
            dec_kw["jpeg_fancy_upsampling"] = True

        @pipeline_def
        def pipe():
            jpegs, lab = fn.readers.file(
                files=files, labels=labels, name=self._READER,
                shard_id=cfg.shard_id, num_shards=cfg.num_shards,
                random_shuffle=False, pad_last_batch=True, stick_to_shard=True)
            if cfg.train:
                img = fn.decoders.image_random_crop(
                    jpegs, random_area=[float(cfg.scale[0]), float(cfg.scale[1])],
                    random_aspect_ratio=[float(cfg.ratio[0]), float(cfg.ratio[1])],
                    num_attempts=10, **dec_kw)
                img = fn.resize(img, size=[size, size], interp_type=types.INTERP_LINEAR, antialias=True)
                mirror = fn.random.coin_flip(probability=0.5)
                img = fn.crop_mirror_normalize(
                    img, dtype=types.FLOAT, output_layout="CHW", mean=mean, std=std, mirror=mirror)
            else:
                img = fn.decoders.image(jpegs, **dec_kw)
                if cfg.val_resize:
                    img = fn.resize(img, resize_shorter=float(cfg.effective_resize_size),
                                    interp_type=types.INTERP_LINEAR, antialias=True)
                img = fn.crop_mirror_normalize(
                    img, dtype=types.FLOAT, output_layout="CHW", crop=(size, size),
                    crop_pos_x=0.5, crop_pos_y=0.5, mean=mean, std=std)
            if gpu:
                lab = lab.gpu()
            return img, lab

        p = pipe(batch_size=self.batch_size, num_threads=max(1, int(cfg.num_workers)),
                 device_id=(self.device.index if gpu else None), seed=seed,
                 prefetch_queue_depth=self.prefetch_queue_depth)
        p.build()
        return p

    def _iter_epoch(self, epoch: int):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        cfg = self.cfg
        order = self.epoch_order(epoch)
        files = [self.samples[i][0] for i in order]
        labels = [int(self.samples[i][1]) for i in order]
        lo, hi = shard_bounds(len(order), cfg.shard_id, cfg.num_shards)
        shard_files = files[lo:hi]
        seen = 0
        pipe = it = None
        try:
            pipe = self._build_pipeline(files, labels, _mix_seed(cfg.seed, epoch, cfg.shard_id))
            it = DALIGenericIterator(
                [pipe], ["images", "labels"], reader_name=self._READER,
                last_batch_policy=LastBatchPolicy.DROP if self.drop_last else LastBatchPolicy.PARTIAL,
                auto_reset=False)
            for batch in it:
                images = batch[0]["images"]
                lab = batch[0]["labels"].reshape(-1).to(torch.int64)
                seen += 1
                yield images, lab
        except RuntimeError as e:
            if isinstance(e, CorruptImageError):
                raise
            self._raise_corrupt(e, shard_files, seen)
            raise
        finally:
            # Shut the pipeline down deterministically (its worker threads and
            # buffers), instead of leaving it to the garbage collector: the
            # iterator holds reference cycles, and a live (or failed) pipeline
            # must not linger while DataLoader workers are forked later.
            it = None  # noqa: F841
            if pipe is not None:
                try:
                    pipe._shutdown()
                except Exception:  # pragma: no cover - best effort
                    pass
                pipe = None

    def _raise_corrupt(self, err: Exception, shard_files: list[str], batches_done: int) -> None:
        """Map a DALI pipeline error to the undecodable file(s), if PIL finds any."""
        if "decod" not in str(err).lower() and "codec" not in str(err).lower():
            return
        b = self.batch_size
        start = max(0, batches_done - 1) * b
        stop = (batches_done + self.prefetch_queue_depth + 2) * b
        bad = find_corrupt_images(shard_files[start:stop]) or find_corrupt_images(shard_files)
        if bad:
            shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
            raise CorruptImageError(f"cannot decode image file {shown} (DALI: {_dali_reason(err)})", bad) from err


def _dali_reason(err: Exception) -> str:
    """The informative line of a DALI pipeline error (the one after 'encountered:')."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    for i, ln in enumerate(lines[:-1]):
        if ln.startswith("encountered"):
            return lines[i + 1]
    return lines[-1] if lines else type(err).__name__


# -----------------------------------------------------------------------------

def build_loader(cfg: LoaderConfig) -> ImageLoader:
    """Build the image loader described by ``cfg`` (see the module docstring for semantics)."""
    cfg.validate()
    choice = cfg.loader
    if choice == "auto":
        choice = "dali" if dali_available() else "torch"
    elif choice == "dali" and not dali_available():
        raise RuntimeError(DALI_INSTALL_HINT)
    if choice == "dali":
        return DaliImageLoader(cfg)
    return TorchImageLoader(cfg)
