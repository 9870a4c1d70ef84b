"""Stage 2, Recover: synthesise images whose BN statistics match the teacher's.

    loss = CE(f(A(x)), y) + r_bn * sum_l w_l (||var_l - rv_l||_2 + ||mu_l - rm_l||_2)

x lives in normalised pixel space, starts from N(0, 1), and is optimised
with Adam(betas 0.5, 0.9) under a cosine learning rate; A is a random
resized crop + flip + roll; after every step x is clamped to the normalised
image of [0, 1]. A batch holds one image per class for up to ``batch_size``
classes: consecutive classes (0..99, 100..199, ...: the official code's
layout) or classes spread over the batches round-robin (``class_layout``).
A batch (ipc index, batch index) is a pure function of (config, seed):
resumed or sharded runs give the same bytes as one uninterrupted run.

The config's fields fall into three groups, listed apart in ``recover --help``:
the algorithm (recipe fields: they define the images), speed switches (how the
same images are computed; the images stay equal to the reference path's within
the tested tolerance) and the run itself (paths, device, which ipc indices).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from srel_fast.kernels import BACKENDS, crop_boxes_from_uniforms

from . import distributed as _dist
from .augment import JITTER_RANGES, CropParams, apply_crops, check_crop_scale, draw_crop_params
from .bn_matching import BN_MATCHINGS, bn_matching
from .data import Normalization, check_data_path, is_builtin, load_builtin
from .errors import NonFiniteLoss, UserError
from .files import (REPLACE, RESUME, append_jsonl, check_output, config_differences, environment, read_jsonl,
                    write_json)
from .images import IMAGE_FORMATS, PIXEL_ROUNDINGS, image_path, pack_tiles, save_image
from .models import MEAN_STD, frozen_weights_in_amp_dtype, load_model, require_batchnorm
from .recipes import apply_recipe, get_recipe, resolve_recipe
from .seeds import derived_seed

CLASS_LAYOUTS = ("consecutive", "round-robin")
INITS = ("noise", "real")
INIT_SELECTS = ("random", "confident", "band", "herding")
# --init-select confident / band / herding score at most this many real images of a class (a seeded
# random pool, so the seed still varies the start), one teacher forward pass over each.
INIT_CANDIDATES = 1000
CROP_CURRICULA = ("none", "cda")


@dataclass
class RecoverConfig:
    out: str
    weights: str | None = None
    arch: str | None = None
    recipe: str | None = None          # named defaults for the fields left at None (default: srel)
    ipc: int = 50
    ipc_start: int = 0
    ipc_end: int | None = None         # default: ipc
    # The algorithm: recipe fields (None: the recipe's value).
    iterations: int | None = None
    batch_size: int | None = None      # classes per batch (one image each)
    lr: float | None = None            # srel: 0.25 at >=128 px, else 0.1
    r_bn: float | None = None          # srel: 0.01 at >=128 px, else 1.0
    first_bn_multiplier: float | None = None
    jitter: int | None = None          # roll range in pixels; srel: 32 at >=128 px, else size // 16
    jitter_range: str | None = None    # nonnegative: 0..jitter (ImageNet code) | symmetric: -jitter..jitter (Tiny code)
    min_scale: float | None = None
    max_scale: float | None = None
    crop_mode: str | None = None       # batch: one crop per batch (paper); image: one crop per image
    class_layout: str | None = None    # consecutive: classes 0..B-1, B..2B-1, ... (paper) | round-robin
    image_format: str | None = None    # png (lossless) | jpg
    jpeg_quality: int | None = None    # jpg only; 75 is PIL's default, the official code's
    pixel_rounding: str | None = None  # [0,1] -> uint8: round | truncate (the official astype(uint8))
    normalization: str | None = None   # mean/std for weights that carry none (plain state dicts)
    image_size: int | None = None      # input size for weights that carry none (plain state dicts, --arch alone)
    init: str | None = None            # noise: N(0, 1) (paper) | real: a real training image of the class
    init_select: str | None = None     # init real: which images of the class: random | confident (the
                                       # teacher's most confident first) | herding (features' mean kept
                                       # nearest the class's, iCaRL)
    r_class: float | None = None       # weight of the class-aware BN term (0: off; needs the class statistics)
    class_images: int | None = None    # class-aware: images of a class recovered and matched together
    tiles_per_side: int | None = None  # k: each stored image holds k x k images of its class at 1/k of
                                       # the size (IDC's multi-formation), each optimised as a full-size
                                       # image (the crop upsamples it); 1: off
    tiled_images: int | None = None    # with k > 1: how many of a class's stored images hold tiles (the
                                       # first ones); the others are whole images (mixed formation)
    tile_iterations: int | None = None  # iterations of the stored images of tiles (``iterations``: of
                                        # the whole ones)
    crop_curriculum: str | None = None  # none | cda: the crops' lower scale bound eases from max_scale to min_scale
    data: str | None = None            # real training data for --init real and the class statistics
                                       # (default: the data set the --weights checkpoint was trained on)
    # The fast path: speed switches; each can be turned off on its own to measure what it brings.
    # None: the device's fast path (FAST_PATH, resolve_speed).
    bn_matching: str | None = None     # the BN term: hooks (the original code's forward hooks) | fused (kernels)
    backend: str = "auto"              # kernel backend (srel_fast.kernels): auto | torch | triton | cuda | cpu
    amp: str | None = None             # none | bf16 | fp16 autocast of the model (statistics stay fp32)
    channels_last: bool | None = None
    compile: bool | None = None        # torch.compile of the loss (model, BN term, augmentation)
    cuda_graphs: bool | None = None    # with compile: mode="reduce-overhead" (CUDA graphs)
    group_batches: int = 1             # recovery batches stacked into one launch (BN statistics per batch)
    check_every: int = 10              # iterations between loss checks (each check syncs the device)
    # The run.
    seed: int = 0
    device: str = "auto"
    on_nonfinite: str = "stop"         # stop the run, or skip the batch and go on
    overwrite: bool = False
    num_classes: int | None = None     # for --arch without a checkpoint
    progress: bool = True

    RECIPE_FIELDS: ClassVar[tuple[str, ...]] = (
        "iterations", "batch_size", "lr", "r_bn", "first_bn_multiplier", "jitter", "jitter_range", "min_scale",
        "max_scale", "crop_mode", "class_layout", "image_format", "jpeg_quality", "pixel_rounding",
        "normalization", "image_size", "init", "init_select", "r_class", "class_images", "crop_curriculum",
        "tiles_per_side", "tiled_images", "tile_iterations")
    SPEED_SWITCHES: ClassVar[tuple[str, ...]] = (
        "bn_matching", "backend", "amp", "channels_last", "compile", "cuda_graphs", "group_batches", "check_every")
    # Fields that may differ between runs writing into the same output tree (the recipe's
    # name is provenance: the resolved values are compared).
    RUN_ONLY_FIELDS: ClassVar[tuple[str, ...]] = (
        "ipc_start", "ipc_end", "overwrite", "progress", "device", "out", "on_nonfinite", "recipe")

    def resolved(self, image_size: int, real_data: bool = False) -> "RecoverConfig":
        """Every value filled: the recipe's, then the resolution rules for what it leaves open
        (by image size, and whether the real training data is known: ``real_data``)."""
        from .recipes import (SREL_DEFAULT_RECOVER, SREL_SMALL_DATA_ONE_TILED_ITERATIONS,
                              SREL_SMALL_DATA_ONE_WHOLE_ITERATIONS, SREL_SMALL_DATA_RECOVER,
                              SREL_SMALL_DATA_TILED_IMAGES, SREL_SMALL_DATA_TILES_ITERATIONS,
                              SREL_LARGE_IMAGE, SREL_SMALL_DATA_TILES_MAX_IPC, SREL_SMALL_DATA_TILES_MIN_SIZE)

        cfg = apply_recipe(self, "recover")
        big = image_size >= SREL_LARGE_IMAGE
        small_data = not big and real_data
        rules = dict(SREL_DEFAULT_RECOVER, lr=0.25 if big else 0.1, r_bn=0.01 if big else 1.0)
        if small_data:
            rules = dict(SREL_SMALL_DATA_RECOVER)
            if (cfg.ipc <= SREL_SMALL_DATA_TILES_MAX_IPC and image_size >= SREL_SMALL_DATA_TILES_MIN_SIZE
                    and image_size % 2 == 0):
                rules["tiles_per_side"] = 2
        tiles = cfg.tiles_per_side if cfg.tiles_per_side is not None else rules["tiles_per_side"]
        # Of a class's stored images the first `tiled` hold tiles, the other `whole` are whole images.
        tiled = (0 if tiles == 1 else min(cfg.ipc, SREL_SMALL_DATA_TILED_IMAGES) if small_data else cfg.ipc)
        tiled = cfg.tiled_images if cfg.tiled_images is not None else tiled
        whole = cfg.ipc - tiled
        if small_data and whole == 1:   # the lengths by formation and count (recipes.py)
            rules["iterations"] = SREL_SMALL_DATA_ONE_WHOLE_ITERATIONS
        if small_data and tiled and cfg.iterations is None:
            tile_iterations = SREL_SMALL_DATA_ONE_TILED_ITERATIONS if tiled == 1 else SREL_SMALL_DATA_TILES_ITERATIONS
        else:   # a length given is every image's; without the rule's tiles, the iterations' (unused without tiles)
            tile_iterations = cfg.iterations or rules["iterations"]
        rules.update(tiled_images=tiled, tile_iterations=tile_iterations)
        if whole == 0:   # no whole image: the iterations are the tiles' (as recorded before --tiled-images)
            rules["iterations"] = cfg.tile_iterations or tile_iterations
        rules["jitter"] = 32 if big else image_size // 16
        return dataclasses.replace(
            cfg, ipc_end=cfg.ipc if cfg.ipc_end is None else cfg.ipc_end,
            **{k: v for k, v in rules.items() if getattr(cfg, k) is None})


# The speed switches a device gets when none is given (each given flag overrides its own),
# chosen by measurement, side by side (bench recover-step, ResNet-18 at 224):
# - CUDA (H200, bench/results/h200_run2 and h200_run3): fused statistics, bf16, channels_last, compile
#   and CUDA graphs: 3.0-3.4x faster than the official loop, 1.15-1.43x the compiled floor, and
#   faster than the same step with the CUDA kernels as opaque custom ops (8.18 against 8.71 ms).
# - CPU (2-core EPYC with AVX512-BF16, bench/results/cpu_run1 and cpu_run2): the C++ kernels in eager mode;
#   bf16 autocast and channels_last where the CPU has native bf16 arithmetic (fp32 and the
#   default layout otherwise, where bf16 is emulated and slower); compiling made the step
#   slower there (58.4 vs 54.6 ms per image-iteration in fp32).
FAST_PATH = {
    "cuda": {"bn_matching": "fused", "amp": "bf16", "channels_last": True, "compile": True, "cuda_graphs": True},
    "cpu": {"bn_matching": "fused", "amp": "none", "channels_last": False, "compile": False, "cuda_graphs": False},
    "cpu-bf16": {"bn_matching": "fused", "amp": "bf16", "channels_last": True, "compile": False, "cuda_graphs": False},
}


@functools.lru_cache(maxsize=None)
def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes in bf16 natively (AVX512-BF16 or AMX), read from /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def fast_path(device: torch.device) -> dict:
    if device.type == "cuda":
        return dict(FAST_PATH["cuda"])
    return dict(FAST_PATH["cpu-bf16" if cpu_has_native_bf16() else "cpu"])


def resolve_speed(cfg: "RecoverConfig", device: torch.device) -> "RecoverConfig":
    """Fill the speed switches left at None with the device's fast path. Under a paper recipe
    the arithmetic stays the official fp32 unless --amp is given."""
    fast = fast_path(device)
    if get_recipe(cfg.recipe).official_arithmetic:
        fast["amp"] = "none"
    return dataclasses.replace(cfg, **{k: v for k, v in fast.items() if getattr(cfg, k) is None})


@dataclass
class BatchResult:
    ipc_index: int
    batch_index: int
    classes: list[int]
    ce: float
    bn: float
    loss: float
    seconds: float
    status: str = "ok"
    iterations_done: int = 0
    images: torch.Tensor | None = field(default=None, repr=False)
    class_term: float = 0.0


def validate(cfg: RecoverConfig) -> None:
    if cfg.ipc <= 0:
        raise UserError(f"--ipc must be a positive number of images per class, got {cfg.ipc}.")
    if cfg.iterations <= 0:
        raise UserError(f"--iterations must be positive, got {cfg.iterations}.")
    if not (math.isfinite(cfg.lr) and cfg.lr >= 0):   # 0 stores the start images unchanged (a control)
        raise UserError(f"--lr must be a finite number >= 0, got {cfg.lr}.")
    if cfg.batch_size <= 0:
        raise UserError(f"--batch-size must be positive, got {cfg.batch_size}.")
    end = cfg.ipc if cfg.ipc_end is None else cfg.ipc_end
    if not (0 <= cfg.ipc_start < end <= cfg.ipc):
        raise UserError(f"--ipc-start/--ipc-end must satisfy 0 <= start < end <= ipc, got {cfg.ipc_start}..{end} for ipc {cfg.ipc}.")
    if cfg.crop_mode not in ("batch", "image"):
        raise UserError(f"--crop-mode must be 'batch' or 'image', got {cfg.crop_mode!r}.")
    if cfg.class_layout not in CLASS_LAYOUTS:
        raise UserError(f"--class-layout must be {' or '.join(CLASS_LAYOUTS)}, got {cfg.class_layout!r}.")
    if cfg.jitter_range not in JITTER_RANGES:
        raise UserError(f"--jitter-range must be {' or '.join(JITTER_RANGES)}, got {cfg.jitter_range!r}.")
    if cfg.jitter is not None and cfg.jitter < 0:
        raise UserError(f"--jitter must be >= 0, got {cfg.jitter}.")
    if cfg.image_format not in IMAGE_FORMATS:
        raise UserError(f"--image-format must be {' or '.join(IMAGE_FORMATS)}, got {cfg.image_format!r}.")
    if not (1 <= cfg.jpeg_quality <= 100):
        raise UserError(f"--jpeg-quality must be between 1 and 100, got {cfg.jpeg_quality}.")
    if cfg.pixel_rounding not in PIXEL_ROUNDINGS:
        raise UserError(f"--pixel-rounding must be {' or '.join(PIXEL_ROUNDINGS)}, got {cfg.pixel_rounding!r}.")
    if cfg.normalization not in MEAN_STD:
        raise UserError(f"--normalization must be one of {', '.join(MEAN_STD)}, got {cfg.normalization!r}.")
    check_crop_scale(cfg.min_scale, cfg.max_scale)
    if cfg.on_nonfinite not in ("stop", "skip"):
        raise UserError(f"--on-nonfinite must be 'stop' or 'skip', got {cfg.on_nonfinite!r}.")
    if cfg.bn_matching is not None and cfg.bn_matching not in BN_MATCHINGS:
        raise UserError(f"--bn-matching must be {' or '.join(BN_MATCHINGS)}, got {cfg.bn_matching!r}.")
    if cfg.backend not in BACKENDS:
        raise UserError(f"--backend must be one of {', '.join(BACKENDS)}, got {cfg.backend!r}.")
    if cfg.amp is not None and cfg.amp not in ("none", "bf16", "fp16"):
        raise UserError(f"--amp must be none, bf16 or fp16, got {cfg.amp!r}.")
    if cfg.group_batches <= 0:
        raise UserError(f"--group-batches must be positive, got {cfg.group_batches}.")
    if cfg.check_every <= 0:
        raise UserError(f"--check-every must be positive, got {cfg.check_every}.")
    if cfg.init not in INITS:
        raise UserError(f"--init must be {' or '.join(INITS)}, got {cfg.init!r}.")
    if cfg.init_select not in INIT_SELECTS:
        raise UserError(f"--init-select must be {', '.join(INIT_SELECTS)}, got {cfg.init_select!r}.")
    if cfg.init_select != "random" and cfg.init != "real":
        raise UserError(f"--init-select {cfg.init_select} chooses real start images: it needs --init real.")
    if cfg.tiles_per_side < 1:
        raise UserError(f"--tiles-per-side must be >= 1, got {cfg.tiles_per_side}.")
    if not (0 <= cfg.tiled_images <= cfg.ipc):
        raise UserError(f"--tiled-images must be between 0 and --ipc {cfg.ipc}, got {cfg.tiled_images}.")
    if cfg.tiled_images > 0 and cfg.tiles_per_side == 1:
        raise UserError(f"--tiled-images {cfg.tiled_images} stores tiles: it needs --tiles-per-side 2 or more.")
    if cfg.tiled_images == 0 and cfg.tiles_per_side > 1:
        raise UserError(f"--tiles-per-side {cfg.tiles_per_side} with --tiled-images 0 stores no tiles; give "
                        "--tiled-images (stored images per class that hold tiles) or --tiles-per-side 1.")
    if cfg.tile_iterations <= 0:
        raise UserError(f"--tile-iterations must be positive, got {cfg.tile_iterations}.")
    if cfg.crop_curriculum not in CROP_CURRICULA:
        raise UserError(f"--crop-curriculum must be {' or '.join(CROP_CURRICULA)}, got {cfg.crop_curriculum!r}.")
    if cfg.r_class < 0:
        raise UserError(f"--r-class must be >= 0, got {cfg.r_class}.")
    if cfg.class_images <= 0:
        raise UserError(f"--class-images must be positive, got {cfg.class_images}.")
    k = cfg.class_images
    if cfg.r_class > 0 and (cfg.ipc_start % k or (end % k and end != cfg.ipc)):
        raise UserError(f"class-aware matching (--r-class > 0) recovers --class-images {k} images of a class "
                        f"together; --ipc-start/--ipc-end must fall on multiples of {k}, got {cfg.ipc_start}..{end}.")


def class_batches(num_classes: int, batch_size: int, layout: str = "round-robin") -> list[list[int]]:
    """The classes of each recovery batch, one image per class.

    ``consecutive``: classes 0..B-1, B..2B-1, ... (the official code's
    ``targets_all[kk:kk + batch_size]``), the last batch holding the rest.
    ``round-robin``: class c in batch c mod n over n = ceil(K / B) batches, so the
    batches differ in size by at most one."""
    if layout == "consecutive":
        return [list(range(k, min(k + batch_size, num_classes))) for k in range(0, num_classes, batch_size)]
    if layout == "round-robin":
        n = math.ceil(num_classes / batch_size)
        return [list(range(b, num_classes, n)) for b in range(n)]
    raise UserError(f"unknown class layout {layout!r}; use {' or '.join(CLASS_LAYOUTS)}.")


def job_seed(seed: int, ipc_index: int, batch_index: int) -> int:
    return derived_seed("recover", seed, ipc_index, batch_index)


def cosine_lr(base_lr: float, iteration: int, iterations: int) -> float:
    """The original code's lr_cosine_policy without warm-up."""
    return 0.5 * (1 + math.cos(math.pi * iteration / iterations)) * base_lr


