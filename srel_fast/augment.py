"""Random-resized-crop ("multi-crop") augmentation for recovery and training.

Random parameters are drawn with a torch.Generator on the images' device, so
that the draws depend only on the seed and the device, never on the backend:
every backend sees the same crops, and recovery is a pure function of
(config, seed, batch). Crops are applied by srel_fast.kernels.multicrop_resize.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from srel_fast.errors import UserError
from srel_fast.kernels.crop_sampler import sample_crop_boxes, sample_flip_shift
from srel_fast.kernels.multicrop_resize import multicrop_resize


@dataclass
class CropParams:
    boxes: torch.Tensor          # (N, 4) top, left, height, width
    flip: torch.Tensor           # (N,) bool
    shift: torch.Tensor | None   # (N, 2) int64 roll, or None


JITTER_RANGES = ("nonnegative", "symmetric")


def check_crop_scale(min_scale: float, max_scale: float) -> None:
    """RandomResizedCrop's area range, as every stage takes it: 0 < min <= max <= 1."""
    if not (0 < min_scale <= max_scale <= 1):
        raise UserError(f"crop scale range must satisfy 0 < min <= max <= 1, got {min_scale}..{max_scale}.")


def draw_crop_params(n: int, height: int, width: int, generator: torch.Generator, *, per_image: bool,
                     scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), jitter: int = 0,
                     jitter_range: str = "nonnegative", out_size: tuple[int, int] | None = None,
                     boxes_from_uniforms=None) -> CropParams:
    """Crop boxes, flips and rolls for ``n`` images of ``height x width`` (one draw for
    the batch unless ``per_image``). The roll is drawn from ``0..jitter`` (nonnegative:
    the official ImageNet code's ``random.randint(0, jitter)``) or ``-jitter..jitter``
    (symmetric: the official Tiny-ImageNet code's ``random.randint(-jitter, jitter)``),
    both ends included; it is returned modulo the crop's output size ``out_size`` (a roll is
    circular, so a roll by -k is a roll by size - k; default: the image size, which is the
    output size in recovery unless it upsamples tiles). ``boxes_from_uniforms``: see
    ``sample_crop_boxes`` (a compiled copy of the box arithmetic: the same draws, fewer launches)."""
    if jitter_range not in JITTER_RANGES:
        raise ValueError(f"jitter_range must be one of {JITTER_RANGES}, got {jitter_range!r}")
    device = generator.device
    boxes = sample_crop_boxes(n, height, width, scale=scale, ratio=ratio, per_image=per_image,
                              generator=generator, device=device, boxes_from_uniforms=boxes_from_uniforms)
    symmetric = jitter_range == "symmetric"
    flip, shift = sample_flip_shift(n, jitter, per_image=per_image, generator=generator, device=device,
                                    symmetric=symmetric)
    if jitter <= 0:
        return CropParams(boxes, flip, None)
    if symmetric:
        # modulo Python numbers: a tensor of the sizes would be a host-to-device copy every iteration
        oh, ow = out_size or (height, width)
        shift = torch.stack([torch.remainder(shift[:, 0], oh), torch.remainder(shift[:, 1], ow)], dim=1)
    return CropParams(boxes, flip, shift)


def apply_crops(x: torch.Tensor, params: CropParams, out_size: tuple[int, int], backend: str = "auto",
                shared: bool = False) -> torch.Tensor:
    """Crop, resize (bilinear, align_corners=False, no antialias), flip and roll.

    ``shared=True`` with the torch backend is the original code's way: one
    crop for the whole batch, a single slice + F.interpolate (the parameters
    of image 0 apply to all images)."""
    if shared and backend == "torch":
        top, left, h, w = (int(v) for v in params.boxes[0].tolist())
        out = F.interpolate(x[:, :, top:top + h, left:left + w], size=out_size, mode="bilinear", align_corners=False)
        if bool(params.flip[0]):
            out = out.flip(3)
        if params.shift is not None:
            out = torch.roll(out, shifts=tuple(int(s) for s in params.shift[0].tolist()), dims=(2, 3))
        return out
    return multicrop_resize(x, params.boxes, out_size, flip=params.flip, shift=params.shift, backend=backend)
