"""Stage 3a, Relabel: FKD-style soft labels for every crop of every synthetic image.

Each epoch the synthetic images are shuffled into batches, every image gets
a random resized crop and flip, and (with probability ``cutmix``) the batch
is CutMix-ed; the teacher labels each resulting crop with its logits, and
the student later learns softmax(teacher(crop) / T). The crops are never
stored: ``epoch_plan`` regenerates them from (seed, epoch, batch) on the
CPU, so relabel and train see identical crops on any device.

Soft-label store: a directory, format "srel-fast-soft-labels" version 2
(docs/soft_label_format.md is the full specification):
  labels.json               meta: seed, epochs, batch size, image count, classes,
                            temperature, top-k and its mode, index dtype, crop and mix settings
  epoch_EEEEE.logits.npy    float16 (num_images, num_classes): full store, or
  epoch_EEEEE.values.npy    float16 (num_images, k) top-k logits, descending, and
  epoch_EEEEE.indices.npy   int16 (classes <= 32767) or int32 (num_images, k) their classes,
  epoch_EEEEE.lse.npy       float16 (num_images,) logsumexp(z/T) - max(z/T) ("spread" mode only)
Rows are in the epoch's batch order (``epoch_plan``). Files are written
atomically per epoch; an interrupted relabel resumes at the first missing
epoch; under torchrun rank r writes epochs r, r + W, ... Reads are memory-mapped.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from .augment import apply_crops, draw_crop_params
from .errors import UserError
from . import distributed as _dist
from .files import atomic_write_bytes, environment, read_json, write_json
from .recipes import resolve_recipe

STORE_FORMAT = "srel-fast-soft-labels"
STORE_VERSION = 2
READABLE_VERSIONS = (1, 2)             # version 1: top-k always "renorm", no index_dtype field
TOPK_MODES = ("renorm", "spread")


def index_dtype(num_classes: int):
    """Class indices of a top-k store: int16 when every class fits, else int32."""
    return np.int16 if num_classes <= np.iinfo(np.int16).max else np.int32


def reference_bytes(epochs: int, num_images: int, num_classes: int, batch_size: int, cutmix: float) -> dict:
    """Payload bytes of the reference relabel (SRe2L generate_soft_label.py, FKD-style) for
    the same run: one torch.save file per batch holding [crop coords float32 (N, 4),
    flip bool (N,), CutMix index int64 (N,), lambda float64, box 4 x int64, logits float16 (N, C)].
    The mix fields are counted only when CutMix is on; the pickle/zip container is not counted."""
    batches = -(-num_images // batch_size)
    logits = epochs * num_images * num_classes * 2
    crops = epochs * num_images * (16 + 1)
    mix = epochs * (num_images * 8 + batches * (8 + 32)) if cutmix > 0 else 0
    return {"logits": logits, "crop_flip": crops, "mix": mix, "total": logits + crops + mix}


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024


@dataclass
class CropPlanConfig:
    """What a crop of an epoch depends on; shared by relabel and train."""

    seed: int = 0
    batch_size: int = 100
    min_scale: float = 0.08
    max_scale: float = 1.0
    cutmix: float = 0.0          # probability that a batch is CutMix-ed (beta 1.0)


@dataclass
class PlannedBatch:
    indices: torch.Tensor        # which images, in order
    params: object               # CropParams (CPU tensors)
    mix_perm: torch.Tensor | None
    mix_box: tuple[int, int, int, int] | None   # top, left, height, width of the pasted region
    mix_lam: float


def _plan_seed(seed: int, epoch: int, batch: int) -> int:
    digest = hashlib.sha256(f"srel-fast/relabel/{seed}/{epoch}/{batch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def epoch_plan(plan: CropPlanConfig, epoch: int, num_images: int, height: int, width: int) -> list[PlannedBatch]:
    order = torch.randperm(num_images, generator=torch.Generator().manual_seed(_plan_seed(plan.seed, epoch, -1)))
    out = []
    for b, start in enumerate(range(0, num_images, plan.batch_size)):
        idx = order[start:start + plan.batch_size]
        g = torch.Generator().manual_seed(_plan_seed(plan.seed, epoch, b))
        params = draw_crop_params(len(idx), height, width, g, per_image=True,
                                  scale=(plan.min_scale, plan.max_scale))
        perm = box = None
        lam = 1.0
        if plan.cutmix > 0 and float(torch.rand(1, generator=g)) < plan.cutmix:
            lam = float(torch.rand(1, generator=g))  # CutMix's Beta(1, 1) is uniform
            cut = math.sqrt(1.0 - lam)
            ch, cw = int(height * cut), int(width * cut)
            cy, cx = int(torch.randint(height, (1,), generator=g)), int(torch.randint(width, (1,), generator=g))
            top, bottom = max(cy - ch // 2, 0), min(cy + ch // 2, height)
            left, right = max(cx - cw // 2, 0), min(cx + cw // 2, width)
            perm = torch.randperm(len(idx), generator=g)
            box = (top, left, bottom - top, right - left)
        out.append(PlannedBatch(idx, params, perm, box, lam))
    return out


def make_inputs(images: torch.Tensor, pb: PlannedBatch, out_size: tuple[int, int], backend: str = "auto",
                rows: slice | None = None) -> torch.Tensor:
    """The student's (and teacher's) input for a planned batch: crops, flips, CutMix.

    ``rows`` selects positions of the batch (a DDP rank's slice): only those crops
    are made (plus the CutMix partners they paste from), and they equal the same
    rows of the whole batch's input."""
    device = images.device
    if rows is None:
        params = dataclasses.replace(pb.params, boxes=pb.params.boxes.to(device), flip=pb.params.flip.to(device))
        x = apply_crops(images[pb.indices.to(device)], params, out_size, backend)
        if pb.mix_perm is not None and pb.mix_box[2] > 0 and pb.mix_box[3] > 0:
            t, l, h, w = pb.mix_box
            x = x.clone()
            x[:, :, t:t + h, l:l + w] = x[pb.mix_perm.to(device), :, t:t + h, l:l + w]
        return x
    pos = torch.arange(len(pb.indices))[rows]

    def crops(which: torch.Tensor) -> torch.Tensor:
        p = pb.params
        params = dataclasses.replace(p, boxes=p.boxes[which].to(device), flip=p.flip[which].to(device),
                                     shift=None if p.shift is None else p.shift[which].to(device))
        return apply_crops(images[pb.indices[which].to(device)], params, out_size, backend)

    x = crops(pos)
    if pb.mix_perm is not None and pb.mix_box[2] > 0 and pb.mix_box[3] > 0 and len(pos) > 0:
        t, l, h, w = pb.mix_box
        x = x.clone()
        x[:, :, t:t + h, l:l + w] = crops(pb.mix_perm[pos])[:, :, t:t + h, l:l + w]
    return x


# ----------------------------------------------------------------------------- store


class SoftLabelStore:
    """Reads a soft-label store (memory-mapped)."""

    def __init__(self, root: str):
        meta_path = os.path.join(root, "labels.json")
        if not os.path.exists(meta_path):
            raise UserError(f"soft-label directory {root} has no labels.json; run 'srel-fast relabel' first.")
        self.root = root
        self.meta = read_json(meta_path)
        if self.meta.get("format") != STORE_FORMAT or self.meta.get("version") not in READABLE_VERSIONS:
            raise UserError(f"{meta_path} is not a version-{STORE_VERSION} srel-fast soft-label store.")
        self.topk = self.meta.get("topk")
        self.topk_mode = (self.meta.get("topk_mode") or "renorm") if self.topk else None

    def _names(self) -> list[str]:
        if not self.topk:
            return ["logits"]
        return ["values", "indices"] + (["lse"] if self.topk_mode == "spread" else [])

    def has_epoch(self, epoch: int) -> bool:
        return all(os.path.exists(self._path(epoch, n)) for n in self._names())

    def _path(self, epoch: int, name: str) -> str:
        return os.path.join(self.root, f"epoch_{epoch:05d}.{name}.npy")

    def _check_epoch(self, epoch: int) -> None:
        if not self.has_epoch(epoch):
            raise UserError(f"soft-label store {self.root} has no labels for epoch {epoch} "
                            f"(it holds {self.meta['epochs']} epochs); train for fewer epochs or relabel more.")

    def epoch_logits(self, epoch: int):
        """(values, indices) memory-mapped; indices is None for a full store."""
        self._check_epoch(epoch)
        if self.topk:
            return (np.load(self._path(epoch, "values"), mmap_mode="r"),
                    np.load(self._path(epoch, "indices"), mmap_mode="r"))
        return np.load(self._path(epoch, "logits"), mmap_mode="r"), None

    def soft_targets(self, epoch: int, rows: slice, temperature: float, device) -> torch.Tensor:
        """The target distribution of a batch's crops (rows of the epoch, batch order).

        full store:      softmax(logits / T)
        top-k "renorm":  softmax over the kept logits / T; other classes get 0
        top-k "spread":  kept classes get their softmax probability over all classes
                         (from the stored logsumexp gap), the remaining mass is spread
                         uniformly over the other classes (needs T = the store's T)."""
        values, indices = self.epoch_logits(epoch)
        v = torch.from_numpy(np.asarray(values[rows], dtype=np.float32)).to(device)
        if indices is None:
            return torch.softmax(v / temperature, dim=1)
        idx = torch.from_numpy(np.asarray(indices[rows], dtype=np.int64)).to(device)
        n_cls = self.meta["num_classes"]
        if self.topk_mode == "spread":
            if float(temperature) != float(self.meta["temperature"]):
                raise UserError(f"the spread top-k store {self.root} was made at temperature "
                                f"{self.meta['temperature']}; train with the same --temperature.")
            gap = np.load(self._path(epoch, "lse"), mmap_mode="r")
            g = torch.from_numpy(np.asarray(gap[rows], dtype=np.float32)).to(device)
            kept = torch.exp((v - v[:, :1]) / temperature - g[:, None])
            k = kept.shape[1]
            rest = (1.0 - kept.sum(1, keepdim=True)).clamp_min(0.0)
            other = rest / (n_cls - k) if n_cls > k else torch.zeros_like(rest)
            probs = other.expand(v.shape[0], n_cls).clone()
            return probs.scatter_(1, idx, kept)
        probs = torch.zeros(v.shape[0], n_cls, device=device)
        return probs.scatter_(1, idx, torch.softmax(v / temperature, dim=1))

    def files(self) -> list[str]:
        return sorted(f for f in os.listdir(self.root) if f.endswith(".npy"))

    def nbytes(self) -> int:
        """Bytes of the label files on disk (the .npy headers included)."""
        return sum(os.path.getsize(os.path.join(self.root, f)) for f in self.files())

    def payload_bytes(self) -> int:
        """Bytes of the arrays alone (no .npy headers)."""
        return sum(np.load(os.path.join(self.root, f), mmap_mode="r").nbytes for f in self.files())


def _save_npy(path: str, arr: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, arr)
    atomic_write_bytes(path, buf.getvalue())


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

    def plan(self) -> CropPlanConfig:
        cfg = resolve_recipe(self, "relabel")[0]
        return CropPlanConfig(cfg.seed, cfg.batch_size, cfg.min_scale, cfg.max_scale, cfg.cutmix)


@_dist.stage
def run_relabel(cfg: RelabelConfig) -> dict:
    """Store soft labels. Under torchrun the epochs are spread over the ranks
    (rank r writes epochs r, r + W, ...); rank 0 writes labels.json first."""
    from .models import load_model
    from .train import load_synthetic

    cfg, recipe_record = resolve_recipe(cfg, "relabel")
    if cfg.epochs <= 0:
        raise UserError(f"--epochs must be positive, got {cfg.epochs}.")
    if cfg.topk_mode not in TOPK_MODES:
        raise UserError(f"--topk-mode must be 'renorm' or 'spread', got {cfg.topk_mode!r}.")
    teacher = load_model(cfg.teacher, cfg.teacher_arch, image_size=cfg.image_size, normalization=cfg.normalization)
    device = _dist.resolve_device(cfg.device)
    images, labels, _ = load_synthetic(cfg.syn, teacher, device)
    n_cls = teacher.spec.num_classes
    if cfg.topk is not None and not (0 < cfg.topk <= n_cls):
        raise UserError(f"--topk must be between 1 and the class count {n_cls}, got {cfg.topk}.")
    idx_dtype = index_dtype(n_cls)
    meta = {
        "format": STORE_FORMAT, "version": STORE_VERSION, "seed": cfg.seed, "epochs": cfg.epochs,
        "batch_size": cfg.batch_size, "num_images": int(images.shape[0]), "num_classes": n_cls,
        "temperature": cfg.temperature, "topk": cfg.topk, "topk_mode": cfg.topk_mode if cfg.topk else None,
        "index_dtype": np.dtype(idx_dtype).name if cfg.topk else None,
        "min_scale": cfg.min_scale, "max_scale": cfg.max_scale,
        "cutmix": cfg.cutmix, "syn": os.path.abspath(cfg.syn), "teacher": os.path.abspath(cfg.teacher),
        "image_size": teacher.spec.image_size,
    }
    meta_path = os.path.join(cfg.out, "labels.json")
    error = None
    try:  # every rank checks the directory before any rank writes to it
        if cfg.overwrite and _dist.world_size() > 1:
            raise UserError("--overwrite cannot be combined with several processes; clear the output directory first.")
        if os.path.exists(meta_path) and not cfg.overwrite:
            old = read_json(meta_path)
            if {k: v for k, v in old.items() if k != "environment"} != meta:
                raise UserError(f"soft-label directory {cfg.out} holds labels made with other settings; "
                                "use another --out or --overwrite.")
        elif os.path.isdir(cfg.out) and os.listdir(cfg.out) and not cfg.overwrite:
            raise UserError(f"output directory {cfg.out} is not empty and holds no soft labels; choose another --out.")
    except UserError as exc:
        error = exc
    _dist.agree_or_raise(error)
    if _dist.is_main():
        if cfg.overwrite and os.path.isdir(cfg.out):
            for f in os.listdir(cfg.out):
                if f.startswith("epoch_") and f.endswith(".npy"):
                    os.remove(os.path.join(cfg.out, f))
        write_json(meta_path, {**meta, "environment": environment()})
    _dist.barrier()
    store = SoftLabelStore(cfg.out)
    model = teacher.model.to(device).eval()
    size = (teacher.spec.image_size, teacher.spec.image_size)
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
            for pb in epoch_plan(cfg.plan(), epoch, images.shape[0], images.shape[2], images.shape[3]):
                rows.append(model(make_inputs(images, pb, size, cfg.backend)).float().cpu())
        logits = torch.cat(rows)
        if cfg.topk:
            v, i = logits.topk(cfg.topk, dim=1)  # descending: column 0 is the top logit
            if cfg.topk_mode == "spread":
                z = logits / cfg.temperature
                gap = torch.logsumexp(z, dim=1) - z.max(dim=1).values
                _save_npy(store._path(epoch, "lse"), gap.numpy().astype(np.float16))
            _save_npy(store._path(epoch, "indices"), i.numpy().astype(idx_dtype))
            _save_npy(store._path(epoch, "values"), v.numpy().astype(np.float16))
        else:
            _save_npy(store._path(epoch, "logits"), logits.numpy().astype(np.float16))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - t0
    _dist.barrier()  # every epoch is on disk
    missing = [e for e in range(cfg.epochs) if not store.has_epoch(e)]
    if missing:
        raise UserError(f"soft-label store {cfg.out} is missing epochs {missing[:5]}; run relabel again.")
    ref = reference_bytes(cfg.epochs, int(images.shape[0]), n_cls, cfg.batch_size, cfg.cutmix)
    full_bytes = ref["logits"]
    store_bytes, payload = store.nbytes(), store.payload_bytes()
    results = {
        "store_bytes": store_bytes, "store_payload_bytes": payload, "store_files": len(store.files()),
        "bytes_per_crop": payload / (cfg.epochs * images.shape[0]),
        "full_fp16_bytes": full_bytes, "reference_bytes": ref["total"], "reference_breakdown": ref,
        "compression": full_bytes / max(1, store_bytes),
        "compression_vs_reference": ref["total"] / max(1, store_bytes),
        "payload_compression": full_bytes / max(1, payload),
        "payload_compression_vs_reference": ref["total"] / max(1, payload),
        "seconds": seconds, "world_size": world,
    }
    if _dist.is_main():
        write_json(os.path.join(cfg.out, "relabel_results.json"),
                   {"config": dataclasses.asdict(cfg), "recipe": recipe_record, "results": results})
        kind = f"top-{cfg.topk} {cfg.topk_mode}" if cfg.topk else "full fp16 logits"
        _dist.main_print(
            f"relabel: store ({kind}): {human_bytes(payload)} of label arrays ({results['bytes_per_crop']:.1f} B per crop), "
            f"{human_bytes(store_bytes)} on disk in {results['store_files']} files; full fp16 logits "
            f"{human_bytes(full_bytes)} ({results['payload_compression']:.1f}x the arrays); reference format "
            f"(fp16 logits + crop/flip/CutMix parameters) {human_bytes(ref['total'])} "
            f"({results['payload_compression_vs_reference']:.1f}x)")
    return results