# --amp value -> the autocast dtype of the model ("none": no autocast).
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def penultimate_features(model: torch.nn.Module, images: torch.Tensor, batch_size: int = 500
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """(features, logits) of ``images`` under ``model`` in eval mode: features are the input of
    its last Linear layer (the classifier of every architecture here), flattened."""
    linear = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    if not linear:
        raise UserError("--init-select confident / herding needs a model with a Linear classifier.")
    device = next(model.parameters()).device
    seen: list[torch.Tensor] = []
    hook = linear[-1].register_forward_hook(lambda m, i, o: seen.append(i[0].flatten(1).float()))
    logits = []
    try:
        with torch.no_grad():
            for x in images.split(batch_size):
                logits.append(model(x.to(device)).float())
    finally:
        hook.remove()
    return torch.cat(seen).cpu(), torch.cat(logits).cpu()


def herding_order(features: torch.Tensor, count: int) -> torch.Tensor:
    """The first ``count`` picks of herding (Welling 2009, as iCaRL selects exemplars): each
    pick keeps the mean of the (L2-normalised) features picked so far nearest the mean of all."""
    f = torch.nn.functional.normalize(features.double(), dim=1)
    target = f.mean(0)
    picked: list[int] = []
    total = torch.zeros_like(target)
    free = torch.ones(len(f), dtype=torch.bool)
    for k in range(1, min(count, len(f)) + 1):
        dist = ((total + f) / k - target).norm(dim=1).masked_fill(~free, math.inf)
        i = int(dist.argmin())
        picked.append(i)
        free[i] = False
        total += f[i]
    return torch.tensor(picked, dtype=torch.long)


class RealImages:
    """The real training images a recovery starts from (``--init real``): image k of class c
    is entry k of an order of class c's images that is a pure function of the config (seed,
    class, selection, teacher), whatever the order, sharding or resumption of the batches.

    ``select`` random: a permutation seeded by (seed, c). confident / band / herding: the
    first INIT_CANDIDATES of that permutation are ranked by the teacher (``model``, the first
    of several; its most confident on class c first / the same order started at the pool's
    first quartile, the most confident quarter last / herding over its features, the first
    ``count`` picks), the rest follow in seeded order."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, num_classes: int, seed: int,
                 select: str = "random", model: torch.nn.Module | None = None, count: int = 1):
        self.images, self.seed = images, seed
        self.select, self.model, self.count = select, model, count
        if select != "random" and model is None:
            raise ValueError(f"init select {select!r} needs the teacher")
        self.by_class = [torch.nonzero(labels == c).flatten() for c in range(num_classes)]
        empty = [c for c, idx in enumerate(self.by_class) if idx.numel() == 0]
        if empty:
            raise UserError(f"--init real: the real data has no images of classes {empty}.")
        self._order: dict[int, torch.Tensor] = {}   # class -> its order, drawn once
        if select != "random":  # now, while the teacher is as loaded (a Recoverer may cast it for AMP)
            for c in range(num_classes):
                self.order(c)
            self.model = None

    def order(self, class_index: int) -> torch.Tensor:
        if class_index not in self._order:
            idx = self.by_class[class_index]
            g = torch.Generator().manual_seed(job_seed(self.seed, -1, class_index))
            order = idx[torch.randperm(idx.numel(), generator=g)]
            if self.select != "random":
                pool, rest = order[:INIT_CANDIDATES], order[INIT_CANDIDATES:]
                features, logits = penultimate_features(self.model, self.images[pool])
                if self.select in ("confident", "band"):
                    ranked = logits.log_softmax(1)[:, class_index].argsort(descending=True, stable=True)
                    if self.select == "band":
                        # unrecovered real images ranked 500-509 of 2,000 by confidence trained a better
                        # student than random ones, the 10 most confident a worse one; recovered from, the
                        # band was level (IPC 2) or behind (IPC 5): docs/results/quality.md
                        quarter = len(ranked) // 4
                        ranked = torch.cat([ranked[quarter:], ranked[:quarter]])
                else:
                    first = herding_order(features, self.count)
                    left = torch.ones(len(pool), dtype=torch.bool)
                    left[first] = False
                    ranked = torch.cat([first, torch.nonzero(left).flatten()])
                order = torch.cat([pool[ranked], rest])
            self._order[class_index] = order
        return self._order[class_index]

    def index(self, class_index: int, ipc_index: int) -> int:
        order = self.order(class_index)
        return int(order[ipc_index % order.numel()])

    def pick(self, classes: list[int], ipc_index: int) -> torch.Tensor:
        return self.images[[self.index(c, ipc_index) for c in classes]]


def first_real_index(ipc_index: int, tiled_images: int, per_side: int) -> int:
    """The position in its class's real-image order (RealImages) of the first start image of
    stored image ``ipc_index``: each of the first ``tiled_images`` stored images takes
    per_side**2 real images (its tiles), each later one a single image, so no two start alike."""
    tiled = min(ipc_index, tiled_images)
    return tiled * per_side ** 2 + (ipc_index - tiled)


def formations(cfg: "RecoverConfig") -> list["RecoverConfig"]:
    """The run's stored images ipc_start .. ipc_end split by formation: the tiled ones (recovered
    tile_iterations) and the whole ones (iterations), each as the config a Recoverer takes."""
    parts = []
    for lo, hi, iterations in ((cfg.ipc_start, min(cfg.ipc_end, cfg.tiled_images), cfg.tile_iterations),
                               (max(cfg.ipc_start, cfg.tiled_images), cfg.ipc_end, cfg.iterations)):
        if lo < hi:
            parts.append(dataclasses.replace(cfg, ipc_start=lo, ipc_end=hi, iterations=iterations))
    return parts


def _compiled_or_eager(fn):
    """``torch.compile(fn)``, or ``fn`` itself from the first call where compiling or running
    the compiled code fails (with one warning): for a helper whose compiled form only saves
    launches, a compiler failure on some device or version must not stop a recovery."""
    compiled = active = torch.compile(fn, dynamic=False)

    def call(*args):
        nonlocal active
        if active is compiled:
            try:
                return compiled(*args)
            except Exception as exc:  # noqa: BLE001 - any compiler failure: the eager function is exact
                first_line = (str(exc).strip().splitlines() or [""])[0]
                print(f"warning: torch.compile of {fn.__name__} failed ({type(exc).__name__}: {first_line}); "
                      f"running it eagerly.", file=sys.stderr)
                active = fn
        return active(*args)

    return call


class Recoverer:
    """Holds the frozen model(s) and runs recovery batches.

    It takes the models over: moves them to the device, freezes their parameters and,
    with ``channels_last``, converts their layout (pass copies to keep the originals).
    With several models (teachers) the CE is their mean and the BN terms their sum.

    ``real`` (a RealImages of normalised images) is the start for ``init="real"``;
    ``class_stats`` (one per model, srel_fast.class_stats) the targets of the
    class-aware term (``r_class > 0``).

    Use as a context manager: on entry the BN statistics term is attached to
    the models (hooks, or fused BN modules) and the loss is compiled once for
    all batches; on exit the models are restored."""

    def __init__(self, model, norm: Normalization, image_size: int, channels: int,
                 cfg: RecoverConfig, device: torch.device, real: RealImages | None = None,
                 class_stats: list | None = None):
        # idempotent: a resolved config comes back unchanged
        cfg = resolve_speed(cfg.resolved(image_size, real_data=real is not None), device)
        self.models = []
        for m in (model if isinstance(model, (list, tuple)) else [model]):
            m = m.to(device).eval()
            for p in m.parameters():
                p.requires_grad_(False)  # no weight gradient is ever computed
            if cfg.channels_last:
                m = m.to(memory_format=torch.channels_last)
            self.models.append(m)
        self.model = self.models[0]
        if cfg.init == "real" and real is None:
            raise UserError("--init real needs real training images (--data, or weights from srel-fast squeeze).")
        if cfg.r_class > 0 and (class_stats is None or len(class_stats) != len(self.models)):
            raise UserError("--r-class needs the per-class BN statistics of every model (--data, or weights "
                            "from srel-fast squeeze).")
        self.real = real
        self.class_stats = class_stats
        self.num_classes = int(class_stats[0][0][0].shape[0]) if class_stats else None
        self.class_aware = cfg.r_class > 0
        self.norm = norm
        self.size = image_size
        # --tiles-per-side k: the optimised images are the k*k tiles of each stored image, at
        # 1/k of the size; every crop of a tile is resized to the full size the model takes.
        # A Recoverer serves one formation: the config's stored images ipc_start.. hold tiles if
        # they come before --tiled-images, else they are whole (run_recover makes one of each).
        if image_size % cfg.tiles_per_side:
            raise UserError(f"--tiles-per-side {cfg.tiles_per_side} must divide the image size {image_size}.")
        self.per_side = cfg.tiles_per_side if cfg.ipc_start < cfg.tiled_images else 1
        self.tile = image_size // self.per_side
        self.tiles = self.per_side ** 2   # optimised images per stored image
        self.channels = channels
        self.cfg = cfg
        self.device = device
        self.lo, self.hi = norm.clamp_bounds(device)
        self.per_image = cfg.crop_mode == "image"
        # With the plain-PyTorch kernels (backend torch), one batch-wide crop is a single slice +
        # interpolate: the original code's way. It reads the box on the host, so the compiled
        # path uses the kernel instead.
        self.shared_ref = (not self.per_image and cfg.backend == "torch" and not cfg.compile
                           and cfg.group_batches == 1)
        self.group_size = 0  # images per recovery batch when several batches share a launch
        self._stack = contextlib.ExitStack()
        self._buffers: dict[int, torch.Tensor] = {}
        self.boxes_from_uniforms = None  # the compiled crop-box arithmetic, set on entering with --compile
        self.cuda_graphs = self.graphs_enabled(cfg, device)
        # fp16 autocast needs loss scaling: the BN-term input gradients of the large early
        # layers are ~1e-8 at r_bn 0.01, under fp16's smallest subnormal (6e-8), and would
        # flush to zero. bf16 has fp32's range and needs none.
        self.scaler = torch.amp.GradScaler(device.type, init_scale=2.0 ** 16) if cfg.amp == "fp16" else None

    @staticmethod
    def graphs_enabled(cfg: RecoverConfig, device: torch.device) -> bool:
        """Whether the compiled step runs as CUDA graphs (mode reduce-overhead).

        A graph replays a capture, so nothing in the step may read a device value on
        the host. The plain-PyTorch crop (backend torch) slices every image with box
        sizes read on the host: it cannot be captured, so graphs are off there."""
        if not (cfg.cuda_graphs and cfg.compile and device.type == "cuda"):
            return False
        if cfg.backend == "torch":
            print("warning: --cuda-graphs is off with --backend torch (its per-image crops read box sizes on "
                  "the host, which a CUDA graph cannot capture); use --backend auto for graphs.", file=sys.stderr)
            return False
        return True

    def __enter__(self) -> "Recoverer":
        cfg = self.cfg
        amp_dtype = AMP_DTYPES.get(cfg.amp)
        for m in self.models:
            self._stack.enter_context(frozen_weights_in_amp_dtype(m, amp_dtype))
        self.stats = [self._stack.enter_context(bn_matching(m, cfg.first_bn_multiplier, cfg.bn_matching, cfg.backend))
                      for m in self.models]
        self.terms = []
        if self.class_aware:
            from .class_stats import ClassAwareTerms

            for stats, cs in zip(self.stats, self.class_stats):
                terms = ClassAwareTerms(cs, stats.layers, self.num_classes).to(self.device)
                stats.set_moments_loss(terms)
                self.terms.append(terms)
        self.loss_fn = self._loss
        if self.cfg.compile:
            mode = "reduce-overhead" if self.cuda_graphs else "default"
            self.loss_fn = torch.compile(self._loss, mode=mode, dynamic=False)
            if cfg.crop_curriculum != "cda":  # (its scale bounds change every iteration: one compile each)
                # The crop boxes' arithmetic, ~50 small ops launched from the host every iteration
                # outside the graphs, fused into a few kernels; the same draws (bench/NOTES.md, run 3).
                self.boxes_from_uniforms = _compiled_or_eager(crop_boxes_from_uniforms)
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def _loss(self, x, targets, boxes, flip, shift):
        cfg = self.cfg
        params = CropParams(boxes, flip, shift)
        x_aug = apply_crops(x, params, (self.size, self.size), cfg.backend, shared=self.shared_ref)
        if cfg.channels_last:
            x_aug = x_aug.contiguous(memory_format=torch.channels_last)
        amp_dtype = AMP_DTYPES.get(cfg.amp)
        ce = bn = 0
        for model, stats in zip(self.models, self.stats):
            with torch.autocast(self.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                logits = model(x_aug)
            if self.group_size:
                # Stacked independent batches: the sum of their objectives (mean CE per batch).
                ce = ce + F.cross_entropy(logits.float(), targets, reduction="sum") / self.group_size
            else:
                ce = ce + F.cross_entropy(logits.float(), targets)
            bn = bn + stats.loss()
        ce = ce / len(self.models)
        if self.class_aware:  # bn is the stacked (paper term, class term)
            return ce + cfg.r_bn * bn[0] + cfg.r_class * bn[1], ce, bn
        return ce + cfg.r_bn * bn, ce, bn

    def initial_images(self, n: int, seed: int) -> torch.Tensor:
        # Drawn on the CPU so the start point does not depend on the device.
        g = torch.Generator().manual_seed(seed)
        return torch.randn((n, self.channels, self.tile, self.tile), generator=g).to(self.device)

    def start_images(self, jobs: list[tuple[list[int], int, int]]) -> torch.Tensor:
        """The seeded start of each job (classes, ipc index, batch index), stacked: the
        ``tiles`` optimised images of each class in turn."""
        if self.cfg.init == "real":
            return torch.cat([self.real_tiles(classes, i) for classes, i, _ in jobs]).to(self.device)
        return torch.cat([self.initial_images(len(classes) * self.tiles, job_seed(self.cfg.seed, i, b))
                          for classes, i, b in jobs])

    def real_tiles(self, classes: list[int], ipc_index: int) -> torch.Tensor:
        """Real start images of stored image ``ipc_index`` of each class: its k*k tiles are the
        class's next k*k real images (first_real_index), area-downsampled to the tile size (one
        image, unchanged, for a whole image)."""
        first = first_real_index(ipc_index, self.cfg.tiled_images, self.cfg.tiles_per_side)
        if self.tiles == 1:
            return self.real.pick(classes, first)
        index = [self.real.index(c, first + t) for c in classes for t in range(self.tiles)]
        return F.interpolate(self.real.images[index].float(), size=(self.tile, self.tile), mode="area")

    def optimizer(self, x: torch.Tensor) -> torch.optim.Adam:
        """The original code's Adam(betas 0.5, 0.9) on the images, as the fused implementation
        on both devices: one pass over the images per step instead of about ten elementwise
        ones (CUDA: 0.3 ms per iteration at ResNet-18, batch 100, on an H200; CPU: 0.38 vs
        4.6 ms at batch 8 and 224 px on the 2-core machine). The result differs from the
        foreach update by float rounding only (tests/test_recover.py)."""
        return torch.optim.Adam([x], lr=self.cfg.lr, betas=(0.5, 0.9), eps=1e-8, fused=x.device.type in ("cuda", "cpu"))

    def batch_images(self, n: int, seed) -> torch.Tensor:
        """The images being optimised, reset to their seeded start (noise from ``seed``, one
        seed or one per stacked batch, or the given start tensor). One buffer per
        batch shape is reused across batches, so a CUDA-graph capture of the step
        sees the same input address every time (no copy per replay)."""
        key = n
        if key not in self._buffers:
            fmt = torch.channels_last if self.cfg.channels_last else torch.contiguous_format
            buf = torch.empty((n, self.channels, self.tile, self.tile), device=self.device, memory_format=fmt)
            if self.cuda_graphs:
                torch._dynamo.mark_static_address(buf)
            self._buffers[key] = buf.requires_grad_(True)
        x = self._buffers[key]
        with torch.no_grad():
            if isinstance(seed, torch.Tensor):
                x.copy_(seed)
            else:
                seeds = seed if isinstance(seed, (list, tuple)) else [seed]
                x.copy_(torch.cat([self.initial_images(n // len(seeds), s) for s in seeds]))
        x.grad = None
        return x

    def min_scale_at(self, it: int) -> float:
        """The crops' lower scale bound at iteration ``it``: min_scale, or under the CDA
        curriculum (Yin & Shen 2023) easing from max_scale (whole images: easy) down to
        min_scale (small crops: hard) along a half cosine over the iterations."""
        cfg = self.cfg
        if cfg.crop_curriculum != "cda":
            return cfg.min_scale
        frac = it / max(1, cfg.iterations - 1)
        return cfg.max_scale - (cfg.max_scale - cfg.min_scale) * 0.5 * (1 - math.cos(math.pi * frac))

    def _crop_params(self, n: int, generators: list[torch.Generator], it: int = 0) -> CropParams:
        cfg = self.cfg
        per = n // len(generators)
        ps = [draw_crop_params(per, self.tile, self.tile, g, per_image=self.per_image,
                               scale=(self.min_scale_at(it), cfg.max_scale), jitter=cfg.jitter,
                               jitter_range=cfg.jitter_range, out_size=(self.size, self.size),
                               boxes_from_uniforms=self.boxes_from_uniforms) for g in generators]
        if len(ps) == 1:
            return ps[0]
        return CropParams(torch.cat([p.boxes for p in ps]), torch.cat([p.flip for p in ps]),
                          None if ps[0].shift is None else torch.cat([p.shift for p in ps]))

    def step(self, x: torch.Tensor, targets: torch.Tensor, generators, optimizer: torch.optim.Optimizer, it: int):
        """One recovery iteration on ``x`` in place: lr, crops, loss, backward, Adam, clamp.
        ``generators`` is one generator, or one per batch stacked in ``x`` (each batch
        draws its crops from its own, so stacking does not change them). Returns the
        (loss, ce, bn) tensors of the images before the update, unsynced."""
        cfg = self.cfg
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(cfg.lr, it, cfg.iterations)
        gens = generators if isinstance(generators, (list, tuple)) else [generators]
        p = self._crop_params(x.shape[0], gens, it)
        if self.cuda_graphs:
            # a new iteration: the graphs may reuse the memory of the last one's outputs
            torch.compiler.cudagraph_mark_step_begin()
        loss, ce, bn = self.loss_fn(x, targets, p.boxes, p.flip, p.shift)
        optimizer.zero_grad(set_to_none=True)
        if self.scaler is None:
            loss.backward()
            optimizer.step()
        else:  # scaled backward; the step unscales x.grad and skips a step whose gradient overflowed
            self.scaler.scale(loss).backward()
            self.scaler.step(optimizer)
            self.scaler.update()
        with torch.no_grad():
            x.clamp_(self.lo, self.hi)
        return loss, ce, bn

    def run_group(self, jobs: list[tuple[list[int], int, int]], on_iteration=None) -> list[BatchResult]:
        """Recover several batches (classes, ipc index, batch index) of equal size in one
        stacked tensor. Adam and the clamp act per element and the BN term is computed
        per batch, so each batch follows its own objective; only the float rounding of
        the stacked convolutions may differ from running it alone. A group that meets
        a non-finite loss is re-run batch by batch, so only the diverging batch fails."""
        cfg = self.cfg
        g, per = len(jobs), len(jobs[0][0]) * self.tiles   # optimised images per batch
        seeds = [job_seed(cfg.seed, i, b) for _, i, b in jobs]
        x = self.batch_images(g * per, self.start_images(jobs))
        targets = torch.tensor([c for classes, _, _ in jobs for c in classes for _ in range(self.tiles)],
                               device=self.device)
        gens = [torch.Generator(device=self.device).manual_seed(s + 1) for s in seeds]
        opt = self.optimizer(x)
        self.group_size = per if g > 1 else 0
        for stats in self.stats:
            # class-aware: per-image moments, composed into batches and classes by the terms
            stats.set_groups(g * per if self.class_aware else g)
        batch_index = torch.arange(g * per, device=self.device) // per
        for terms in self.terms:
            terms.set_batch(batch_index, targets)
        start = time.perf_counter()
        last_good, checked_at = x.detach().clone(), 0
        try:
            for it in range(cfg.iterations):
                loss, ce, bn = self.step(x, targets, gens, opt, it)
                if it % cfg.check_every == 0 or it == cfg.iterations - 1:
                    # A check syncs the device, after the step so that forward and backward
                    # stay queued together; a divergence between checks is caught late and
                    # the images of the last good check are kept.
                    loss_v = loss.item()
                    if not (math.isfinite(loss_v) and bool(torch.isfinite(x).all())):
                        if g > 1 and not self.class_aware:  # class-aware batches only exist together
                            return [self.run_group([job], on_iteration)[0] for job in jobs]
                        return [BatchResult(i, b, classes, ce.item(), float(bn.detach().sum()), loss_v,
                                            time.perf_counter() - start, "nonfinite", checked_at,
                                            pack_tiles(last_good[k * per:(k + 1) * per], self.per_side))
                                for k, (classes, i, b) in enumerate(jobs)]
                    last_good, checked_at = x.detach().clone(), it + 1
                    if on_iteration is not None:
                        on_iteration(it, loss_v)
        finally:
            self.group_size = 0
            for stats in self.stats:
                stats.set_groups(1)
        seconds = time.perf_counter() - start
        # With several batches the final losses are those of the whole group, divided
        # evenly (the BN term is not split per batch by the kernels).
        cls = float(bn[1].detach()) / g if self.class_aware else 0.0
        bn_v = float((bn[0] if self.class_aware else bn).detach())
        return [BatchResult(i, b, classes, ce.item() / g, bn_v / g, loss_v / g, seconds / g, "ok",
                            cfg.iterations, pack_tiles(last_good[k * per:(k + 1) * per], self.per_side),
                            class_term=cls)
                for k, (classes, i, b) in enumerate(jobs)]


def _upgrade_config(config: dict) -> dict:
    """A recover_config.json of an older version in today's fields: before --bn-matching,
    ``backend: torch`` meant the original code's hooks with the plain-PyTorch kernels; before
    --tiles-per-side every stored image was one image (1); before --tiled-images every stored
    image held the tiles, recovered ``iterations``."""
    config = dict(config, tiles_per_side=config.get("tiles_per_side", 1))
    if "tiled_images" not in config:
        config.update(tiled_images=config["ipc"] if config["tiles_per_side"] > 1 else 0,
                      tile_iterations=config["iterations"])
    if "bn_matching" in config:
        return config
    return dict(config, bn_matching="hooks" if config.get("backend") == "torch" else "fused")


def prepare_output(cfg: RecoverConfig, record: dict, processes: int = 1) -> None:
    """Create, resume or (--overwrite) replace the output tree (srel_fast.files.check_output)."""
    config_path = os.path.join(cfg.out, "recover_config.json")
    action = check_output(cfg.out, cfg.overwrite, record=config_path, what="recovery run", processes=processes,
                          differences=lambda old: config_differences(_upgrade_config(old["config"]), record["config"],
                                                                     RecoverConfig.RUN_ONLY_FIELDS))
    if action == RESUME:
        return
    if action == REPLACE:
        shutil.rmtree(cfg.out)
    os.makedirs(cfg.out, exist_ok=True)
    write_json(config_path, record)


def _rank_world() -> tuple[int, int]:
    """This process's rank and the world size, from the torchrun environment (RANK, WORLD_SIZE).
    Recovery needs no process group: ranks share nothing but the output tree."""
    return _dist.rank(), _dist.world_size()


def load_teachers(cfg: RecoverConfig) -> list:
    """The recovery model(s): ``--weights a.pt,b.pt`` gives several teachers, which must
    agree on classes, input size, channels and normalisation."""
    names = [w for w in (cfg.weights or "").split(",") if w] or [cfg.weights]
    loaded = [load_model(w, cfg.arch, num_classes=cfg.num_classes, image_size=cfg.image_size,
                         normalization=cfg.normalization) for w in names]
    for lm in loaded:
        require_batchnorm(lm.model, lm.spec.arch)
        first = loaded[0]
        if ((lm.spec.num_classes, lm.spec.image_size, lm.spec.in_channels, lm.mean, lm.std)
                != (first.spec.num_classes, first.spec.image_size, first.spec.in_channels, first.mean, first.std)):
            raise UserError(f"the teachers {names[0]} and {lm.meta.get('source', 'another')} differ in classes, "
                            "input size, channels or normalisation; several teachers must agree on them.")
    return loaded


def real_training_data(cfg: RecoverConfig, loaded) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The real training images (uint8) and labels for --init real and the class statistics:
    --data, else the data set the checkpoint was trained on (with its split seed)."""
    source = cfg.data or loaded.meta.get("dataset")
    if source is None:
        return None
    check_data_path(source)
    if is_builtin(source):
        seed = (loaded.meta.get("config") or {}).get("seed", 0)
        data = load_builtin(source, "train", seed)
        return data.images, data.labels
    from .images import load_tree

    root = os.path.join(source, "train") if os.path.isdir(os.path.join(source, "train")) else source
    images, labels, _ = load_tree(root, channels=loaded.spec.in_channels)
    if images.shape[-1] != loaded.spec.image_size or images.shape[-2] != loaded.spec.image_size:
        raise UserError(f"the real images in {root} are {images.shape[-2]}x{images.shape[-1]}, the model takes "
                        f"{loaded.spec.image_size}x{loaded.spec.image_size}; use --init noise and --r-class 0.")
    return (images * 255).round().to(torch.uint8) if images.is_floating_point() else images, labels


