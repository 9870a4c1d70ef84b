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
import hashlib
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F

from . import distributed as _dist
from .augment import JITTER_RANGES, CropParams, apply_crops, draw_crop_params
from .bn_matching import bn_matching
from .data import Normalization
from .errors import NonFiniteLoss, UserError
from .files import append_jsonl, environment, read_json, read_jsonl, write_json
from .images import IMAGE_FORMATS, PIXEL_ROUNDINGS, image_path, save_image
from .models import MEAN_STD, load_model, require_batchnorm
from .recipes import apply_recipe, get_recipe, resolve_recipe

CLASS_LAYOUTS = ("consecutive", "round-robin")


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
    # The fast path: speed switches; each can be turned off on its own to measure what it brings.
    # None: the device's fast path (FAST_PATH, resolve_speed).
    backend: str | None = None         # torch (the original code's hooks) | auto | triton | cuda | cpu
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
        "normalization", "image_size")
    SPEED_SWITCHES: ClassVar[tuple[str, ...]] = (
        "backend", "amp", "channels_last", "compile", "cuda_graphs", "group_batches", "check_every")

    def resolved(self, image_size: int) -> "RecoverConfig":
        """Every value filled: the recipe's, then the resolution rules for what it leaves open."""
        cfg = apply_recipe(self, "recover")
        big = image_size >= 128
        return dataclasses.replace(
            cfg,
            ipc_end=cfg.ipc if cfg.ipc_end is None else cfg.ipc_end,
            lr=cfg.lr if cfg.lr is not None else (0.25 if big else 0.1),
            r_bn=cfg.r_bn if cfg.r_bn is not None else (0.01 if big else 1.0),
            jitter=cfg.jitter if cfg.jitter is not None else (32 if big else image_size // 16),
        )


# The speed switches a device gets when none is given (each given flag overrides its own),
# chosen by measurement, side by side (bench recover-step, ResNet-18 at 224):
# - CUDA (H200, bench/results/h200_run2): fused statistics, bf16, channels_last, compile and
#   CUDA graphs: 3.4x faster than the official loop, 1.15x the compiled floor.
# - CPU (2 cores, bench/results/recover_step_resnet18-224_cpu.md): the C++ kernels in eager
#   mode and fp32; compiling made the step slower there, and fp32 keeps a run's images the
#   same on every CPU (bf16 autocast's speed depends on the CPU's instructions).
FAST_PATH = {
    "cuda": {"backend": "auto", "amp": "bf16", "channels_last": True, "compile": True, "cuda_graphs": True},
    "cpu": {"backend": "auto", "amp": "none", "channels_last": False, "compile": False, "cuda_graphs": False},
}


def resolve_speed(cfg: "RecoverConfig", device: torch.device) -> "RecoverConfig":
    """Fill the speed switches left at None with the device's fast path. Under a paper recipe
    the arithmetic stays the official fp32 unless --amp is given."""
    fast = dict(FAST_PATH["cuda" if device.type == "cuda" else "cpu"])
    if get_recipe(cfg.recipe).official_arithmetic:
        fast["amp"] = "none"
    return dataclasses.replace(cfg, **{k: v for k, v in fast.items() if getattr(cfg, k) is None})


# Fields that may differ between runs writing into the same output tree (the recipe's
# name is provenance: the resolved values are compared).
_RUN_ONLY_FIELDS = ("ipc_start", "ipc_end", "overwrite", "progress", "device", "out", "on_nonfinite", "recipe")


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


def validate(cfg: RecoverConfig) -> None:
    if cfg.ipc <= 0:
        raise UserError(f"--ipc must be a positive number of images per class, got {cfg.ipc}.")
    if cfg.iterations <= 0:
        raise UserError(f"--iterations must be positive, got {cfg.iterations}.")
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
    if not (0 < cfg.min_scale <= cfg.max_scale <= 1):
        raise UserError(f"crop scale range must satisfy 0 < min <= max <= 1, got {cfg.min_scale}..{cfg.max_scale}.")
    if cfg.on_nonfinite not in ("stop", "skip"):
        raise UserError(f"--on-nonfinite must be 'stop' or 'skip', got {cfg.on_nonfinite!r}.")
    if cfg.amp is not None and cfg.amp not in ("none", "bf16", "fp16"):
        raise UserError(f"--amp must be none, bf16 or fp16, got {cfg.amp!r}.")
    if cfg.group_batches <= 0:
        raise UserError(f"--group-batches must be positive, got {cfg.group_batches}.")
    if cfg.check_every <= 0:
        raise UserError(f"--check-every must be positive, got {cfg.check_every}.")


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
    digest = hashlib.sha256(f"srel-fast/recover/{seed}/{ipc_index}/{batch_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def cosine_lr(base_lr: float, iteration: int, iterations: int) -> float:
    """The original code's lr_cosine_policy without warm-up."""
    return 0.5 * (1 + math.cos(math.pi * iteration / iterations)) * base_lr


def resolve_device(name: str) -> torch.device:
    """``auto``/``cuda`` mean the local rank's GPU under torchrun (srel_fast.distributed)."""
    return _dist.resolve_device(name)


class Recoverer:
    """Holds the frozen model and runs recovery batches.

    It takes the model over: moves it to the device, freezes its parameters and,
    with ``channels_last``, converts its layout (pass a copy to keep the original).

    Use as a context manager: on entry the BN statistics term is attached to
    the model (hooks, or fused BN modules) and the loss is compiled once for
    all batches; on exit the model is restored."""

    def __init__(self, model: torch.nn.Module, norm: Normalization, image_size: int, channels: int,
                 cfg: RecoverConfig, device: torch.device):
        # idempotent: a resolved config comes back unchanged
        cfg = resolve_speed(cfg.resolved(image_size), device)
        self.model = model.to(device).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)  # no weight gradient is ever computed
        if cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.norm = norm
        self.size = image_size
        self.channels = channels
        self.cfg = cfg
        self.device = device
        self.lo, self.hi = norm.clamp_bounds(device)
        self.per_image = cfg.crop_mode == "image"
        # One batch-wide crop through a single slice + interpolate: the original code's
        # way. It reads the box on the host, so the compiled path uses the kernel instead.
        self.shared_ref = (not self.per_image and cfg.backend == "torch" and not cfg.compile
                           and cfg.group_batches == 1)
        self.group_size = 0  # images per recovery batch when several batches share a launch
        self._stack = contextlib.ExitStack()
        self._buffers: dict[int, torch.Tensor] = {}
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
        self.stats = self._stack.enter_context(bn_matching(self.model, self.cfg.first_bn_multiplier, self.cfg.backend))
        self.loss_fn = self._loss
        if self.cfg.compile:
            mode = "reduce-overhead" if self.cuda_graphs else "default"
            self.loss_fn = torch.compile(self._loss, mode=mode, dynamic=False)
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def _loss(self, x, targets, boxes, flip, shift):
        cfg = self.cfg
        params = CropParams(boxes, flip, shift)
        x_aug = apply_crops(x, params, (self.size, self.size), cfg.backend, shared=self.shared_ref)
        if cfg.channels_last:
            x_aug = x_aug.contiguous(memory_format=torch.channels_last)
        amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp)
        with torch.autocast(self.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = self.model(x_aug)
        if self.group_size:
            # Stacked independent batches: the sum of their objectives (mean CE per batch).
            ce = F.cross_entropy(logits.float(), targets, reduction="sum") / self.group_size
        else:
            ce = F.cross_entropy(logits.float(), targets)
        bn = self.stats.loss()
        return ce + cfg.r_bn * bn, ce, bn

    def initial_images(self, n: int, seed: int) -> torch.Tensor:
        # Drawn on the CPU so the start point does not depend on the device.
        g = torch.Generator().manual_seed(seed)
        return torch.randn((n, self.channels, self.size, self.size), generator=g).to(self.device)

    def optimizer(self, x: torch.Tensor) -> torch.optim.Adam:
        """The original code's Adam(betas 0.5, 0.9) on the images. On CUDA the fused
        implementation: one kernel per step instead of about ten elementwise passes
        over the images (0.3 ms per iteration at ResNet-18, batch 100, on an H200)."""
        return torch.optim.Adam([x], lr=self.cfg.lr, betas=(0.5, 0.9), eps=1e-8, fused=x.device.type == "cuda")

    def batch_images(self, n: int, seed) -> torch.Tensor:
        """The images being optimised, reset to their seeded start. One buffer per
        batch shape is reused across batches, so a CUDA-graph capture of the step
        sees the same input address every time (no copy per replay)."""
        key = n
        if key not in self._buffers:
            fmt = torch.channels_last if self.cfg.channels_last else torch.contiguous_format
            buf = torch.empty((n, self.channels, self.size, self.size), device=self.device, memory_format=fmt)
            if self.cuda_graphs:
                torch._dynamo.mark_static_address(buf)
            self._buffers[key] = buf.requires_grad_(True)
        x = self._buffers[key]
        seeds = seed if isinstance(seed, (list, tuple)) else [seed]
        with torch.no_grad():
            x.copy_(torch.cat([self.initial_images(n // len(seeds), s) for s in seeds]))
        x.grad = None
        return x

    def _crop_params(self, n: int, generators: list[torch.Generator]) -> CropParams:
        cfg = self.cfg
        per = n // len(generators)
        ps = [draw_crop_params(per, self.size, self.size, g, per_image=self.per_image,
                               scale=(cfg.min_scale, cfg.max_scale), jitter=cfg.jitter,
                               jitter_range=cfg.jitter_range) for g in generators]
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
        p = self._crop_params(x.shape[0], gens)
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

    def run_batch(self, classes: list[int], ipc_index: int, batch_index: int, on_iteration=None) -> BatchResult:
        return self.run_group([(classes, ipc_index, batch_index)], on_iteration)[0]

    def run_group(self, jobs: list[tuple[list[int], int, int]], on_iteration=None) -> list[BatchResult]:
        """Recover several batches (classes, ipc index, batch index) of equal size in one
        stacked tensor. Adam and the clamp act per element and the BN term is computed
        per batch, so each batch follows its own objective; only the float rounding of
        the stacked convolutions may differ from running it alone. A group that meets
        a non-finite loss is re-run batch by batch, so only the diverging batch fails."""
        cfg = self.cfg
        g, per = len(jobs), len(jobs[0][0])
        seeds = [job_seed(cfg.seed, i, b) for _, i, b in jobs]
        x = self.batch_images(g * per, seeds)
        targets = torch.tensor([c for classes, _, _ in jobs for c in classes], device=self.device)
        gens = [torch.Generator(device=self.device).manual_seed(s + 1) for s in seeds]
        opt = self.optimizer(x)
        self.group_size = per if g > 1 else 0
        self.stats.set_groups(g)
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
                        if g > 1:
                            return [self.run_group([job], on_iteration)[0] for job in jobs]
                        return [BatchResult(jobs[0][1], jobs[0][2], jobs[0][0], ce.item(), bn.item(), loss_v,
                                            time.perf_counter() - start, "nonfinite", checked_at, last_good)]
                    last_good, checked_at = x.detach().clone(), it + 1
                    if on_iteration is not None:
                        on_iteration(it, loss_v)
        finally:
            self.group_size = 0
            self.stats.set_groups(1)
        seconds = time.perf_counter() - start
        # With several batches the final losses are those of the whole group, divided
        # evenly (the BN term is not split per batch by the kernels).
        return [BatchResult(i, b, classes, ce.item() / g, bn.item() / g, loss_v / g, seconds / g, "ok",
                            cfg.iterations, last_good[k * per:(k + 1) * per])
                for k, (classes, i, b) in enumerate(jobs)]


def _semantic(cfg_dict: dict) -> dict:
    return {k: v for k, v in cfg_dict.items() if k not in _RUN_ONLY_FIELDS}


def prepare_output(cfg: RecoverConfig, record: dict) -> None:
    """Create or re-open the output tree; refuse one that holds another run."""
    config_path = os.path.join(cfg.out, "recover_config.json")
    if os.path.exists(cfg.out) and not os.path.isdir(cfg.out):
        raise UserError(f"output path {cfg.out} exists and is not a directory.")
    if os.path.isdir(cfg.out) and os.listdir(cfg.out):
        if cfg.overwrite:
            if not os.path.exists(config_path):
                raise UserError(f"output directory {cfg.out} holds files that are not a recovery run; "
                                "refusing to delete them even with --overwrite.")
            shutil.rmtree(cfg.out)
        elif not os.path.exists(config_path):
            raise UserError(f"output directory {cfg.out} is not empty and holds no recovery run; choose another --out.")
        else:
            old = read_json(config_path)
            if _semantic(old["config"]) != _semantic(record["config"]):
                diff = sorted(k for k in _semantic(record["config"]) if old["config"].get(k) != record["config"].get(k))
                raise UserError(f"output directory {cfg.out} holds a recovery run with a different config "
                                f"({', '.join(diff)}); use another --out or --overwrite.")
            return
    os.makedirs(cfg.out, exist_ok=True)
    write_json(config_path, record)


def _rank_world() -> tuple[int, int]:
    """This process's rank and the world size, from the torchrun environment (RANK, WORLD_SIZE).
    Recovery needs no process group: ranks share nothing but the output tree."""
    return _dist.rank(), _dist.world_size()


def run_recover(cfg: RecoverConfig) -> dict:
    cfg, recipe_record = resolve_recipe(cfg, "recover")
    validate(cfg)
    loaded = load_model(cfg.weights, cfg.arch, num_classes=cfg.num_classes, image_size=cfg.image_size,
                        normalization=cfg.normalization)
    require_batchnorm(loaded.model, loaded.spec.arch)
    spec = loaded.spec
    cfg = cfg.resolved(spec.image_size)
    from srel_fast.kernels import BACKENDS

    if cfg.backend is not None and cfg.backend not in BACKENDS:
        raise UserError(f"--backend must be one of {', '.join(BACKENDS)}, got {cfg.backend!r}.")
    device = resolve_device(cfg.device)
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
    if world > 1 and cfg.overwrite:
        raise UserError("--overwrite cannot be combined with several processes; clear the output directory first.")
    # Every rank checks (or writes) the config before writing anything, so whichever
    # rank comes first creates the tree and the others find an identical config.
    prepare_output(cfg, record)
    recoverer = Recoverer(loaded.model, norm, spec.image_size, spec.in_channels, cfg, device)
    with recoverer:
        return _run_jobs(cfg, record, recoverer, norm, spec, rank, world)


def _run_jobs(cfg: RecoverConfig, record: dict, recoverer: Recoverer, norm: Normalization, spec, rank: int,
              world: int) -> dict:
    batches = class_batches(spec.num_classes, cfg.batch_size, cfg.class_layout)
    jobs = [(i, b) for i in range(cfg.ipc_start, cfg.ipc_end) for b in range(len(batches))]
    # Launches: up to group_batches consecutive jobs of equal size stacked together. The
    # grouping depends only on the config and the ipc range, so a resumed or sharded run
    # stacks (and rounds) every batch exactly as an uninterrupted one.
    launches: list[list[tuple[int, int]]] = []
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
    n_jobs, n_todo = sum(map(len, launches)), sum(map(len, todo))
    bar = _progress_bar(cfg, len(todo) * cfg.iterations, f"recover ({n_jobs - n_todo} of {n_jobs} batches done)")
    progress = RunProgress(bar, n_jobs, n_jobs - n_todo, sum(len(batches[b]) for i, b in jobs if complete(i, b)),
                           len(todo) * cfg.iterations)   # issue 19: batches and images as they finish, time left
    failed = []
    for launch in todo:
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
                    if bar is not None:
                        bar.close()
                    raise NonFiniteLoss(msg + "; lower --lr or --r-bn.")
                print("warning: " + msg + "; going on with the other batches.", file=sys.stderr)
                continue
            _save_batch(cfg, norm, result, None)
            append_jsonl(progress_path, entry)
            progress.batch_written(len(result.classes))
    if bar is not None:
        bar.close()
    return write_manifest(cfg, record, failed)


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
    manifest = {
        **record,
        "batches": sorted(latest.values(), key=lambda e: (e["ipc_index"], e["batch_index"])),
        "completed_batches": len(ok),
        "failed_batches": [e for e in latest.values() if e["status"] != "ok"],
        "seconds_total": sum(e["seconds"] for e in ok),
        "ms_per_image_iteration": (1000 * sum(e["seconds"] for e in ok)
                                   / max(1, sum(len(e["classes"]) * e["iterations_done"] for e in ok))),
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
