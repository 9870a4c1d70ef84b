"""Stage 1, Squeeze: train a BatchNorm classifier on the real data.

Paper recipe for small resolutions (Tiny-ImageNet, ``--recipe sre2l-tiny``):
SGD lr 0.2, momentum 0.9, weight decay 1e-4, batch 256, 5 epochs of linear
warm-up then cosine, stepped per epoch, RandomResizedCrop + flip, Tiny-ImageNet
mean/std, validation on the raw 64 px images; a short budget (50 epochs)
recovers better than a long one. The checkpoint carries the
model spec, class names, normalisation and test accuracy, so recover needs
nothing else. Every epoch is checkpointed (model, optimiser, scheduler, RNG)
and an interrupted run resumes from the last one.

Under torchrun the model is wrapped in DistributedDataParallel with BatchNorm
statistics over the global batch; --batch-size stays the global batch. With
built-in (in-memory) data every rank draws the same epoch order and the same
crop parameters for the whole global batch from the shared generator and
keeps its slice, so W processes train what one process trains (up to float
rounding). ImageFolder loaders are sharded (shard_id = rank). Only rank 0
prints and writes the checkpoint, its JSON and the resume file.
"""
from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from . import distributed as _dist
from .augment import CropParams, apply_crops, draw_crop_params
from .class_stats import class_stats_to_state, collect_class_statistics
from .data import Normalization, check_data_path, dataset_normalization, is_builtin, load_builtin
from .errors import NonFiniteLoss, UserError
from .files import check_output, environment, result_config, write_json
from .models import MEAN_STD, ModelSpec, build_model, require_batchnorm, save_checkpoint
from .recipes import SREL_DEFAULT_SQUEEZE, SREL_SMALL_DATA_SQUEEZE, resolve_recipe
from .inspect_data import check_memory, choose_for_folder, default_arch, fit_batch_size, peak_rss_bytes, say, split_dirs
from .evaluation import evaluate, evaluate_loader
from .optimizers import LR_STEPS, make_optimizer, make_schedule
from .resume import discard_resume_state, load_resume_state, save_resume_state
from .seeds import seed_everything

NORMALIZATIONS = ("auto", "dataset", *MEAN_STD)   # auto: the data set's own; imagenet for ImageNet-sized folders
VAL_RESIZES = ("resize-crop", "none")
AUGMENTS = ("rrc", "shift")
SMALL_DATA_MIN_STEPS = 2000


@dataclass
class SqueezeConfig:
    data: str
    out: str
    arch: str | None = None           # None: by image size (srel_fast.inspect_data.default_arch)
    recipe: str | None = None         # named defaults for the fields below left at None (default: srel)
    # Recipe fields (None: the recipe's value).
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    momentum: float | None = None
    weight_decay: float | None = None
    optimizer: str | None = None
    min_scale: float | None = None    # RandomResizedCrop scale range
    augment: str | None = None        # built-in data: rrc (RandomResizedCrop + flip) | shift (pad, random crop, flip)
    lr_step: str | None = None        # iteration | epoch: when the schedule advances
    warmup_epochs: int | None = None  # linear warm-up before the cosine
    warmup_start_factor: float | None = None
    normalization: str | None = None  # auto | dataset | imagenet | tiny-imagenet
    image_size: int | None = None     # ImageFolder only; None under srel: inferred from the images
    val_resize: str | None = None     # ImageFolder validation: resize-crop (shorter side size/0.875, centre crop) | none
                                      # (None under srel: by image size, srel_fast.inspect_data)
    width: int = 128                  # ConvNet width
    seed: int = 0
    device: str = "auto"
    loader: str = "auto"              # ImageFolder: auto | dali | torch
    num_workers: int = 2
    overwrite: bool = False
    progress: bool = True

    RECIPE_FIELDS: ClassVar[tuple[str, ...]] = (
        "epochs", "batch_size", "lr", "momentum", "weight_decay", "optimizer", "min_scale", "lr_step",
        "warmup_epochs", "warmup_start_factor", "normalization", "image_size", "val_resize", "augment")
    # Fields that do not decide whether an interrupted run may resume (the recipe's name is
    # provenance: the resolved values are compared).
    RUN_ONLY_FIELDS: ClassVar[tuple[str, ...]] = ("overwrite", "progress", "device", "num_workers", "recipe")