def class_statistics_for(lm, cfg: RecoverConfig, real, device) -> list:
    """A teacher's per-class BN statistics: those squeeze stored in its checkpoint (for
    the data it was trained on), else collected now from the real data (normalised images,
    labels)."""
    from .class_stats import class_stats_from_state, collect_class_statistics

    if lm.meta.get("class_bn_stats") is not None and cfg.data in (None, lm.meta.get("dataset")):
        return class_stats_from_state(lm.meta["class_bn_stats"])
    if real is None:
        raise UserError("--r-class needs the real training data: pass --data (a built-in name or an ImageFolder).")
    model = lm.model.to(device)
    return collect_class_statistics(model, real[0].to(device), real[1].to(device), lm.spec.num_classes)


def _record_rules(record: dict, given: RecoverConfig, resolved: RecoverConfig, image_size: int,
                  real_known: bool) -> None:
    """Add what the recipe's rules (by image size and known real data) chose to the recipe
    record: under "from_recipe" the values they filled, under "overrides" the explicit values
    that differ from the rule's."""
    open_fields = {f: None for f in RecoverConfig.RECIPE_FIELDS if f not in record["from_recipe"]}
    by_rule = dataclasses.replace(given, **open_fields).resolved(image_size, real_data=real_known)
    for f in open_fields:
        if getattr(given, f) is None:
            record["from_recipe"][f] = getattr(resolved, f)
        elif getattr(given, f) != getattr(by_rule, f) and f not in record["overrides"]:
            record["overrides"][f] = {"value": getattr(given, f), "recipe": getattr(by_rule, f)}
    record["from_recipe"] = dict(sorted(record["from_recipe"].items()))
    record["overrides"] = dict(sorted(record["overrides"].items()))


