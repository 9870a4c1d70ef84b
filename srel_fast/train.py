"""Stage 3b, Train: a student from scratch on the synthetic set, with soft labels.

The student sees crop k of image i (regenerated from (seed, epoch, batch), see
relabel.epoch_plan) and learns the teacher's softened distribution:

    loss = KL( softmax(teacher(crop) / T) || log_softmax(student(crop) / T) )   (batch mean)

The teacher's output comes either from a stored soft-label directory
(``--labels``) or from the teacher itself in the loop (online relabel,
nothing stored). ``label_mode="hard"`` trains with cross-entropy on the
class labels instead (the random-real baseline). Top-1 is then measured on
the real test/validation split. Every epoch is checkpointed and an
interrupted run resumes from the last one.

Under torchrun the student is wrapped in DistributedDataParallel with
BatchNorm statistics over the global batch. Every rank plans the same global
batches (epoch_plan) and takes its contiguous slice of each; the loss is the
rank's share of the global batch mean (sum over its rows x W / B), so the
averaged gradient is the one-process gradient even for an uneven last batch.
CutMix partners on other ranks are cropped locally (crops are regenerated,
not communicated). Only rank 0 prints and writes checkpoints and JSON.
"""
from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import distributed as _dist
from .data import Normalization, check_data_path, is_builtin, load_builtin
from .errors import NonFiniteLoss, UserError
from .files import environment, read_json, write_json
from .images import load_tree
from .models import LoadedModel, ModelSpec, build_model, load_model, save_checkpoint
from .relabel import CropPlanConfig, SoftLabelStore, epoch_plan, make_inputs
from .training import (cosine_schedule, evaluate, evaluate_loader, load_resume_state, make_optimizer,
                       save_resume_state, seed_everything)


@dataclass
class TrainConfig:
    syn: str
    out: str
    val: str
    arch: str
    teacher: str | None = None        # online relabel (teacher in the loop)
    labels: str | None = None         # stored soft labels (srel-fast relabel)
    teacher_arch: str | None = None
    label_mode: str = "soft"          # soft | hard
    epochs: int = 300
    batch_size: int = 100
    optimizer: str = "adamw"          # paper: adamw (ImageNet), sgd lr 0.2 (small sets)
    lr: float = 1e-3
    weight_decay: float = 0.01
    momentum: float = 0.9
    temperature: float = 20.0
    min_scale: float = 0.08
    max_scale: float = 1.0
    cutmix: float = 0.0
    width: int = 128
    seed: int = 0
    device: str = "auto"
    backend: str = "auto"
    loader: str = "auto"
    overwrite: bool = False
    progress: bool = True

    def plan(self) -> CropPlanConfig:
        return CropPlanConfig(self.seed, self.batch_size, self.min_scale, self.max_scale, self.cutmix)


def load_synthetic(root: str, teacher: LoadedModel | None, device) -> tuple[torch.Tensor, torch.Tensor, Normalization]:
    """Synthetic tree -> normalised float images on ``device``, labels, normalisation.
    The normalisation is the recovery run's (manifest) or the teacher's."""
    config_path = os.path.join(root, "recover_config.json")
    if os.path.exists(config_path):
        rec = read_json(config_path)
        norm = Normalization(tuple(rec["mean"]), tuple(rec["std"]))
        n_cls = len(rec["classes"])
    elif teacher is not None:
        norm, n_cls = Normalization(teacher.mean, teacher.std), teacher.spec.num_classes
    else:
        raise UserError(f"{root} has no recover_config.json; pass --teacher so its normalisation can be used.")
    images, labels, classes = load_tree(root)
    folder_ids = [int(c) if c.isdigit() else None for c in classes]
    if None not in folder_ids:  # srel-fast trees name folders by class index
        labels = torch.tensor(folder_ids)[labels]
    if teacher is not None and teacher.spec.num_classes != n_cls:
        raise UserError(f"the teacher has {teacher.spec.num_classes} classes but the synthetic set {root} has {n_cls}.")
    if int(labels.max()) >= n_cls:
        raise UserError(f"the synthetic set {root} has class folders beyond its {n_cls} classes.")
    return norm.normalize(images.to(device)), labels.to(device), norm