def validate(cfg: SqueezeConfig) -> None:
    check_data_path(cfg.data)
    if cfg.epochs is not None and cfg.epochs <= 0:
        raise UserError(f"--epochs must be positive, got {cfg.epochs}.")
    if cfg.batch_size <= 0:
        raise UserError(f"--batch-size must be positive, got {cfg.batch_size}.")
    if not cfg.out.endswith(".pt"):
        raise UserError(f"--out must name a .pt checkpoint file, got {cfg.out}.")
    check_output(cfg.out, cfg.overwrite)
    if cfg.lr_step not in LR_STEPS:
        raise UserError(f"--lr-step must be {' or '.join(LR_STEPS)}, got {cfg.lr_step!r}.")
    if cfg.warmup_epochs < 0:
        raise UserError(f"--warmup-epochs must be >= 0, got {cfg.warmup_epochs}.")
    if cfg.normalization not in NORMALIZATIONS:
        raise UserError(f"--normalization must be one of {', '.join(NORMALIZATIONS)}, got {cfg.normalization!r}.")
    if cfg.val_resize is not None and cfg.val_resize not in VAL_RESIZES:
        raise UserError(f"--val-resize must be {' or '.join(VAL_RESIZES)}, got {cfg.val_resize!r}.")
    if cfg.augment not in AUGMENTS:
        raise UserError(f"--augment must be {' or '.join(AUGMENTS)}, got {cfg.augment!r}.")


@_dist.stage
def run_squeeze(cfg: SqueezeConfig) -> dict:
    cfg, recipe_record, rules = _resolved(cfg)
    seed_everything(cfg.seed)
    device = _dist.resolve_device(cfg.device)
    rank, world = _dist.rank(), _dist.world_size()
    if cfg.batch_size % world:
        raise UserError(f"--batch-size {cfg.batch_size} (the global batch) must be divisible by the "
                        f"{world} processes.")
    cfg, data = _load_data(cfg, device, rank, world)
    spec = ModelSpec(cfg.arch, len(data.classes), data.channels, data.size, cfg.width)
    model = build_model(spec).to(device)
    require_batchnorm(model, cfg.arch)
    memory = _check_memory(cfg, spec, device, world)   # issue 19: refuse a run that cannot fit, before the first step
    if data.steps_per_epoch == 0:
        raise UserError(f"the training set is smaller than one batch of {cfg.batch_size}; lower --batch-size.")
    if cfg.epochs is None:
        # small in-memory sets: the rule's epochs, but at least SMALL_DATA_MIN_STEPS optimiser steps
        # (digits' 1,347 images make 5 batches an epoch)
        cfg = dataclasses.replace(cfg, epochs=max(rules["epochs"],
                                                  math.ceil(SMALL_DATA_MIN_STEPS / data.steps_per_epoch)))
    net = _dist.wrap_ddp(model, device)   # DDP + global BatchNorm under torchrun; the model itself otherwise
    t0, history = _train(cfg, net, data, device)
    model = _dist.unwrap(net)
    acc = data.test_accuracy(model, device)
    results = {"test_accuracy": acc, "seconds": time.perf_counter() - t0, "history": history, "world_size": world}
    results["memory"] = dict(memory, peak_rss_bytes=peak_rss_bytes())
    if _dist.is_main():
        _save(cfg, model, spec, data, device, recipe_record, results)
    _dist.barrier()
    return results


