"""Look at the user's own data and choose what the recipes choose for data of that kind (issue 19).

Everything here is inferred from an ImageFolder tree when the matching flag is
left out, printed with its reason, and recorded in the checkpoint:

- image size: the size of the images when the sampled ones are all one size,
  otherwise the median shorter side; capped at ``SIZE_CAP`` (224, the ImageNet
  recipes' size) either way. ``--image-size`` overrides.
- channels: 1 (grey) when every sampled image is a grey mode (L, LA, 1, I, F),
  else 3 (RGB). Kept through recover, relabel and train by the checkpoint's
  model spec.
- normalisation: the per-channel mean and std of the training images, from a
  fast pass over up to ``STATS_FILES`` evenly spaced images, cached beside the
  data (``.srel_fast_stats.json``; skipped when the tree is read-only) and
  stored in the checkpoint; ImageNet's statistics for ImageNet-sized data
  (colour images whose median shorter side is >= 224 px, or ``--normalization
  imagenet``).
- evaluation transform: images of one size at or below 64 px are evaluated as
  they are (the official Tiny-ImageNet evaluation); larger or mixed-size
  images with resize + centre crop.
- architecture: a ConvNet-3 below 64 px, the small-input ResNet-18 from 64 px,
  ResNet-18 from 128 px.
- peak memory of a training step (model, size, batch), estimated before the
  first step by running the step on the meta device under an allocation
  tracker; a run that cannot fit is refused with one sentence naming the flag.

Headers (size, mode) are read from up to ``SAMPLE_FILES`` evenly spaced files,
so a million-image tree is looked at in seconds.
"""
from __future__ import annotations

import hashlib
import json
import os
import statistics
import sys
import weakref
from dataclasses import dataclass

import torch

from .data import Normalization
from .errors import UserError

SIZE_CAP = 224
SAMPLE_FILES = 2000        # headers read for size and channels
STATS_FILES = 1000         # images decoded for the mean/std pass
STATS_CACHE = ".srel_fast_stats.json"
GREY_MODES = ("1", "L", "LA", "I", "I;16", "F")
RAW_EVAL_MAX = 64          # images of one size up to this are evaluated as they are
IMAGENET_SIZED = 224       # colour images with a median shorter side of this or more use ImageNet's mean/std


def say(message: str) -> None:
    """Print a choice on stderr (rank 0 only under torchrun)."""
    from . import distributed as _dist

    if _dist.is_main():
        print(message, file=sys.stderr)


def split_dirs(data: str) -> tuple[str, str]:
    """(train, val) folders of an ImageFolder argument: DATA/train and DATA/val when present, else DATA."""
    train = os.path.join(data, "train") if os.path.isdir(os.path.join(data, "train")) else data
    val = os.path.join(data, "val") if os.path.isdir(os.path.join(data, "val")) else train
    return train, val


