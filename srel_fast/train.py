"""Stage 3b, Train: a student from scratch on the synthetic set, with soft labels.

The student sees crop k of image i (regenerated from (seed, epoch, batch), see
crop_plan.epoch_plan) and learns the teacher's softened distribution:

    loss = KL( softmax(teacher(crop) / T) || log_softmax(student(crop) / T) )   (batch mean)

The teacher's output comes either from a stored soft-label directory
(``--labels``) or from the teacher itself in the loop (online relabel,
nothing stored). ``label_mode="hard"`` trains with cross-entropy on the
class labels instead (the random-real baseline). Top-1 is then measured on
the real test/validation split. Every epoch is checkpointed and an
interrupted run resumes from the last one.

The paper's settings are recipes (srel_fast.recipes): ImageNet-1K
(train_FKD.py) is AdamW without weight decay on BN and bias parameters,
cosine stepped per epoch, batch 1024 as two accumulated micro-batches of 512
(each its own forward, so BatchNorm sees 512; loss = micro-batch mean / 2)
and CutMix in every batch; Tiny-ImageNet (train_kd.py) is SGD lr 0.2 with
5 warm-up epochs, the KL loss multiplied by T^2 and evaluation on the raw
64 px images.

Under torchrun the student is wrapped in DistributedDataParallel with
BatchNorm statistics over the global batch. Every rank plans the same global
batches (epoch_plan) and takes its contiguous slice of each; the loss is the
rank's share of the global batch mean (sum over its rows x W / B), so the
averaged gradient is the one-process gradient even for an uneven last batch.
CutMix partners on other ranks are cropped locally (crops are regenerated,
not communicated). Only rank 0 prints and writes checkpoints and JSON.
"""
from __future__ import annotations

import contextlib
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
from .augment import check_crop_scale
from .data import Normalization, check_data_path, is_builtin, load_builtin
from .errors import NonFiniteLoss, UserError
from .files import check_output, environment, read_json, result_config, write_json
from .images import load_synthetic
from .models import ModelSpec, build_model, load_model, save_checkpoint
from .recipes import apply_recipe, resolve_recipe, with_student_rules
from .crop_plan import CropPlanConfig, epoch_plan, make_inputs
from .soft_labels import SoftLabelStore
from .evaluation import evaluate, evaluate_loader
from .optimizers import LR_STEPS, make_optimizer, make_schedule, parameter_groups
from .resume import discard_resume_state, load_resume_state, save_resume_state
from .seeds import seed_everything

VAL_RESIZES = ("resize-crop", "none")


@dataclass
class TrainConfig:
    syn: str
    out: str
    val: str
    arch: str | None = None           # None: by image size (srel_fast.inspect_data.default_arch)
    teacher: str | None = None        # online relabel (teacher in the loop)
    labels: str | None = None         # stored soft labels (srel-fast relabel)
    teacher_arch: str | None = None
    recipe: str | None = None         # named defaults for the fields left at None (default: srel)
    label_mode: str = "soft"          # soft | hard
    # Recipe fields (None: the recipe's value).
    epochs: int | None = None
    batch_size: int | None = None     # images per optimiser step
    optimizer: str | None = None      # sgd | adamw | adam
    lr: float | None = None
    weight_decay: float | None = None
    momentum: float | None = None     # SGD only
    temperature: float | None = None
    min_scale: float | None = None
    max_scale: float | None = None
    cutmix: float | None = None       # probability of CutMix per batch (1.0: every batch)
    lr_step: str | None = None        # iteration | epoch: when the cosine schedule advances
    warmup_epochs: int | None = None  # linear warm-up before the cosine
    warmup_start_factor: float | None = None
    decay_bn_bias: bool | None = None  # False: no weight decay on BN parameters and biases (official ImageNet)
    grad_accumulation: int | None = None  # micro-batches per step; BatchNorm sees batch_size / this
    kd_t2: bool | None = None         # multiply the KL loss by T^2 (official Tiny-ImageNet)
    ema: float | None = None          # decay of the EMA of the student's weights that is evaluated (0: off)
    val_resize: str | None = None     # ImageFolder validation: resize-crop (size/0.875, centre crop) | none (raw)
    normalization: str | None = None  # mean/std of a teacher that carries none (plain state dict)
    image_size: int | None = None     # input size of a teacher that carries none
    width: int = 128
    seed: int = 0
    seeds: str | None = None          # "0,1,2": one student per seed under out/seed<k>, mean and std
    device: str = "auto"
    backend: str = "auto"
    loader: str = "auto"
    overwrite: bool = False
    progress: bool = True

    RECIPE_FIELDS: ClassVar[tuple[str, ...]] = (
        "epochs", "batch_size", "optimizer", "lr", "weight_decay", "momentum", "temperature", "min_scale",
        "max_scale", "cutmix", "lr_step", "warmup_epochs", "warmup_start_factor", "decay_bn_bias",
        "grad_accumulation", "kd_t2", "val_resize", "normalization", "image_size", "ema")
    ALGORITHM_FLAGS: ClassVar[tuple[str, ...]] = ("label_mode",)
    # Fields that do not decide whether an interrupted run may resume (the recipe's name is
    # provenance: the resolved values are compared).
    RUN_ONLY_FIELDS: ClassVar[tuple[str, ...]] = ("overwrite", "progress", "device", "loader", "out", "recipe")

    def plan(self, images_shape) -> CropPlanConfig:
        """The crops of every epoch for synthetic images of ``images_shape`` (N, C, H, W)."""
        return CropPlanConfig.of(with_student_rules(resolve_recipe(self, "train")[0], images_shape))