def _resolved(cfg: SqueezeConfig) -> tuple[SqueezeConfig, dict, dict]:
    """The recipe's values, then srel's rules for the data (built-in sets or ImageFolders), checked;
    returns the config, the recipe record and the rules (their epochs wait for the data's size)."""
    cfg, recipe_record = resolve_recipe(cfg, "squeeze")
    rules = SREL_SMALL_DATA_SQUEEZE if is_builtin(cfg.data) else SREL_DEFAULT_SQUEEZE
    cfg = dataclasses.replace(cfg, **{k: v for k, v in rules.items() if getattr(cfg, k) is None and k != "epochs"})
    if cfg.epochs is None and not is_builtin(cfg.data):
        cfg = dataclasses.replace(cfg, epochs=rules["epochs"])
    validate(cfg)
    return cfg, recipe_record, rules


@dataclass
class _Data:
    """What squeeze trains and tests on: a built-in data set in memory (train, test) or
    ImageFolder loaders (train_loader, val_loader)."""
    norm: Normalization
    classes: list
    channels: int
    size: int
    steps_per_epoch: int
    inferred: dict | None = None       # the choices made from an ImageFolder's images (issue 19)
    train: object = None
    test: object = None
    train_loader: object = None
    val_loader: object = None

    def batches(self, cfg: SqueezeConfig, gen: torch.Generator, device, epoch: int):
        """The (images, labels) batches of one epoch, this rank's share of each."""
        if self.train_loader is None:
            yield from _builtin_batches(self.train, cfg, self.norm, gen, device, _dist.rank(), _dist.world_size())
        else:
            self.train_loader.set_epoch(epoch)
            yield from self.train_loader

    def test_accuracy(self, model, device) -> float:
        if self.val_loader is not None:
            return evaluate_loader(model, self.val_loader, device)
        return evaluate(model, self.test, self.norm, device)


def _load_data(cfg: SqueezeConfig, device, rank: int, world: int) -> tuple[SqueezeConfig, _Data]:
    """The training and test data, with the choices they decide (arch, batch size; for an
    ImageFolder also image size, normalisation and evaluation transform: issue 19)."""
    if is_builtin(cfg.data):
        train, test = load_builtin(cfg.data, "train", cfg.seed), load_builtin(cfg.data, "test", cfg.seed)
        cfg = _own_data_builtin(cfg, train, world)   # issue 19: arch by size, batch <= data set
        norm = dataset_normalization(train) if cfg.normalization in ("auto", "dataset") else _named(cfg, train.channels)
        return cfg, _Data(norm, train.classes, train.channels, train.image_size, len(train) // cfg.batch_size,
                          train=train, test=test)
    from .loaders import LoaderConfig, build_loader

    # issue 19: size, channels, mean/std, evaluation transform, arch and batch from the images
    cfg, norm, channels, inferred = _own_data_folder(cfg, world)
    common = dict(image_size=cfg.image_size, batch_size=cfg.batch_size // world, mean=norm.mean, std=norm.std,
                  channels=channels, loader=cfg.loader, num_workers=cfg.num_workers, seed=cfg.seed,
                  device=str(device), shard_id=rank, num_shards=world)
    train_dir, val_dir = split_dirs(cfg.data)
    train_loader = build_loader(LoaderConfig(root=train_dir, train=True, **common))
    val_loader = build_loader(LoaderConfig(root=val_dir, train=False, val_resize=cfg.val_resize == "resize-crop",
                                           **common))
    return cfg, _Data(norm, list(train_loader.classes), channels, cfg.image_size, len(train_loader),
                      inferred=inferred, train_loader=train_loader, val_loader=val_loader)