def train_student(images: torch.Tensor, labels: torch.Tensor, num_classes: int, spec: ModelSpec,
                  cfg: TrainConfig, evaluate_fn, teacher: torch.nn.Module | None = None,
                  store: SoftLabelStore | None = None, resume_path: str | None = None) -> dict:
    """The training loop: ``images`` are normalised (N, C, H, W) on the device."""
    device = images.device
    seed_everything(cfg.seed)
    rank, world = _dist.rank(), _dist.world_size()
    net = _dist.wrap_ddp(build_model(spec).to(device), device)   # DDP under torchrun, else the model
    model = _dist.unwrap(net)
    if teacher is not None:
        teacher = teacher.to(device).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    n = images.shape[0]
    steps_per_epoch = -(-n // cfg.batch_size)
    optimizer = make_optimizer(cfg.optimizer, model.parameters(), cfg.lr, cfg.weight_decay, cfg.momentum)
    scheduler = cosine_schedule(optimizer, cfg.epochs * steps_per_epoch)
    gen = torch.Generator().manual_seed(cfg.seed)
    key = _resume_key(cfg)
    start_epoch = load_resume_state(resume_path, key, model, optimizer, scheduler, gen) if resume_path else 0
    size = (spec.image_size, spec.image_size)
    bar = None
    if cfg.progress and _dist.is_main():
        from tqdm import tqdm

        bar = tqdm(total=cfg.epochs, initial=start_epoch, desc="train", unit="epoch", dynamic_ncols=True, file=sys.stderr)
    t0 = time.perf_counter()
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        row = 0
        epoch_loss = 0.0
        for pb in epoch_plan(cfg.plan(), epoch, n, images.shape[2], images.shape[3]):
            if world == 1:
                x = make_inputs(images, pb, size, cfg.backend)
                out = model(x)
                loss = _student_loss(out, x, pb, None, row, labels, cfg, epoch, teacher, store, device)
                loss_v = loss.item()
            else:
                b = len(pb.indices)
                lo, hi = _dist.shard_bounds(b, rank, world)
                x = make_inputs(images, pb, size, cfg.backend, rows=slice(lo, hi))
                out = net(x)
                loss = _student_loss(out, x, pb, slice(lo, hi), row, labels, cfg, epoch, teacher, store, device)
                loss = loss * (world / b)      # sum over this rank's rows -> its share of the global mean
                loss_v = _dist.all_reduce_sum([loss.item()])[0] / world
            row += len(pb.indices)
            if not math.isfinite(loss_v):
                raise NonFiniteLoss(f"student training reached a non-finite loss in epoch {epoch}; lower --lr.")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            epoch_loss += loss_v
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{epoch_loss / steps_per_epoch:.4f}")
        if resume_path and _dist.is_main():
            save_resume_state(resume_path, epoch + 1, model, optimizer, scheduler, gen, {"config": key})
    if bar is not None:
        bar.close()
    acc = evaluate_fn(model)
    return {"test_accuracy": acc, "seconds": time.perf_counter() - t0, "model": model}


def _student_loss(out, x, pb, rows, row, labels, cfg: TrainConfig, epoch, teacher, store, device):
    """The loss of a batch (``rows`` None: whole batch, mean) or of a rank's rows of it (sum)."""
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
    return F.kl_div(F.log_softmax(out.float() / cfg.temperature, dim=1), target,
                    reduction="batchmean" if rows is None else "sum")


def _resume_key(cfg: TrainConfig) -> dict:
    d = dataclasses.asdict(cfg)
    return {k: v for k, v in d.items() if k not in ("overwrite", "progress", "device", "loader", "out")}


def make_evaluator(val: str, norm: Normalization, image_size: int, device, loader: str = "auto", seed: int = 0):
    check_data_path(val)
    if is_builtin(val):
        test = load_builtin(val, "test", seed)
        return lambda model: evaluate(model, test, norm, device, image_size=image_size)
    from .loaders import LoaderConfig, build_loader

    val_dir = os.path.join(val, "val") if os.path.isdir(os.path.join(val, "val")) else val
    vl = build_loader(LoaderConfig(root=val_dir, train=False, image_size=image_size, batch_size=250,
                                   mean=norm.mean, std=norm.std, loader=loader, device=str(device),
                                   shard_id=_dist.rank(), num_shards=_dist.world_size()))
    return lambda model: evaluate_loader(model, vl, device)


@_dist.stage
def run_train(cfg: TrainConfig) -> dict:
    if cfg.epochs <= 0:
        raise UserError(f"--epochs must be positive, got {cfg.epochs}.")
    if cfg.label_mode not in ("soft", "hard"):
        raise UserError(f"--label-mode must be 'soft' or 'hard', got {cfg.label_mode!r}.")
    if cfg.label_mode == "soft" and cfg.teacher is None and cfg.labels is None:
        raise UserError("soft-label training needs --teacher (online relabel) or --labels (a relabel directory).")
    device = _dist.resolve_device(cfg.device)
    teacher = load_model(cfg.teacher, cfg.teacher_arch) if cfg.teacher else None
    images, labels, norm = load_synthetic(cfg.syn, teacher, device)
    rec_path = os.path.join(cfg.syn, "recover_config.json")
    base = ModelSpec(**read_json(rec_path)["model"]) if os.path.exists(rec_path) else teacher.spec
    spec = ModelSpec(cfg.arch, base.num_classes, base.in_channels, base.image_size, cfg.width)
    store = None
    if cfg.labels is not None and cfg.label_mode == "soft":
        store = SoftLabelStore(cfg.labels)
        meta = store.meta
        if (meta["num_images"], meta["batch_size"], meta["seed"]) != (images.shape[0], cfg.batch_size, cfg.seed):
            raise UserError(f"soft labels in {cfg.labels} were made for {meta['num_images']} images, batch "
                            f"{meta['batch_size']}, seed {meta['seed']}; train with the same --batch-size and --seed.")
        if (meta["min_scale"], meta["max_scale"], meta["cutmix"]) != (cfg.min_scale, cfg.max_scale, cfg.cutmix):
            raise UserError(f"soft labels in {cfg.labels} were made with other crop/CutMix settings; use the same ones.")
        teacher_model = None
    else:
        teacher_model = teacher.model if teacher is not None else None
    final = os.path.join(cfg.out, "student.pt")
    if os.path.exists(final) and not cfg.overwrite:
        raise UserError(f"{final} already exists; use --overwrite to train again.")
    evaluate_fn = make_evaluator(cfg.val, norm, spec.image_size, device, cfg.loader, cfg.seed)
    os.makedirs(cfg.out, exist_ok=True)
    _dist.barrier()  # every rank has checked the output before rank 0 touches it
    if cfg.overwrite and os.path.exists(os.path.join(cfg.out, "train.resume")) and _dist.is_main():
        os.remove(os.path.join(cfg.out, "train.resume"))
    _dist.barrier()
    res = train_student(images, labels, spec.num_classes, spec, cfg, evaluate_fn, teacher_model, store,
                        resume_path=os.path.join(cfg.out, "train.resume"))
    model = res.pop("model")
    out = {"config": dataclasses.asdict(cfg), "model": spec.to_dict(), "results": res, "environment": environment(),
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
