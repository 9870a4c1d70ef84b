"""The original SRe2L recovery iteration (data_synthesis.py), re-implemented as the reference provider."""
from __future__ import annotations

import random

import torch
import torch.nn.functional as F

from srel_fast.bn_matching import ReferenceBNMatching
from srel_fast.data import Normalization
from srel_fast.recover import RecoverConfig, cosine_lr


def reference_crop(x: torch.Tensor, top: int, left: int, height: int, width: int, flip: bool,
                   shift: tuple[int, int], size: int) -> torch.Tensor:
    """The original code's augmentation with host-side parameters: one
    RandomResizedCrop box for the whole batch (crop + bilinear resize), a
    horizontal flip, then torch.roll by the jitter offsets. (torchvision's
    RandomResizedCrop on tensors antialiases by default since 0.17; like
    srel-fast, this uses plain F.interpolate, as the SRe2L code did with the
    torchvision of its time.)"""
    out = F.interpolate(x[:, :, top:top + height, left:left + width], size=(size, size), mode="bilinear",
                        align_corners=False)
    if flip:
        out = out.flip(3)
    return torch.roll(out, shifts=shift, dims=(2, 3))


class ReferenceRecovery:
    """The original SRe2L recovery iteration (data_synthesis.py), fp32 and eager
    unless ``amp``/``compiled`` say otherwise:

    - a forward hook per BN layer computing mean and permute/contiguous/var
      (srel_fast.bn_matching.ReferenceBNMatching);
    - crop box, flip and roll drawn on the host (torchvision's
      RandomResizedCrop.get_params, RandomHorizontalFlip's torch.rand(1),
      random.randint for the jitter) and applied batch-wide;
    - Adam(betas 0.5, 0.9, eps 1e-8) on the images, cosine lr, and a
      per-channel clamp loop to the normalised image of [0, 1].

    - the model frozen: data_synthesis.py sets requires_grad=False on every
      parameter, so no weight gradient is computed (nor here).

    ``compiled=True`` compiles the fixed-shape part (model + hooks + CE + BN
    term, on the already cropped batch) with torch.compile(dynamic=False);
    the crop itself has a different shape every iteration, so it stays eager
    (compiling it would recompile on every new box)."""

    def __init__(self, model: torch.nn.Module, norm: Normalization, image_size: int, num_classes: int, batch: int,
                 device: torch.device, total_iterations: int, amp: torch.dtype | None = None, compiled: bool = False,
                 seed: int = 0):
        cfg = RecoverConfig(out="", batch_size=batch).resolved(image_size)
        self.lr, self.r_bn, self.jitter = cfg.lr, cfg.r_bn, cfg.jitter
        self.scale = (cfg.min_scale, cfg.max_scale)
        self.size = image_size
        self.device = device
        self.amp = amp
        self.total = total_iterations
        self.model = model.to(device).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.bn = ReferenceBNMatching(self.model, cfg.first_bn_multiplier)
        self.mean, self.std = norm.mean, norm.std
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn((batch, 3, image_size, image_size), generator=g).to(device).requires_grad_(True)
        self.targets = (torch.arange(batch) % num_classes).to(device)
        self.optimizer = torch.optim.Adam([self.x], lr=self.lr, betas=(0.5, 0.9), eps=1e-8)
        self.core = torch.compile(self._core, dynamic=False) if compiled else self._core
        self.images_per_iteration = batch
        torch.manual_seed(seed + 1)
        random.seed(seed + 1)

    def _core(self, x_aug: torch.Tensor, targets: torch.Tensor):
        with torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
            logits = self.model(x_aug)
        ce = F.cross_entropy(logits.float(), targets)
        bn = self.bn.loss()
        return ce + self.r_bn * bn, ce, bn

    def draw(self) -> tuple:
        import torchvision

        top, left, h, w = torchvision.transforms.RandomResizedCrop.get_params(self.x, self.scale, (3 / 4, 4 / 3))
        flip = bool(torch.rand(1) < 0.5)
        shift = (random.randint(0, self.jitter), random.randint(0, self.jitter))
        return top, left, h, w, flip, shift

    def loss(self, crop: tuple):
        top, left, h, w, flip, shift = crop
        return self.core(reference_crop(self.x, top, left, h, w, flip, shift, self.size), self.targets)

    def clip(self) -> None:
        with torch.no_grad():
            for c in range(3):
                m, s = self.mean[c], self.std[c]
                self.x.data[:, c] = torch.clamp(self.x.data[:, c], -m / s, (1 - m) / s)

    def step(self, it: int) -> torch.Tensor:
        for group in self.optimizer.param_groups:
            group["lr"] = cosine_lr(self.lr, it, self.total)
        crop = self.draw()
        self.optimizer.zero_grad()
        loss, _, _ = self.loss(crop)
        loss.backward()
        self.optimizer.step()
        self.clip()
        return loss.detach()

    def close(self) -> None:
        self.bn.close()
