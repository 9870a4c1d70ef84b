"""The crop plan shared by relabel and train: every crop of an epoch, regenerated from (seed, epoch, batch).

Each epoch the synthetic images are shuffled into batches, every image gets a random resized
crop and flip, and (with probability ``cutmix``) the batch is CutMix-ed. The crops are never
stored: ``epoch_plan`` draws them on the CPU from seeds derived from (seed, epoch, batch), so
relabel and train see identical crops on any device; ``make_inputs`` applies a planned batch.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from .augment import apply_crops, draw_crop_params
from .seeds import derived_seed


@dataclass
class CropPlanConfig:
    """What a crop of an epoch depends on; shared by relabel and train."""

    seed: int = 0
    batch_size: int = 100
    min_scale: float = 0.08
    max_scale: float = 1.0
    cutmix: float = 0.0          # probability that a batch is CutMix-ed (beta 1.0)

    @classmethod
    def of(cls, cfg) -> "CropPlanConfig":
        """The plan of a relabel or train config resolved for its images (recipe and
        srel_fast.recipes.with_student_rules: under srel the crops' scale follows the images)."""
        return cls(cfg.seed, cfg.batch_size, cfg.min_scale, cfg.max_scale, cfg.cutmix)


@dataclass
class PlannedBatch:
    indices: torch.Tensor        # which images, in order
    params: object               # CropParams (CPU tensors)
    mix_perm: torch.Tensor | None
    mix_box: tuple[int, int, int, int] | None   # top, left, height, width of the pasted region
    mix_lam: float


def epoch_plan(plan: CropPlanConfig, epoch: int, num_images: int, height: int, width: int) -> list[PlannedBatch]:
    order = torch.randperm(num_images, generator=torch.Generator().manual_seed(derived_seed("relabel", plan.seed, epoch, -1)))
    out = []
    for b, start in enumerate(range(0, num_images, plan.batch_size)):
        idx = order[start:start + plan.batch_size]
        g = torch.Generator().manual_seed(derived_seed("relabel", plan.seed, epoch, b))
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