def run_recover(cfg: RecoverConfig) -> dict:
    cfg, recipe_record = resolve_recipe(cfg, "recover")
    teachers = load_teachers(cfg)
    loaded = teachers[0]
    spec = loaded.spec
    real_known = (cfg.data or loaded.meta.get("dataset")) is not None
    given = cfg
    cfg = cfg.resolved(spec.image_size, real_data=real_known)
    _record_rules(recipe_record, given, cfg, spec.image_size, real_known)
    validate(cfg)
    device = _dist.resolve_device(cfg.device)
    cfg = resolve_speed(cfg, device)
    norm = Normalization(loaded.mean, loaded.std)
    record = {
        "config": dataclasses.asdict(cfg),
        "recipe": recipe_record,
        "model": spec.to_dict(),
        "classes": loaded.classes,
        "mean": list(loaded.mean),
        "std": list(loaded.std),
        "environment": environment(),
        "teacher_test_accuracy": loaded.meta.get("test_accuracy"),
    }
    rank, world = _rank_world()
    # Every rank checks (or writes) the config before writing anything, so whichever
    # rank comes first creates the tree and the others find an identical config.
    prepare_output(cfg, record, processes=world)
    real = real_training_data(cfg, loaded) if (cfg.init == "real" or cfg.r_class > 0) else None
    if real is not None:
        real = (norm.normalize(real[0]), real[1])   # once, for the start images and the statistics
    class_stats = ([class_statistics_for(lm, cfg, real, device) for lm in teachers]
                   if cfg.r_class > 0 else None)
    ranker = loaded.model.to(device).eval() if cfg.init_select != "random" else None
    pool = (RealImages(real[0], real[1], spec.num_classes, cfg.seed, cfg.init_select, ranker,
                       count=first_real_index(cfg.ipc, cfg.tiled_images, cfg.tiles_per_side))   # all the run starts from
            if cfg.init == "real" and real is not None else None)
    plans = [_plan_jobs(part, spec.num_classes, rank, world) for part in formations(cfg)]   # tiles, then whole
    # One progress line for the whole run: both formations' batches, iterations and time left.
    todo_iterations = sum(len(p.todo) * p.cfg.iterations for p in plans)
    n_jobs, n_done = sum(p.n_jobs for p in plans), sum(p.n_jobs - p.n_todo for p in plans)
    bar = _progress_bar(cfg, todo_iterations, f"recover ({n_done} of {n_jobs} batches done)")
    progress = RunProgress(bar, n_jobs, n_done, sum(p.images_done for p in plans), todo_iterations)   # issue 19
    failed = []
    try:
        for plan in plans:
            if not plan.todo:   # a resumed run's finished formation: no Recoverer to build
                continue
            recoverer = Recoverer([lm.model for lm in teachers], norm, spec.image_size, spec.in_channels, plan.cfg,
                                  device, real=pool, class_stats=class_stats)
            with recoverer:
                failed += _run_jobs(plan, recoverer, norm, progress)
    finally:
        if bar is not None:
            bar.close()
    return write_manifest(cfg, record, failed)