def _spread(items: list, k: int) -> list:
    """Up to ``k`` evenly spaced items (all of them when there are fewer)."""
    if len(items) <= k:
        return list(items)
    return [items[i * len(items) // k] for i in range(k)]


@dataclass
class FolderInfo:
    root: str
    num_images: int
    num_classes: int
    sampled: int
    sizes: list[tuple[int, int]]     # (width, height) of the sampled images
    modes: list[str]
    paths: list[str]                 # the sampled files
    all_paths: list[str]             # every image file, in ImageFolder order

    @property
    def uniform(self) -> bool:
        return len(set(self.sizes)) == 1

    @property
    def median_short_side(self) -> int:
        return int(statistics.median(min(w, h) for w, h in self.sizes))


def inspect_folder(root: str, sample: int = SAMPLE_FILES) -> FolderInfo:
    """File count, class count, and the size and mode of up to ``sample`` evenly spaced images."""
    from PIL import Image

    from .loaders import scan_image_folder

    try:
        classes, _, samples = scan_image_folder(root)
    except FileNotFoundError as exc:
        raise UserError(f"{exc}; expected an ImageFolder tree with one folder per class.") from None
    all_paths = [p for p, _ in samples]
    paths = _spread(all_paths, sample)
    sizes, modes = [], []
    for p in paths:
        try:
            with Image.open(p) as im:       # reads the header only
                sizes.append(tuple(im.size))
                modes.append(im.mode)
        except Exception as exc:  # noqa: BLE001
            raise UserError(f"cannot read image file {p} ({type(exc).__name__}).") from None
    return FolderInfo(root, len(samples), len(classes), len(paths), sizes, modes, paths, all_paths)


def infer_image_size(info: FolderInfo) -> tuple[int, str]:
    if info.uniform:
        w, h = info.sizes[0]
        size = min(w, h)
        why = f"all {info.sampled} sampled images are {w}x{h}"
    else:
        size = info.median_short_side
        why = f"median shorter side of {info.sampled} sampled images of {len(set(info.sizes))} sizes"
    if size > SIZE_CAP:
        return SIZE_CAP, f"{why}, capped at {SIZE_CAP}"
    return size, why


def infer_channels(info: FolderInfo) -> tuple[int, str]:
    if all(m in GREY_MODES for m in info.modes):
        return 1, f"grey: every sampled image is of mode {'/'.join(sorted(set(info.modes)))}"
    colour = sorted(set(m for m in info.modes if m not in GREY_MODES))
    return 3, f"colour: sampled images of mode {'/'.join(colour)}"


def imagenet_sized(info: FolderInfo, channels: int) -> bool:
    return channels == 3 and info.median_short_side >= IMAGENET_SIZED


def infer_val_resize(info: FolderInfo, size: int) -> tuple[str, str]:
    if info.uniform and min(info.sizes[0]) <= RAW_EVAL_MAX and min(info.sizes[0]) == size == max(info.sizes[0]):
        return "none", f"images of one size <= {RAW_EVAL_MAX} px are evaluated as they are"
    what = "mixed sizes" if not info.uniform else f"images larger than {RAW_EVAL_MAX} px or not square"
    return "resize-crop", f"resize to {round(size / 0.875)} + centre crop {size} ({what})"


def default_arch(size: int) -> tuple[str, str]:
    if size < 64:
        return "convnet3", f"{size} px < 64: the ConvNet-3 of the small-image recipes"
    if size < 128:
        return "resnet18-small", f"{size} px in 64..127: the small-input ResNet-18 of the Tiny-ImageNet recipe"
    return "resnet18", f"{size} px >= 128: the ResNet-18 of the ImageNet recipe"


# -- normalisation --------------------------------------------------------------

def _stats_key(info: FolderInfo, channels: int, files: list[str]) -> str:
    h = hashlib.sha256(f"{info.num_images}/{channels}/{len(files)}".encode())
    for p in files:
        st = os.stat(p)
        h.update(f"{os.path.relpath(p, info.root)}/{st.st_size}/{st.st_mtime_ns}".encode())
    return h.hexdigest()


def folder_mean_std(info: FolderInfo, channels: int, max_files: int = STATS_FILES,
                    cache: bool = True) -> tuple[Normalization, str]:
    """Per-channel mean and std (in [0, 1] pixel units) of up to ``max_files`` evenly spaced
    images of the tree, each converted to ``channels``; cached in ``root/.srel_fast_stats.json``."""
    import numpy as np
    from PIL import Image

    files = _spread(info.all_paths, max_files)
    key = _stats_key(info, channels, files)
    path = os.path.join(info.root, STATS_CACHE)
    if cache and os.path.exists(path):
        try:
            with open(path) as f:
                saved = json.load(f)
            if saved.get("key") == key:
                return Normalization(tuple(saved["mean"]), tuple(saved["std"])), f"cached in {path}"
        except (OSError, ValueError, KeyError):
            pass
    s = np.zeros(channels, np.float64)
    s2 = np.zeros(channels, np.float64)
    n = 0
    for p in files:
        with Image.open(p) as im:
            a = np.asarray(im.convert("L" if channels == 1 else "RGB"), dtype=np.float64) / 255.0
        a = a.reshape(-1, channels)
        s += a.sum(0)
        s2 += (a * a).sum(0)
        n += a.shape[0]
    mean = s / n
    std = np.sqrt(np.maximum(s2 / n - mean * mean, 0.0) * n / max(1, n - 1))
    std = np.maximum(std, 1e-3)   # a constant channel would divide by zero
    norm = Normalization(tuple(round(float(v), 4) for v in mean), tuple(round(float(v), 4) for v in std))
    where = f"computed from {len(files)} of {info.num_images} images"
    if cache:
        try:
            from .files import write_json

            write_json(path, {"key": key, "mean": list(norm.mean), "std": list(norm.std), "files": len(files),
                              "channels": channels})
            where += f", cached in {path}"
        except OSError:
            where += " (not cached: the data folder is read-only)"
    return norm, where


# -- the choices of a stage -----------------------------------------------------

@dataclass
class FolderChoices:
    """What squeeze uses for an ImageFolder tree, and why (recorded in the checkpoint)."""

    image_size: int
    channels: int
    norm: Normalization
    val_resize: str
    arch: str
    batch_size: int
    reasons: dict

    def record(self) -> dict:
        return {"image_size": self.image_size, "channels": self.channels, "mean": list(self.norm.mean),
                "std": list(self.norm.std), "val_resize": self.val_resize, "arch": self.arch,
                "batch_size": self.batch_size, "reasons": dict(self.reasons)}


def choose_for_folder(train_dir: str, val_dir: str, image_size: int | None, normalization: str,
                      val_resize: str | None, arch: str | None, batch_size: int, world: int = 1) -> FolderChoices:
    """Fill what was not given (None; normalisation ``auto``/``dataset``) from the images, print each
    choice with its reason. ``normalization`` is auto | dataset | a name in models.MEAN_STD."""
    from .models import MEAN_STD

    info = inspect_folder(train_dir)
    reasons = {}
    if image_size is None:
        image_size, reasons["image_size"] = infer_image_size(info)
    else:
        reasons["image_size"] = "--image-size"
    channels, reasons["channels"] = infer_channels(info)
    if normalization == "auto" and imagenet_sized(info, channels):
        normalization = "imagenet"
        reasons["normalization"] = f"ImageNet's: colour images with a median shorter side >= {IMAGENET_SIZED} px"
    if normalization in ("auto", "dataset"):
        norm, reasons["normalization"] = folder_mean_std(info, channels)
    else:
        mean, std = MEAN_STD[normalization]
        if len(mean) != channels:
            raise UserError(f"the {normalization} normalisation is for {len(mean)}-channel images but {train_dir} "
                            f"holds {channels}-channel images; leave --normalization out or use dataset.")
        norm = Normalization(mean, std)
        reasons.setdefault("normalization", f"--normalization {normalization}")
    if val_resize is None:
        val_info = info if os.path.abspath(val_dir) == os.path.abspath(train_dir) else inspect_folder(val_dir)
        val_resize, reasons["val_resize"] = infer_val_resize(val_info, image_size)
    else:
        reasons["val_resize"] = "--val-resize"
    if arch is None:
        arch, reasons["arch"] = default_arch(image_size)
    else:
        reasons["arch"] = "--arch"
    batch_size = fit_batch_size(batch_size, info.num_images, world, "squeeze")
    say(f"data {train_dir}: {info.num_images} images, {info.num_classes} classes; "
        f"image size {image_size} ({reasons['image_size']}); channels {channels} ({reasons['channels']}); "
        f"mean {norm.mean} std {norm.std} ({reasons['normalization']}); evaluation {val_resize} "
        f"({reasons['val_resize']}); arch {arch} ({reasons['arch']}).")
    return FolderChoices(image_size, channels, norm, val_resize, arch, batch_size, reasons)


def fit_batch_size(batch_size: int, num_images: int, world: int = 1, stage: str = "squeeze") -> int:
    """A batch larger than the data set becomes the data set's size (a multiple of ``world``), with a warning."""
    if batch_size <= num_images:
        return batch_size
    fitted = max(world, num_images - num_images % world)
    say(f"warning: {stage}: --batch-size {batch_size} is larger than the {num_images} training images; "
        f"using a batch of {fitted}.")
    return fitted


def val_resize_for(val_dir: str, image_size: int) -> str:
    """The evaluation transform of ``train --val DIR`` when --val-resize is not given."""
    choice, why = infer_val_resize(inspect_folder(val_dir), image_size)
    say(f"validation {val_dir}: evaluation {choice} ({why}).")
    return choice


# -- peak memory -------------------------------------------------------------------

class _AllocationTracker(torch.utils._python_dispatch.TorchDispatchMode):
    """Live and peak bytes of the storages created under it (meta tensors: nothing is allocated)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._sizes: dict[int, int] = {}

    def _track(self, t) -> None:
        if not isinstance(t, torch.Tensor) or t._base is not None:
            return
        key = t.untyped_storage()._cdata
        if key in self._sizes:
            return
        n = t.untyped_storage().nbytes()
        self._sizes[key] = n
        self.live += n
        self.peak = max(self.peak, self.live)
        weakref.finalize(t, self._free, key)

    def _free(self, key: int) -> None:
        self.live -= self._sizes.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.utils._pytree import tree_flatten

        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            self._track(t)
        return out


def training_step_bytes(spec, batch_size: int, optimizer: str = "sgd") -> int:
    """Peak bytes of two training steps (weights, gradients, optimiser state, activations kept for
    backward and the backward's own buffers) of ``spec`` at ``batch_size``, traced on the meta device."""
    import torch.nn.functional as F

    from .models import build_model
    from .optimizers import make_optimizer

    tracker = _AllocationTracker()
    with tracker:
        with torch.device("meta"):
            model = build_model(spec)
        model.train()
        opt = make_optimizer(optimizer, model.parameters(), 0.01, 1e-4, 0.9)
        for _ in range(2):
            x = torch.empty(batch_size, spec.in_channels, spec.image_size, spec.image_size, device="meta")
            y = torch.zeros(batch_size, dtype=torch.int64, device="meta")
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            del x, y, loss
    return tracker.peak


# Calibration against the peak RSS of squeeze on the CPU (tests/test_own_data.py measures it):
# the step's tracked bytes x 1.13 (allocator slack) plus 150 MB that the first convolution and
# backward allocate once (oneDNN primitives, autograd threads), over the process's RSS before.
CPU_SLACK, CPU_FIRST_STEP = 1.13, 150 * 2 ** 20
CUDA_SLACK, CUDA_WORKSPACE = 1.2, 512 * 2 ** 20


def _rss_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def available_bytes(device: torch.device) -> int:
    """Free device memory on a GPU; on the CPU MemAvailable, or less under a cgroup memory limit."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        with open("/sys/fs/cgroup/memory.current") as f:
            used = int(f.read().strip())
        if limit != "max":
            left = int(limit) - used
            avail = left if avail is None else min(avail, left)
    except (OSError, ValueError):
        pass
    return avail if avail is not None else 1 << 62


def estimate_peak_memory(spec, batch_size: int, optimizer: str, device: torch.device,
                         loader_batches: int = 0) -> dict:
    """Estimated peak memory of a training run: on the CPU the process's whole resident set (now, plus the
    step, plus ``loader_batches`` prefetched input batches); on a GPU the device memory of the step."""
    base = _rss_bytes() if device.type != "cuda" else 0
    step = training_step_bytes(spec, batch_size, optimizer)
    batch = batch_size * spec.in_channels * spec.image_size ** 2 * 4
    if device.type == "cuda":
        need = int(CUDA_SLACK * step + CUDA_WORKSPACE)
    else:
        need = int(base + CPU_FIRST_STEP + CPU_SLACK * step + loader_batches * batch)
    return {"estimate_bytes": need, "step_bytes": step, "base_bytes": base, "traced_rss_bytes": _rss_bytes(),
            "device": device.type,
            "arch": spec.arch, "image_size": spec.image_size, "batch_size": batch_size}


def check_memory(spec, batch_size: int, optimizer: str, device: torch.device, stage: str,
                 loader_batches: int = 0) -> dict:
    """The estimate (see estimate_peak_memory), printed; refused in one sentence when it cannot fit."""
    try:
        est = estimate_peak_memory(spec, batch_size, optimizer, device, loader_batches)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001  (a model the meta device cannot trace: no estimate, no refusal)
        say(f"{stage}: no memory estimate for {spec.arch} ({type(exc).__name__}).")
        return {"estimate_bytes": None}
    avail = available_bytes(device)
    extra = est["estimate_bytes"] - est["base_bytes"]
    est["available_bytes"] = avail
    gib = 2 ** 30
    where = "the GPU has" if device.type == "cuda" else "this machine has"
    if extra > avail:
        raise UserError(f"{stage} would need about {est['estimate_bytes'] / gib:.1f} GiB ({spec.arch} at "
                        f"{spec.image_size} px, batch {batch_size}) but {where} {avail / gib:.1f} GiB available; "
                        f"lower --batch-size (or --image-size).")
    say(f"{stage}: estimated peak memory {est['estimate_bytes'] / gib:.2f} GiB ({spec.arch} at {spec.image_size} px, "
        f"batch {batch_size}; {where} {avail / gib:.1f} GiB available).")
    return est


def peak_rss_bytes() -> int:
    """This process's peak resident set so far (Linux ru_maxrss is in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
