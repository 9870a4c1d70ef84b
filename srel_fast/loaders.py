"""Image data pipelines for squeeze, training and evaluation.

One entry point, :func:`build_loader`, returns an :class:`ImageLoader` over an
ImageFolder tree (class sub-folders, ImageNet train/val layout). Three
back-ends share one set of semantics (the shared part in image_folder.py, the
back-ends in loader_torch.py and loader_dali.py):

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

from .image_folder import CorruptImageError, ImageLoader, LoaderConfig, find_corrupt_images, scan_image_folder
from .loader_dali import DaliImageLoader
from .loader_torch import TorchImageLoader

__all__ = [
    "LoaderConfig",
    "ImageLoader",
    "build_loader",
    "dali_available",
    "CorruptImageError",
    "find_corrupt_images",
    "scan_image_folder",
    "TorchImageLoader",
    "DaliImageLoader",
]

DALI_INSTALL_HINT = (
    "NVIDIA DALI is not installed; install it with `pip install 'srel-fast[dali]'` "
    "(or use loader='torch' / loader='auto')."
)


def dali_available() -> bool:
    """True when ``nvidia.dali`` and its PyTorch plugin import."""
    try:
        import nvidia.dali  # noqa: F401
        import nvidia.dali.plugin.pytorch  # noqa: F401
    except Exception:
        return False
    return True


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