@dataclasses.dataclass
class JobPlan:
    """One formation's recovery jobs on this rank: ``launches`` (lists of (ipc index, batch index)
    recovered together), those not finished by an earlier run (``todo``), the images already
    written, and the rank's progress file."""
    cfg: RecoverConfig
    progress_path: str
    batches: list[list[int]]
    launches: list[list[tuple[int, int]]]
    todo: list[list[tuple[int, int]]]
    images_done: int

    @property
    def n_jobs(self) -> int:
        return sum(map(len, self.launches))

    @property
    def n_todo(self) -> int:
        return sum(map(len, self.todo))


def _plan_jobs(cfg: RecoverConfig, num_classes: int, rank: int, world: int) -> JobPlan:
    batches = class_batches(num_classes, cfg.batch_size, cfg.class_layout)
    jobs = [(i, b) for i in range(cfg.ipc_start, cfg.ipc_end) for b in range(len(batches))]
    # Launches: up to group_batches consecutive jobs of equal size stacked together. The
    # grouping depends only on the config and the ipc range, so a resumed or sharded run
    # stacks (and rounds) every batch exactly as an uninterrupted one. Class-aware
    # matching recovers every ipc image of a batch's classes together (one launch each).
    launches: list[list[tuple[int, int]]] = []
    if cfg.r_class > 0:
        k = cfg.class_images
        launches = [[(i, b) for i in range(s, min(s + k, cfg.ipc_end))]
                    for s in range(cfg.ipc_start, cfg.ipc_end, k) for b in range(len(batches))]
        jobs = []
    for i, b in jobs:
        last = launches[-1] if launches else None
        if last and len(last) < cfg.group_batches and len(batches[last[0][1]]) == len(batches[b]):
            last.append((i, b))
        else:
            launches.append([(i, b)])
    launches = launches[rank::world]
    progress_path = os.path.join(cfg.out, f"progress.rank{rank}.jsonl" if world > 1 else "progress.jsonl")
    done = {(r["ipc_index"], r["batch_index"]) for r in read_jsonl(progress_path) if r["status"] == "ok"}

    def complete(i: int, b: int) -> bool:
        return (i, b) in done and all(
            os.path.exists(image_path(cfg.out, c, i, cfg.image_format)) for c in batches[b])

    todo = [launch for launch in launches if not all(complete(i, b) for i, b in launch)]
    images_done = sum(len(batches[b]) for launch in launches for i, b in launch if complete(i, b))
    return JobPlan(cfg, progress_path, batches, launches, todo, images_done)


