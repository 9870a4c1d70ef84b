"""Stage 3a, Relabel: FKD-style soft labels for every crop of every synthetic image.

Each epoch the synthetic images are shuffled into batches, every image gets
a random resized crop and flip, and (with probability ``cutmix``) the batch
is CutMix-ed; the teacher labels each resulting crop with its logits, and
the student later learns softmax(teacher(crop) / T). The crops are never
stored: ``epoch_plan`` regenerates them from (seed, epoch, batch) on the
CPU, so relabel and train see identical crops on any device.

Soft-label store, a directory (format "srel-fast-soft-labels", version 1):
  labels.json               meta: seed, epochs, batch size, image count,
                            classes, temperature, top-k, crop and mix settings
  epoch_EEEEE.logits.npy    float16 (num_images, num_classes), rows in the
                            epoch's batch order (full store), or
  epoch_EEEEE.values.npy    float16 (num_images, k) top-k logits and
  epoch_EEEEE.indices.npy   int16/int32 (num_images, k) their classes (top-k store)
Files are written atomically per epoch; an interrupted relabel resumes at the
first missing epoch. Reads are memory-mapped.
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

import numpy as np
import torch

from .augment import apply_crops, draw_crop_params
from .errors import UserError
from .files import atomic_write_bytes, environment, read_json, write_json

STORE_FORMAT = "srel-fast-soft-labels"
STORE_VERSION = 1


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


def make_inputs(images: torch.Tensor, pb: PlannedBatch, out_size: tuple[int, int], backend: str = "auto") -> torch.Tensor:
    """The student's (and teacher's) input for a planned batch: crops, flips, CutMix."""
    device = images.device
    params = dataclasses.replace(pb.params, boxes=pb.params.boxes.to(device), flip=pb.params.flip.to(device))
    x = apply_crops(images[pb.indices.to(device)], params, out_size, backend)
    if pb.mix_perm is not None and pb.mix_box[2] > 0 and pb.mix_box[3] > 0:
        t, l, h, w = pb.mix_box
        x = x.clone()
        x[:, :, t:t + h, l:l + w] = x[pb.mix_perm.to(device), :, t:t + h, l:l + w]
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
        if self.meta.get("format") != STORE_FORMAT or self.meta.get("version") != STORE_VERSION:
            raise UserError(f"{meta_path} is not a version-{STORE_VERSION} srel-fast soft-label store.")
        self.topk = self.meta.get("topk")

    def has_epoch(self, epoch: int) -> bool:
        names = ["values", "indices"] if self.topk else ["logits"]
        return all(os.path.exists(self._path(epoch, n)) for n in names)

    def _path(self, epoch: int, name: str) -> str:
        return os.path.join(self.root, f"epoch_{epoch:05d}.{name}.npy")

    def epoch_logits(self, epoch: int):
        """(values, indices) memory-mapped; indices is None for a full store."""
        if not self.has_epoch(epoch):
            raise UserError(f"soft-label store {self.root} has no labels for epoch {epoch} "
                            f"(it holds {self.meta['epochs']} epochs); train for fewer epochs or relabel more.")
        if self.topk:
            return (np.load(self._path(epoch, "values"), mmap_mode="r"),
                    np.load(self._path(epoch, "indices"), mmap_mode="r"))
        return np.load(self._path(epoch, "logits"), mmap_mode="r"), None

    def soft_targets(self, epoch: int, rows: slice, temperature: float, device) -> torch.Tensor:
        """softmax(logits / T) for a batch; for a top-k store the distribution
        is renormalised over the kept classes (the others get probability 0)."""
        values, indices = self.epoch_logits(epoch)
        v = torch.from_numpy(np.asarray(values[rows], dtype=np.float32)).to(device)
        if indices is None:
            return torch.softmax(v / temperature, dim=1)
        idx = torch.from_numpy(np.asarray(indices[rows], dtype=np.int64)).to(device)
        probs = torch.zeros(v.shape[0], self.meta["num_classes"], device=device)
        return probs.scatter_(1, idx, torch.softmax(v / temperature, dim=1))

    def nbytes(self) -> int:
        return sum(os.path.getsize(os.path.join(self.root, f)) for f in os.listdir(self.root) if f.endswith(".npy"))


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
    epochs: int = 300
    batch_size: int = 100
    temperature: float = 20.0
    topk: int | None = None            # keep only the top-k logits per crop
    min_scale: float = 0.08
    max_scale: float = 1.0
    cutmix: float = 0.0
    seed: int = 0
    device: str = "auto"
    backend: str = "auto"
    overwrite: bool = False
    progress: bool = True

    def plan(self) -> CropPlanConfig:
        return CropPlanConfig(self.seed, self.batch_size, self.min_scale, self.max_scale, self.cutmix)


def run_relabel(cfg: RelabelConfig) -> dict:
    from .models import load_model
    from .recover import resolve_device
    from .train import load_synthetic

    if cfg.epochs <= 0:
        raise UserError(f"--epochs must be positive, got {cfg.epochs}.")
    teacher = load_model(cfg.teacher, cfg.teacher_arch)
    device = resolve_device(cfg.device)
    images, labels, _ = load_synthetic(cfg.syn, teacher, device)
    n_cls = teacher.spec.num_classes
    if cfg.topk is not None and not (0 < cfg.topk <= n_cls):
        raise UserError(f"--topk must be between 1 and the class count {n_cls}, got {cfg.topk}.")
    meta = {
        "format": STORE_FORMAT, "version": STORE_VERSION, "seed": cfg.seed, "epochs": cfg.epochs,
        "batch_size": cfg.batch_size, "num_images": int(images.shape[0]), "num_classes": n_cls,
        "temperature": cfg.temperature, "topk": cfg.topk, "min_scale": cfg.min_scale, "max_scale": cfg.max_scale,
        "cutmix": cfg.cutmix, "syn": os.path.abspath(cfg.syn), "teacher": os.path.abspath(cfg.teacher),
        "image_size": teacher.spec.image_size,
    }
    meta_path = os.path.join(cfg.out, "labels.json")
    if os.path.exists(meta_path) and not cfg.overwrite:
        old = read_json(meta_path)
        if {k: v for k, v in old.items() if k != "environment"} != meta:
            raise UserError(f"soft-label directory {cfg.out} holds labels made with other settings; "
                            "use another --out or --overwrite.")
    elif os.path.isdir(cfg.out) and os.listdir(cfg.out) and not cfg.overwrite:
        raise UserError(f"output directory {cfg.out} is not empty and holds no soft labels; choose another --out.")
    write_json(meta_path, {**meta, "environment": environment()})
    store = SoftLabelStore(cfg.out)
    model = teacher.model.to(device).eval()
    size = (teacher.spec.image_size, teacher.spec.image_size)
    idx_dtype = np.int16 if n_cls <= np.iinfo(np.int16).max else np.int32
    todo = [e for e in range(cfg.epochs) if not store.has_epoch(e)]
    bar = None
    if cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.epochs, initial=cfg.epochs - len(todo), desc="relabel", unit="epoch",
                   dynamic_ncols=True, file=sys.stderr)
    t0 = time.perf_counter()
    for epoch in todo:
        rows = []
        with torch.no_grad():
            for pb in epoch_plan(cfg.plan(), epoch, images.shape[0], images.shape[2], images.shape[3]):
                rows.append(model(make_inputs(images, pb, size, cfg.backend)).float().cpu())
        logits = torch.cat(rows)
        if cfg.topk:
            v, i = logits.topk(cfg.topk, dim=1)
            _save_npy(store._path(epoch, "indices"), i.numpy().astype(idx_dtype))
            _save_npy(store._path(epoch, "values"), v.numpy().astype(np.float16))
        else:
            _save_npy(store._path(epoch, "logits"), logits.numpy().astype(np.float16))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    full_bytes = cfg.epochs * images.shape[0] * n_cls * 2
    results = {"store_bytes": store.nbytes(), "full_fp16_bytes": full_bytes,
               "compression": full_bytes / max(1, store.nbytes()), "seconds": time.perf_counter() - t0}
    write_json(os.path.join(cfg.out, "relabel_results.json"), {"config": dataclasses.asdict(cfg), "results": results})
    return results