def validate(cfg: TrainConfig) -> None:
    """Checks of a resolved config."""
    if cfg.epochs is not None and cfg.epochs <= 0:   # None: srel's rule, set once the images are known
        raise UserError(f"--epochs must be positive, got {cfg.epochs}.")
    if cfg.batch_size <= 0:
        raise UserError(f"--batch-size must be positive, got {cfg.batch_size}.")
    if cfg.label_mode not in ("soft", "hard"):
        raise UserError(f"--label-mode must be 'soft' or 'hard', got {cfg.label_mode!r}.")
    if cfg.grad_accumulation <= 0 or cfg.batch_size % cfg.grad_accumulation:
        raise UserError(f"--grad-accumulation must be a positive divisor of --batch-size {cfg.batch_size}, "
                        f"got {cfg.grad_accumulation}.")
    if cfg.lr_step not in LR_STEPS:
        raise UserError(f"--lr-step must be {' or '.join(LR_STEPS)}, got {cfg.lr_step!r}.")
    if cfg.warmup_epochs < 0:
        raise UserError(f"--warmup-epochs must be >= 0, got {cfg.warmup_epochs}.")
    if cfg.val_resize is not None and cfg.val_resize not in VAL_RESIZES:
        raise UserError(f"--val-resize must be {' or '.join(VAL_RESIZES)}, got {cfg.val_resize!r}.")
    if not (0 <= cfg.ema < 1):
        raise UserError(f"--ema must be in [0, 1), got {cfg.ema}.")
    if cfg.min_scale is not None:   # None: srel's rule, set once the images are known
        check_crop_scale(cfg.min_scale, cfg.max_scale)


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"--seeds must be comma-separated integers, got {text!r}.") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds must name distinct seeds, got {text!r}.")
    return seeds


class WeightEMA:
    """Exponential moving average of a model's weights, for evaluation:
    ema = decay * ema + (1 - decay) * w after every optimiser step; BN buffers are copied."""

    def __init__(self, model: torch.nn.Module, decay: float):
        import copy

        self.decay = decay
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for e, p in zip(self.model.parameters(), model.parameters()):
            e.lerp_(p.detach(), 1 - self.decay)
        for e, b in zip(self.model.buffers(), model.buffers()):
            e.copy_(b)


def make_student_optimizer(model: torch.nn.Module, cfg: TrainConfig):
    """The student's optimiser; with ``decay_bn_bias`` off, BN parameters and biases get no weight decay."""
    cfg = apply_recipe(cfg, "train")
    groups = parameter_groups(model, cfg.weight_decay, cfg.decay_bn_bias)
    return make_optimizer(cfg.optimizer, groups, cfg.lr, cfg.weight_decay, cfg.momentum)