def _run_jobs(plan: JobPlan, recoverer: Recoverer, norm: Normalization, progress: "RunProgress") -> list[dict]:
    """Recover a plan's unfinished launches, saving each batch's images and progress entry as it
    finishes; returns the entries of the batches that became non-finite."""
    cfg, batches, bar, progress_path = plan.cfg, plan.batches, progress.bar, plan.progress_path
    failed = []
    for launch in plan.todo:
        where = ", ".join(f"ipc {i} batch {b}" for i, b in launch)

        def tick(it, loss, bar=bar, state={"shown": 0}):
            progress.iterations(it + 1 - state["shown"])
            if bar is not None:
                bar.update(it + 1 - state["shown"])
                state["shown"] = it + 1
                bar.set_postfix_str(f"{where}, loss {loss:.3f}")
        results = recoverer.run_group([(batches[b], i, b) for i, b in launch], tick)
        for result in results:
            i, b = result.ipc_index, result.batch_index
            entry = {k: v for k, v in dataclasses.asdict(result).items() if k != "images"}
            entry["group_batches"] = len(launch)
            if result.status != "ok":
                failed.append(entry)
                _save_batch(cfg, norm, result, os.path.join(cfg.out, "failed", f"ipc{i:05d}_batch{b:05d}"))
                append_jsonl(progress_path, entry)
                msg = (f"recovery batch (ipc {i}, batch {b}) became non-finite after iteration "
                       f"{result.iterations_done}; its last finite images are in {cfg.out}/failed/")
                if cfg.on_nonfinite == "stop":
                    raise NonFiniteLoss(msg + "; lower --lr or --r-bn.")
                print("warning: " + msg + "; going on with the other batches.", file=sys.stderr)
                continue
            _save_batch(cfg, norm, result, None)
            append_jsonl(progress_path, entry)
            progress.batch_written(len(result.classes))
    return failed


