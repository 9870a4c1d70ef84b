"""Random crop boxes, flips and roll shifts drawn on the device, for multicrop_resize.

Everything here is a fixed sequence of tensor ops on ``device``: no ``.item()``,
no host synchronisation and no Python branching on random values, so a
recovery step that calls these can be captured in a CUDA graph and traced by
torch.compile.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import torch

__all__ = ["sample_crop_boxes", "sample_flip_shift", "fallback_crop_box", "draw_crop_uniforms",
           "crop_boxes_from_uniforms"]

_TRIES = 10


def _device(generator: Optional[torch.Generator], device) -> torch.device:
    if device is not None:
        return torch.device(device)
    if generator is not None:
        return generator.device
    return torch.device("cpu")


def fallback_crop_box(height: int, width: int, ratio: Sequence[float]) -> Tuple[int, int, int, int]:
    """torchvision RandomResizedCrop's centre-crop fallback when no try fits: (top, left, h, w),
    the image with its aspect ratio clamped into ``ratio`` (depends on the image size only)."""
    in_ratio = float(width) / float(height)
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w = width
        h = height
    return (height - h) // 2, (width - w) // 2, h, w


def sample_crop_boxes(
    n: int,
    height: int,
    width: int,
    scale: Sequence[float] = (0.08, 1.0),
    ratio: Sequence[float] = (3.0 / 4.0, 4.0 / 3.0),
    per_image: bool = True,
    generator: Optional[torch.Generator] = None,
    device: Optional[Union[str, torch.device]] = None,
    dtype: torch.dtype = torch.float32,
    boxes_from_uniforms=None,
) -> torch.Tensor:
    """RandomResizedCrop boxes for ``n`` images of ``height`` x ``width``.

    Returns an (n, 4) ``dtype`` tensor of integer-valued (top, left, height,
    width) on ``device`` (default: the generator's device, else CPU), with the
    distribution of ``torchvision.transforms.RandomResizedCrop.get_params``:
    up to 10 tries of area fraction ~ U(scale) and log aspect ratio ~
    U(log ratio), w = round(sqrt(A r)), h = round(sqrt(A / r)) (round half to
    even, as Python's round), the first try with 0 < w <= width and
    0 < h <= height wins and its top/left are uniform integers in
    [0, height - h] x [0, width - w]; without a valid try, torchvision's
    centre crop. All 10 tries are drawn at once and the first valid one is
    selected with tensor ops. ``per_image=False`` draws one box and repeats
    it for the batch (the reference SRe2L behaviour).

    The draw is two steps: ``draw_crop_uniforms`` (three ``torch.rand`` calls on
    the generator) and ``crop_boxes_from_uniforms`` (plain tensor arithmetic);
    ``boxes_from_uniforms`` replaces the second, e.g. by a ``torch.compile``'d copy
    of it, which fuses its ~50 small launches into a few with the same draws.
    """
    dev = _device(generator, device)
    m = n if per_image else 1
    if m <= 0:
        return torch.zeros((0, 4), dtype=dtype, device=dev)
    u_s, u_r, u_ij = draw_crop_uniforms(m, generator, dev)
    box = (boxes_from_uniforms or crop_boxes_from_uniforms)(u_s, u_r, u_ij, height, width, tuple(scale),
                                                            tuple(ratio), dtype)
    if not per_image:
        box = box.expand(n, 4).contiguous()
    return box


def draw_crop_uniforms(m: int, generator: Optional[torch.Generator], device: torch.device):
    """The uniform numbers of ``m`` crop boxes, in the order ``sample_crop_boxes`` draws
    them: area fractions (m, 10), aspect ratios (m, 10), top/left (m, 2)."""
    u_s = torch.rand((m, _TRIES), generator=generator, device=device)
    u_r = torch.rand((m, _TRIES), generator=generator, device=device)
    u_ij = torch.rand((m, 2), generator=generator, device=device)
    return u_s, u_r, u_ij


def crop_boxes_from_uniforms(u_s: torch.Tensor, u_r: torch.Tensor, u_ij: torch.Tensor, height: int, width: int,
                             scale: Tuple[float, float], ratio: Tuple[float, float],
                             dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(m, 4) boxes (top, left, h, w) from ``draw_crop_uniforms``'s numbers: the arithmetic
    of ``sample_crop_boxes``, with no random draw and no host synchronisation."""
    area = float(height * width)
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    target_area = area * (scale[0] + (scale[1] - scale[0]) * u_s.double())
    aspect = torch.exp(log_r[0] + (log_r[1] - log_r[0]) * u_r.double())
    w = torch.round(torch.sqrt(target_area * aspect))
    h = torch.round(torch.sqrt(target_area / aspect))
    valid = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = torch.argmax(valid.to(torch.int8), dim=1, keepdim=True)  # first True (0 if none)
    ok = valid.any(dim=1)
    h = torch.gather(h, 1, first)[:, 0]
    w = torch.gather(w, 1, first)[:, 0]
    top = torch.floor(u_ij[:, 0].double() * (height - h + 1)).clamp_max(height - h)
    left = torch.floor(u_ij[:, 1].double() * (width - w + 1)).clamp_max(width - w)
    # Python-scalar fallbacks: no host-to-device copy (CUDA-graph capturable)
    fb = fallback_crop_box(height, width, ratio)
    return torch.stack([torch.where(ok, v, float(f)) for v, f in zip((top, left, h, w), fb)], dim=1).to(dtype)


def sample_flip_shift(
    n: int,
    jitter: Union[int, Sequence[int]] = 0,
    flip_p: float = 0.5,
    per_image: bool = True,
    generator: Optional[torch.Generator] = None,
    device: Optional[Union[str, torch.device]] = None,
    symmetric: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Random horizontal flips and roll shifts, drawn on the device.

    Returns ``flip`` (n,) bool, True with probability ``flip_p``, and ``shift``
    (n, 2) int64 with shift[:, 0] uniform in [0, jitter_h] and shift[:, 1] in
    [0, jitter_w], both ends inclusive like ``random.randint(0, jitter)`` in
    the SRe2L ImageNet recovery loop (``jitter`` an int or (jitter_h, jitter_w));
    ``symmetric=True``: in [-jitter, jitter], like its Tiny-ImageNet loop.
    ``per_image=False`` draws one flip and one shift for the whole batch.
    Draws: flips, then (an int ``jitter`` > 0) one ``torch.randint`` of the
    shifts; ``jitter=0`` draws no shift (zeros).
    """
    dev = _device(generator, device)
    m = n if per_image else 1
    jh, jw = (int(jitter), int(jitter)) if isinstance(jitter, int) else (int(jitter[0]), int(jitter[1]))
    if jh < 0 or jw < 0:
        raise ValueError(f"sample_flip_shift: jitter must be >= 0, got {jitter}")
    flip = torch.rand((m,), generator=generator, device=dev) < flip_p
    lh, lw = (-jh, -jw) if symmetric else (0, 0)
    if jh == jw == 0:
        shift = torch.zeros((m, 2), dtype=torch.int64, device=dev)
    elif jh == jw:
        shift = torch.randint(lh, jh + 1, (m, 2), generator=generator, device=dev)
    else:
        u = torch.rand((m, 2), generator=generator, device=dev).double()
        sh = torch.floor(u[:, 0] * (jh - lh + 1)).clamp_max(jh - lh) + lh
        sw = torch.floor(u[:, 1] * (jw - lw + 1)).clamp_max(jw - lw) + lw
        shift = torch.stack([sh, sw], dim=1).long()
    if not per_image:
        flip = flip.expand(n).contiguous()
        shift = shift.expand(n, 2).contiguous()
    return flip, shift