def train_student(images: torch.Tensor, labels: torch.Tensor, num_classes: int, spec: ModelSpec,
                  cfg: TrainConfig, evaluate_fn, teacher: torch.nn.Module | None = None,
                  store: SoftLabelStore | None = None, resume_path: str | None = None) -> dict:
    """The training loop: ``images`` are normalised (N, C, H, W) on the device."""
    cfg = with_student_rules(apply_recipe(cfg, "train"), images.shape)
    validate(cfg)
    device = images.device
    seed_everything(cfg.seed)
    rank, world = _dist.rank(), _dist.world_size()
    net = _dist.wrap_ddp(build_model(spec).to(device), device)   # DDP under torchrun, else the model
    model = _dist.unwrap(net)
    if teacher is not None:
        teacher = teacher.to(device).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    steps_per_epoch = -(-images.shape[0] // cfg.batch_size)
    optimizer = make_student_optimizer(model, cfg)
    scheduler = make_schedule(optimizer, cfg.lr_step, cfg.epochs, steps_per_epoch, cfg.warmup_epochs,
                              cfg.warmup_start_factor)
    gen = torch.Generator().manual_seed(cfg.seed)
    key = _resume_key(cfg)
    start_epoch = load_resume_state(resume_path, key, model, optimizer, scheduler, gen) if resume_path else 0
    bar = None
    if cfg.progress and _dist.is_main():
        from tqdm import tqdm

        bar = tqdm(total=cfg.epochs, initial=start_epoch, desc="train", unit="epoch", dynamic_ncols=True, file=sys.stderr)
    t0 = time.perf_counter()
    step = StudentStep(net, optimizer, images, labels, cfg, (spec.image_size, spec.image_size), teacher, store,
                       rank, world)
    # The EMA restarts with a resumed run (it is not part of the resume state).
    ema = WeightEMA(model, cfg.ema) if cfg.ema > 0 else None
    for epoch in range(start_epoch, cfg.epochs):
        epoch_loss = _one_epoch(step, epoch, scheduler, ema)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{epoch_loss / steps_per_epoch:.4f}")
        if resume_path and _dist.is_main():
            save_resume_state(resume_path, epoch + 1, model, optimizer, scheduler, gen, {"config": key})
    if bar is not None:
        bar.close()
    if ema is not None:
        model = ema.model
    acc = evaluate_fn(model)
    return {"test_accuracy": acc, "seconds": time.perf_counter() - t0, "epochs": cfg.epochs,
            "min_scale": cfg.min_scale, "model": model}


def _one_epoch(step: "StudentStep", epoch: int, scheduler, ema: WeightEMA | None) -> float:
    """One pass over the epoch's planned batches (crop_plan.epoch_plan); returns the summed loss."""
    cfg, images, model = step.cfg, step.images, _dist.unwrap(step.net)
    model.train()
    row = 0
    epoch_loss = 0.0
    for pb in epoch_plan(cfg.plan(images.shape), epoch, images.shape[0], images.shape[2], images.shape[3]):
        epoch_loss += step(pb, row, epoch)
        if ema is not None:
            ema.update(model)
        row += len(pb.indices)
        if cfg.lr_step == "iteration":
            scheduler.step()
    if cfg.lr_step == "epoch":
        scheduler.step()
    return epoch_loss


class StudentStep:
    """One optimiser step on a planned batch.

    The batch is cut into micro-batches of ``batch_size // grad_accumulation`` rows (the
    last batch of an epoch may have fewer, or fewer micro-batches), each with its own
    forward, so BatchNorm normalises over a micro-batch; each micro-batch's loss is its
    mean divided by ``grad_accumulation`` and the gradients add up before one optimiser
    step (train_FKD.py's formula: for a full batch, the mean over the batch). CutMix and
    the crops are those of the whole planned batch. Under torchrun every micro-batch is
    split over the ranks (SyncBN keeps its statistics over the whole micro-batch)."""

    def __init__(self, net, optimizer, images, labels, cfg: TrainConfig, size, teacher, store, rank: int, world: int):
        self.net, self.optimizer, self.images, self.labels = net, optimizer, images, labels
        self.cfg, self.size, self.teacher, self.store = cfg, size, teacher, store
        self.rank, self.world = rank, world
        self.micro = cfg.batch_size // cfg.grad_accumulation

    def __call__(self, pb, row: int, epoch: int) -> float:
        cfg, world = self.cfg, self.world
        b = len(pb.indices)
        spans = [(s, min(s + self.micro, b)) for s in range(0, b, self.micro)]
        self.optimizer.zero_grad(set_to_none=True)
        x_all = make_inputs(self.images, pb, self.size, cfg.backend) if world == 1 else None
        total = 0.0
        for k, (s, e) in enumerate(spans):
            last = k == len(spans) - 1
            # DDP averages gradients at the last micro-batch's backward only.
            sync = contextlib.nullcontext() if last or not hasattr(self.net, "no_sync") else self.net.no_sync()
            with sync:
                if world == 1 and (s, e) == (0, b):
                    # The whole batch at once: the mean over the batch.
                    loss = self._loss(x_all, pb, None, row, epoch)
                elif world == 1:
                    loss = self._loss(x_all[s:e], pb, slice(s, e), row, epoch) / (e - s)
                else:
                    lo, hi = _dist.shard_bounds(e - s, self.rank, world)
                    rows = slice(s + lo, s + hi)
                    x = make_inputs(self.images, pb, self.size, cfg.backend, rows=rows)
                    # the sum over this rank's rows -> its share of the micro-batch mean
                    loss = self._loss(x, pb, rows, row, epoch) * (world / (e - s))
                if cfg.grad_accumulation != 1:
                    loss = loss / cfg.grad_accumulation
                loss_v = loss.item() if world == 1 else _dist.all_reduce_sum([loss.item()])[0] / world
                if not math.isfinite(loss_v):
                    raise NonFiniteLoss(f"student training reached a non-finite loss in epoch {epoch}; lower --lr.")
                loss.backward()
            total += loss_v
        self.optimizer.step()
        return total

    def _loss(self, x, pb, rows, row, epoch):
        out = self.net(x)
        return _student_loss(out, x, pb, rows, row, self.labels, self.cfg, epoch, self.teacher, self.store, x.device)


def _student_loss(out, x, pb, rows, row, labels, cfg: TrainConfig, epoch, teacher, store, device):
    """The loss of a batch (``rows`` None: whole batch, mean) or of some rows of it (sum)."""
    reduction = "mean" if rows is None else "sum"
    sel = slice(None) if rows is None else rows
    if cfg.label_mode == "hard":
        y = labels[pb.indices[sel].to(device)]
        if pb.mix_perm is not None:
            y_mix = labels[pb.indices[pb.mix_perm[sel]].to(device)]
            return (pb.mix_lam * F.cross_entropy(out, y, reduction=reduction)
                    + (1 - pb.mix_lam) * F.cross_entropy(out, y_mix, reduction=reduction))
        return F.cross_entropy(out, y, reduction=reduction)
    if store is not None:
        lo, hi = (0, x.shape[0]) if rows is None else (rows.start, rows.stop)
        target = store.soft_targets(epoch, slice(row + lo, row + hi), cfg.temperature, device)
    else:
        with torch.no_grad():
            target = F.softmax(teacher(x).float() / cfg.temperature, dim=1)
    loss = F.kl_div(F.log_softmax(out.float() / cfg.temperature, dim=1), target,
                    reduction="batchmean" if rows is None else "sum")
    if cfg.kd_t2:
        # train_kd.py (Tiny-ImageNet) keeps the gradient scale of the hard-label loss this way.
        loss = loss * (cfg.temperature ** 2)
    return loss


def _resume_key(cfg: TrainConfig) -> dict:
    return result_config(dataclasses.asdict(cfg), TrainConfig.RUN_ONLY_FIELDS)


def make_evaluator(val: str, norm: Normalization, image_size: int, device, loader: str = "auto", seed: int = 0,
                   val_resize: str | None = "resize-crop"):
    """Top-1 on real data: a built-in test split, or an ImageFolder (val/) tree read with
    resize + centre crop (``resize-crop``) or as the raw images (``none``); None: by the
    images' size (srel_fast.inspect_data). Grey or colour as the normalisation."""
    check_data_path(val)
    if is_builtin(val):
        test = load_builtin(val, "test", seed)
        return lambda model: evaluate(model, test, norm, device, image_size=image_size)
    from .loaders import LoaderConfig, build_loader

    val_dir = os.path.join(val, "val") if os.path.isdir(os.path.join(val, "val")) else val
    if val_resize is None:   # issue 19
        from .inspect_data import val_resize_for

        val_resize = val_resize_for(val_dir, image_size)
    vl = build_loader(LoaderConfig(root=val_dir, train=False, image_size=image_size, batch_size=250,
                                   mean=norm.mean, std=norm.std, channels=len(norm.mean), loader=loader,
                                   device=str(device),
                                   shard_id=_dist.rank(), num_shards=_dist.world_size(),
                                   val_resize=val_resize == "resize-crop"))
    return lambda model: evaluate_loader(model, vl, device)


@_dist.stage
def run_train(cfg: TrainConfig) -> dict:
    if cfg.seeds is not None:
        return _run_seeds(cfg)
    cfg, recipe_record = resolve_recipe(cfg, "train")
    validate(cfg)
    if cfg.label_mode == "soft" and cfg.teacher is None and cfg.labels is None:
        raise UserError("soft-label training needs --teacher (online relabel) or --labels (a relabel directory).")
    device = _dist.resolve_device(cfg.device)
    teacher = (load_model(cfg.teacher, cfg.teacher_arch, image_size=cfg.image_size, normalization=cfg.normalization)
               if cfg.teacher else None)
    images, labels, norm = load_synthetic(cfg.syn, teacher, device)
    cfg = with_student_rules(cfg, images.shape, recipe_record)
    validate(cfg)   # again: the rules' crops against an explicit --max-scale
    rec_path = os.path.join(cfg.syn, "recover_config.json")
    base = ModelSpec(**read_json(rec_path)["model"]) if os.path.exists(rec_path) else teacher.spec
    cfg = _own_data_arch(cfg, base.image_size)   # issue 19: arch by image size when not given
    spec = ModelSpec(cfg.arch, base.num_classes, base.in_channels, base.image_size, cfg.width)
    store = None
    if cfg.labels is not None and cfg.label_mode == "soft":
        store = SoftLabelStore(cfg.labels)
        meta = store.meta
        if (meta["num_images"], meta["batch_size"], meta["seed"]) != (images.shape[0], cfg.batch_size, cfg.seed):
            raise UserError(f"soft labels in {cfg.labels} were made for {meta['num_images']} images, batch "
                            f"{meta['batch_size']}, seed {meta['seed']}; train with the same --batch-size and --seed.")
        stored = (meta["min_scale"], meta["max_scale"], meta["cutmix"])
        if stored != (cfg.min_scale, cfg.max_scale, cfg.cutmix):
            raise UserError(f"soft labels in {cfg.labels} were made with crops of scale {stored[0]}-{stored[1]} and "
                            f"CutMix {stored[2]}, this student has {cfg.min_scale}-{cfg.max_scale} and {cfg.cutmix}; "
                            f"train with --min-scale {stored[0]} --max-scale {stored[1]} --cutmix {stored[2]}.")
        teacher_model = None
    else:
        teacher_model = teacher.model if teacher is not None else None
    final = os.path.join(cfg.out, "student.pt")
    check_output(final, cfg.overwrite)
    evaluate_fn = make_evaluator(cfg.val, norm, spec.image_size, device, cfg.loader, cfg.seed, cfg.val_resize)
    os.makedirs(cfg.out, exist_ok=True)
    discard_resume_state(os.path.join(cfg.out, "train.resume"), cfg.overwrite)
    _own_data_memory(cfg, spec, device)   # issue 19: refuse a run that cannot fit, before the first step
    res = train_student(images, labels, spec.num_classes, spec, cfg, evaluate_fn, teacher_model, store,
                        resume_path=os.path.join(cfg.out, "train.resume"))
    model = res.pop("model")
    out = {"config": dataclasses.asdict(cfg), "recipe": recipe_record, "model": spec.to_dict(), "results": res,
           "environment": environment(),
           "num_images": int(images.shape[0]), "world_size": _dist.world_size()}
    if _dist.is_main():
        save_checkpoint(final, model, spec, norm.mean, norm.std, [str(i) for i in range(spec.num_classes)],
                        test_accuracy=res["test_accuracy"], config=dataclasses.asdict(cfg))
        write_json(os.path.join(cfg.out, "train_results.json"), out)
        resume = os.path.join(cfg.out, "train.resume")
        if os.path.exists(resume):
            os.remove(resume)
    _dist.barrier()
    return res


def _run_seeds(cfg: TrainConfig) -> dict:
    """One student per seed under out/seed<k>; train_results.json in out holds each
    seed's accuracy, their mean and standard deviation (sample std, n - 1)."""
    import statistics

    seeds = parse_seeds(cfg.seeds)
    runs = {}
    for s in seeds:
        res = run_train(dataclasses.replace(cfg, seed=s, seeds=None, out=os.path.join(cfg.out, f"seed{s}")))
        runs[s] = res["test_accuracy"]
    # the rules' epochs and crops, where they set them
    resolved = dataclasses.replace(apply_recipe(cfg, "train"), epochs=res["epochs"], min_scale=res["min_scale"])
    accs = list(runs.values())
    summary = {"seeds": seeds, "test_accuracy": {str(s): a for s, a in runs.items()},
               "test_accuracy_mean": statistics.mean(accs),
               "test_accuracy_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
               "config": dataclasses.asdict(resolved), "environment": environment()}
    if _dist.is_main():
        write_json(os.path.join(cfg.out, "train_results.json"), summary)
    return summary


def _own_data_arch(cfg: TrainConfig, image_size: int) -> TrainConfig:
    if cfg.arch is not None:
        return cfg
    from .inspect_data import default_arch, say

    arch, why = default_arch(image_size)
    say(f"train: student arch {arch} ({why}).")
    return dataclasses.replace(cfg, arch=arch)


def _own_data_memory(cfg: TrainConfig, spec: ModelSpec, device) -> None:
    from .inspect_data import check_memory

    check_memory(spec, max(1, cfg.batch_size // cfg.grad_accumulation // _dist.world_size()), cfg.optimizer, device,
                 "train")