def _save_batch(cfg: RecoverConfig, norm: Normalization, result: BatchResult, folder: str | None) -> None:
    images01 = norm.denormalize(result.images.float()).clamp(0, 1).cpu()
    for img, c in zip(images01, result.classes):
        if folder is None:
            path = image_path(cfg.out, c, result.ipc_index, cfg.image_format)
        else:
            path = os.path.join(folder, f"{c:05d}.{cfg.image_format}")
        save_image(path, img, cfg.image_format, cfg.jpeg_quality, cfg.pixel_rounding)


def write_manifest(cfg: RecoverConfig, record: dict, failed: list[dict]) -> dict:
    entries = []
    for name in sorted(os.listdir(cfg.out)):
        if name.startswith("progress") and name.endswith(".jsonl"):
            entries += read_jsonl(os.path.join(cfg.out, name))
    latest = {}
    for e in entries:
        latest[(e["ipc_index"], e["batch_index"])] = e
    ok = [e for e in latest.values() if e["status"] == "ok"]
    # The model sees k*k images (one crop per tile) per stored image of tiles in an iteration.
    model_images = sum(len(e["classes"]) * e["iterations_done"]
                       * (cfg.tiles_per_side ** 2 if e["ipc_index"] < cfg.tiled_images else 1) for e in ok)
    manifest = {
        **record,
        "batches": sorted(latest.values(), key=lambda e: (e["ipc_index"], e["batch_index"])),
        "completed_batches": len(ok),
        "failed_batches": [e for e in latest.values() if e["status"] != "ok"],
        "seconds_total": sum(e["seconds"] for e in ok),
        "ms_per_image_iteration": 1000 * sum(e["seconds"] for e in ok) / max(1, model_images),
    }
    # Each rank rewrites the manifest when it finishes; the last one sees every batch.
    write_json(os.path.join(cfg.out, "manifest.json"), manifest)
    return manifest