def _train(cfg: SqueezeConfig, net, data: _Data, device) -> tuple[float, list[dict]]:
    """Every epoch left (resuming an interrupted run), each saved to the resume file; returns the
    start time and each epoch's mean training loss."""
    model = _dist.unwrap(net)
    optimizer = make_optimizer(cfg.optimizer, model.parameters(), cfg.lr, cfg.weight_decay, cfg.momentum)
    scheduler = make_schedule(optimizer, cfg.lr_step, cfg.epochs, data.steps_per_epoch, cfg.warmup_epochs,
                              cfg.warmup_start_factor)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    key = _resume_key(dataclasses.asdict(cfg))
    resume_path = cfg.out + ".resume"
    discard_resume_state(resume_path, cfg.overwrite)
    start_epoch = load_resume_state(resume_path, key, model, optimizer, scheduler, gen)
    bar = None
    if cfg.progress and _dist.is_main():
        from tqdm import tqdm

        bar = tqdm(total=cfg.epochs * data.steps_per_epoch, initial=start_epoch * data.steps_per_epoch,
                   desc="squeeze", unit="step", dynamic_ncols=True, file=sys.stderr)
    t0 = time.perf_counter()
    history = []
    for epoch in range(start_epoch, cfg.epochs):
        loss = _one_epoch(cfg, net, optimizer, scheduler, data.batches(cfg, gen, device, epoch), epoch, bar)
        history.append({"epoch": epoch, "train_loss": loss / data.steps_per_epoch})
        if _dist.is_main():
            save_resume_state(resume_path, epoch + 1, model, optimizer, scheduler, gen, {"config": key})
    if bar is not None:
        bar.close()
    return t0, history


def _one_epoch(cfg: SqueezeConfig, net, optimizer, scheduler, batches, epoch: int, bar) -> float:
    """One pass over the training batches; returns the summed loss of its steps."""
    world = _dist.world_size()
    _dist.unwrap(net).train()
    total = 0.0
    for x, y in batches:
        # Each rank's mean over B / W images; DDP averages the gradients: the global batch mean.
        loss = F.cross_entropy(net(x), y)
        loss_v = loss.item() if world == 1 else _dist.all_reduce_sum([loss.item()])[0] / world
        if not math.isfinite(loss_v):
            raise NonFiniteLoss(f"squeeze reached a non-finite loss in epoch {epoch}; lower --lr.")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if cfg.lr_step == "iteration":
            scheduler.step()
        total += loss_v
        if bar is not None:
            bar.update(1)
            bar.set_postfix(epoch=epoch, loss=f"{loss_v:.3f}")
    if cfg.lr_step == "epoch":
        scheduler.step()
    return total


def _save(cfg: SqueezeConfig, model, spec: ModelSpec, data: _Data, device, recipe_record: dict,
          results: dict) -> None:
    """The checkpoint and its JSON (rank 0); the resume file goes."""
    config_dict = dataclasses.asdict(cfg)
    # The per-class BN statistics of the real training images, for class-aware
    # recovery (srel_fast.class_stats); in-memory data sets only (one eval pass).
    class_stats = None
    if data.train is not None:
        class_stats = class_stats_to_state(collect_class_statistics(
            model, data.norm.normalize(data.train.images.to(device)), data.train.labels.to(device),
            len(data.classes)))
    save_checkpoint(cfg.out, model, spec, data.norm.mean, data.norm.std, data.classes,
                    test_accuracy=results["test_accuracy"], dataset=cfg.data, config=config_dict,
                    recipe=recipe_record, class_bn_stats=class_stats, inferred=data.inferred)
    write_json(cfg.out + ".json", {"config": config_dict, "recipe": recipe_record, "model": spec.to_dict(),
                                   "results": results, "environment": environment(), "inferred": data.inferred})
    if os.path.exists(cfg.out + ".resume"):
        os.remove(cfg.out + ".resume")


def _named(cfg: SqueezeConfig, channels: int) -> Normalization:
    mean, std = MEAN_STD["imagenet" if cfg.normalization == "auto" else cfg.normalization]
    if len(mean) != channels:
        raise UserError(f"the {cfg.normalization} normalisation is for {len(mean)}-channel images but {cfg.data} has "
                        f"{channels}; use --normalization dataset.")
    return Normalization(mean, std)


