"""Stage 3a, Relabel: FKD-style soft labels for every crop of every synthetic image.

Each epoch the synthetic images are shuffled into batches, every image gets
a random resized crop and flip, and (with probability ``cutmix``) the batch
is CutMix-ed; the teacher labels each resulting crop with its logits, and
the student later learns softmax(teacher(crop) / T). The crops are never
stored: ``epoch_plan`` regenerates them from (seed, epoch, batch) on the
CPU, so relabel and train see identical crops on any device.

The store format is in soft_labels.py (docs/soft_label_format.md is the full
specification); the crop plan in crop_plan.py.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from . import distributed as _dist
from .augment import check_crop_scale
from .crop_plan import CropPlanConfig, epoch_plan, make_inputs
from .errors import UserError
from .files import REPLACE, check_output, config_differences, environment, write_json
from .images import load_synthetic
from .recipes import resolve_recipe, with_student_rules
from .soft_labels import STORE_FORMAT, STORE_VERSION, TOPK_MODES, SoftLabelStore, index_dtype, reference_bytes


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024


@dataclass
class RelabelConfig:
    syn: str
    out: str
    teacher: str                       # squeeze checkpoint (or state dict with --teacher-arch)
    teacher_arch: str | None = None
    recipe: str | None = None          # named defaults for the fields left at None (default: srel)
    # Recipe fields (None: the recipe's value).
    epochs: int | None = None
    batch_size: int | None = None
    temperature: float | None = None
    min_scale: float | None = None
    max_scale: float | None = None
    cutmix: float | None = None        # probability that a batch is CutMix-ed (1.0: every batch, as the paper)
    normalization: str | None = None   # mean/std of a teacher that carries none (plain state dict)
    image_size: int | None = None      # input size of a teacher that carries none
    topk: int | None = None            # keep only the top-k logits per crop
    topk_mode: str = "renorm"          # renorm: softmax over the kept logits; spread: true probabilities + uniform rest
    seed: int = 0
    device: str = "auto"
    backend: str = "auto"
    overwrite: bool = False
    progress: bool = True

    RECIPE_FIELDS: ClassVar[tuple[str, ...]] = (
        "epochs", "batch_size", "temperature", "min_scale", "max_scale", "cutmix", "normalization", "image_size")
    ALGORITHM_FLAGS: ClassVar[tuple[str, ...]] = ("topk", "topk_mode")

    def plan(self, images_shape) -> CropPlanConfig:
        """The crops of every epoch for synthetic images of ``images_shape`` (N, C, H, W)."""
        return CropPlanConfig.of(with_student_rules(resolve_recipe(self, "relabel")[0], images_shape))


@_dist.stage
def run_relabel(cfg: RelabelConfig) -> dict:
    """Store soft labels. Under torchrun the epochs are spread over the ranks
    (rank r writes epochs r, r + W, ...); rank 0 writes labels.json first."""
    from .models import load_model

    cfg, recipe_record = resolve_recipe(cfg, "relabel")
    if cfg.epochs is not None and cfg.epochs <= 0:   # None: srel's rule, set once the images are known
        raise UserError(f"--epochs must be positive, got {cfg.epochs}.")
    if cfg.min_scale is not None:   # None: srel's rule, checked once the images are known
        check_crop_scale(cfg.min_scale, cfg.max_scale)
    if cfg.topk_mode not in TOPK_MODES:
        raise UserError(f"--topk-mode must be 'renorm' or 'spread', got {cfg.topk_mode!r}.")
    teacher = load_model(cfg.teacher, cfg.teacher_arch, image_size=cfg.image_size, normalization=cfg.normalization)
    device = _dist.resolve_device(cfg.device)
    images, labels, _ = load_synthetic(cfg.syn, teacher, device)
    cfg = with_student_rules(cfg, images.shape, recipe_record)
    check_crop_scale(cfg.min_scale, cfg.max_scale)   # the rule's crops against an explicit --max-scale
    n_cls = teacher.spec.num_classes
    if cfg.topk is not None and not (0 < cfg.topk <= n_cls):
        raise UserError(f"--topk must be between 1 and the class count {n_cls}, got {cfg.topk}.")
    store = _open_store(cfg, _store_meta(cfg, teacher, images))
    seconds = _label_epochs(cfg, store, teacher, images)
    _dist.barrier()  # every epoch is on disk
    missing = [e for e in range(cfg.epochs) if not store.has_epoch(e)]
    if missing:
        raise UserError(f"soft-label store {cfg.out} is missing epochs {missing[:5]}; run relabel again.")
    results = _store_sizes(cfg, store, int(images.shape[0]), n_cls)
    results.update(seconds=seconds, world_size=_dist.world_size())
    if _dist.is_main():
        write_json(os.path.join(cfg.out, "relabel_results.json"),
                   {"config": dataclasses.asdict(cfg), "recipe": recipe_record, "results": results})
        _print_sizes(cfg, results)
    return results


def _store_meta(cfg: RelabelConfig, teacher, images: torch.Tensor) -> dict:
    """labels.json of the run (without its environment record)."""
    n_cls = teacher.spec.num_classes
    return {
        "format": STORE_FORMAT, "version": STORE_VERSION, "seed": cfg.seed, "epochs": cfg.epochs,
        "batch_size": cfg.batch_size, "num_images": int(images.shape[0]), "num_classes": n_cls,
        "temperature": cfg.temperature, "topk": cfg.topk, "topk_mode": cfg.topk_mode if cfg.topk else None,
        "index_dtype": np.dtype(index_dtype(n_cls)).name if cfg.topk else None,
        "min_scale": cfg.min_scale, "max_scale": cfg.max_scale,
        "cutmix": cfg.cutmix, "syn": os.path.abspath(cfg.syn), "teacher": os.path.abspath(cfg.teacher),
        "image_size": teacher.spec.image_size,
    }


def _open_store(cfg: RelabelConfig, meta: dict) -> SoftLabelStore:
    """Check the output directory on every rank, then (rank 0) clear it for --overwrite and
    write labels.json; the store every rank writes its epochs into."""
    meta_path = os.path.join(cfg.out, "labels.json")
    error = action = None
    try:  # every rank checks the directory before any rank writes to it (srel_fast.files.check_output)
        action = check_output(cfg.out, cfg.overwrite, record=meta_path, what="soft-label store",
                              processes=_dist.world_size(),
                              differences=lambda old: config_differences(old, meta, run_only=("environment",)))
    except UserError as exc:
        error = exc
    _dist.agree_or_raise(error)
    if _dist.is_main():
        if action == REPLACE:
            for f in os.listdir(cfg.out):
                if f.startswith("epoch_") and f.endswith(".npy"):
                    os.remove(os.path.join(cfg.out, f))
        write_json(meta_path, {**meta, "environment": environment()})
    _dist.barrier()
    return SoftLabelStore(cfg.out)


def _label_epochs(cfg: RelabelConfig, store: SoftLabelStore, teacher, images: torch.Tensor) -> float:
    """The teacher's logits for every crop of this rank's missing epochs, written to the store;
    returns the seconds it took."""
    model = teacher.model.to(images.device).eval()
    size = (teacher.spec.image_size, teacher.spec.image_size)
    idx_dtype = index_dtype(teacher.spec.num_classes)
    rank, world = _dist.rank(), _dist.world_size()
    mine = list(range(rank, cfg.epochs, world))
    todo = [e for e in mine if not store.has_epoch(e)]
    bar = None
    if cfg.progress and _dist.is_main():
        from tqdm import tqdm

        bar = tqdm(total=len(mine), initial=len(mine) - len(todo), desc="relabel" + (f" (rank 0 of {world})" if world > 1 else ""),
                   unit="epoch", dynamic_ncols=True, file=sys.stderr)
    t0 = time.perf_counter()
    for epoch in todo:
        rows = []
        with torch.no_grad():
            for pb in epoch_plan(cfg.plan(images.shape), epoch, images.shape[0], images.shape[2], images.shape[3]):
                rows.append(model(make_inputs(images, pb, size, cfg.backend)).float().cpu())
        logits = torch.cat(rows)
        if cfg.topk:
            v, i = logits.topk(cfg.topk, dim=1)  # descending: column 0 is the top logit
            if cfg.topk_mode == "spread":
                z = logits / cfg.temperature
                gap = torch.logsumexp(z, dim=1) - z.max(dim=1).values
                store.write_array(epoch, "lse", gap.numpy().astype(np.float16))
            store.write_array(epoch, "indices", i.numpy().astype(idx_dtype))
            store.write_array(epoch, "values", v.numpy().astype(np.float16))
        else:
            store.write_array(epoch, "logits", logits.numpy().astype(np.float16))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return time.perf_counter() - t0


def _store_sizes(cfg: RelabelConfig, store: SoftLabelStore, num_images: int, num_classes: int) -> dict:
    """The store's bytes against full fp16 logits and against the reference format."""
    ref = reference_bytes(cfg.epochs, num_images, num_classes, cfg.batch_size, cfg.cutmix)
    full_bytes = ref["logits"]
    store_bytes, payload = store.nbytes(), store.payload_bytes()
    return {
        "store_bytes": store_bytes, "store_payload_bytes": payload, "store_files": len(store.files()),
        "bytes_per_crop": payload / (cfg.epochs * num_images),
        "full_fp16_bytes": full_bytes, "reference_bytes": ref["total"], "reference_breakdown": ref,
        "compression": full_bytes / max(1, store_bytes),
        "compression_vs_reference": ref["total"] / max(1, store_bytes),
        "payload_compression": full_bytes / max(1, payload),
        "payload_compression_vs_reference": ref["total"] / max(1, payload),
    }


def _print_sizes(cfg: RelabelConfig, results: dict) -> None:
    ref, payload, store_bytes = results["reference_breakdown"], results["store_payload_bytes"], results["store_bytes"]
    kind = f"top-{cfg.topk} {cfg.topk_mode}" if cfg.topk else "full fp16 logits"
    _dist.main_print(
        f"relabel: store ({kind}): {human_bytes(payload)} of label arrays ({results['bytes_per_crop']:.1f} B per crop), "
        f"{human_bytes(store_bytes)} on disk in {results['store_files']} files; full fp16 logits "
        f"{human_bytes(results['full_fp16_bytes'])} ({results['payload_compression']:.1f}x the arrays); reference format "
        f"(fp16 logits + crop/flip/CutMix parameters) {human_bytes(ref['total'])} "
        f"({results['payload_compression_vs_reference']:.1f}x)")