def _progress_bar(cfg, total: int, desc: str):
    if not cfg.progress or _rank_world()[0] != 0:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="it", dynamic_ncols=True, file=sys.stderr)


class RunProgress:
    """The progress line of a recovery run (issue 19): batches done out of all of the run's batches
    (finished earlier ones included), images written, and the time left for the whole run estimated
    from the iterations done so far in this process."""

    def __init__(self, bar, total_batches: int, done_batches: int, images: int, total_iterations: int):
        self.bar, self.total, self.done, self.images = bar, total_batches, done_batches, images
        self.total_iterations, self.iterations_done = total_iterations, 0
        self.start = time.perf_counter()

    def iterations(self, n: int) -> None:
        self.iterations_done += n

    def seconds_left(self) -> float | None:
        if self.iterations_done == 0:
            return None
        elapsed = time.perf_counter() - self.start
        return elapsed / self.iterations_done * max(0, self.total_iterations - self.iterations_done)

    def text(self) -> str:
        left = self.seconds_left()
        eta = "" if left is None else f", about {_duration(left)} left"
        return f"recover ({self.done} of {self.total} batches done, {self.images} images written{eta})"

    def batch_written(self, images: int) -> None:
        self.done += 1
        self.images += images
        if self.bar is not None:
            self.bar.set_description_str(self.text(), refresh=True)


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"