def _resume_key(config: dict) -> dict:
    return result_config(config, SqueezeConfig.RUN_ONLY_FIELDS)


def _builtin_batches(train, cfg: SqueezeConfig, norm: Normalization, gen: torch.Generator, device,
                     rank: int = 0, world: int = 1):
    """Global batches in the epoch order of the shared generator; this rank's slice of each.
    The crop parameters are drawn for the whole global batch (the same draws as one
    process) and sliced, so the crops do not depend on how the batch is split."""
    order = torch.randperm(len(train), generator=gen, device=device).cpu()
    h, w = train.images.shape[-2:]
    lo, hi = _dist.shard_bounds(cfg.batch_size, rank, world)
    for s in range(0, len(order) - cfg.batch_size + 1, cfg.batch_size):
        idx = order[s:s + cfg.batch_size][lo:hi]
        x = norm.normalize(train.images[idx].to(device))
        if cfg.augment == "shift":
            x = shift_crop_flip(x, max(1, h // 14), gen, cfg.batch_size, lo, hi)
        else:
            p = draw_crop_params(cfg.batch_size, h, w, gen, per_image=True, scale=(cfg.min_scale, 1.0))
            x = apply_crops(x, CropParams(p.boxes[lo:hi], p.flip[lo:hi], None), (h, w), "auto")
        yield x, train.labels[idx].to(device)


def shift_crop_flip(x: torch.Tensor, pad: int, gen: torch.Generator, global_batch: int, lo: int = 0,
                    hi: int | None = None) -> torch.Tensor:
    """The small-image augmentation of the classic CIFAR/MNIST recipes: zero-pad (in normalised
    units: the mean) by ``pad`` pixels, crop back to the original size at a random offset, flip
    half the images. Offsets and flips are drawn for the whole global batch and sliced
    (rows lo:hi are this rank's), so the draws do not depend on how the batch is split."""
    n, c, h, w = x.shape
    off = torch.randint(0, 2 * pad + 1, (global_batch, 2), generator=gen, device=gen.device)[lo:hi].to(x.device)
    flip = (torch.rand(global_batch, generator=gen, device=gen.device) < 0.5)[lo:hi].to(x.device)
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    rows = off[:, 0, None] + torch.arange(h, device=x.device)                      # (n, h)
    cols = off[:, 1, None] + torch.arange(w, device=x.device)                      # (n, w)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    b = torch.arange(n, device=x.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[b, rows[:, :, None], cols[:, None, :]]       # (n, h, w, c)
    return out.permute(0, 3, 1, 2).contiguous()


# -- issue 19: the user's own data (the choices live in srel_fast.inspect_data) ---------------------------

def _own_data_builtin(cfg: SqueezeConfig, train, world: int) -> SqueezeConfig:
    arch = cfg.arch
    if arch is None:
        arch, why = default_arch(train.image_size)
        say(f"squeeze: arch {arch} ({why}).")
    return dataclasses.replace(cfg, arch=arch, batch_size=fit_batch_size(cfg.batch_size, len(train), world))


def _own_data_folder(cfg: SqueezeConfig, world: int):
    train_dir, val_dir = split_dirs(cfg.data)
    ch = choose_for_folder(train_dir, val_dir, cfg.image_size, cfg.normalization, cfg.val_resize, cfg.arch,
                           cfg.batch_size, world)
    cfg = dataclasses.replace(cfg, image_size=ch.image_size, val_resize=ch.val_resize, arch=ch.arch,
                              batch_size=ch.batch_size)
    return cfg, ch.norm, ch.channels, ch.record()


def _check_memory(cfg: SqueezeConfig, spec: ModelSpec, device, world: int) -> dict:
    loader_batches = 0 if is_builtin(cfg.data) else 2 * cfg.num_workers + 1
    return check_memory(spec, cfg.batch_size // world, cfg.optimizer, device, "squeeze", loader_batches)
