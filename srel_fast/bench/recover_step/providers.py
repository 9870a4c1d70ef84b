"""The run context and every provider of the recovery-step benchmark: each has
``step(it)``, ``images_per_iteration`` and maybe ``close()``."""
from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field, replace

import torch

from srel_fast.data import Normalization
from srel_fast.models import IMAGENET_MEAN_STD, ModelSpec, build_model
from srel_fast.recover import RecoverConfig, Recoverer

from ..baselines import DMConfig, DMStep, MTTStep
from .configs import (BASELINES, CUDA_ONLY, FLOOR, FLOOR_EAGER, REFERENCE, REFERENCE_COMPILED, SREL_FAST_VARIANTS,
                      BenchConfig)
from .device import fast_path
from .floor import FloorStep
from .reference import ReferenceRecovery


def make_teacher(arch: str, num_classes: int, image_size: int, seed: int) -> torch.nn.Module:
    """A randomly initialised BN model whose running statistics are non-trivial
    (a few train-mode forwards on random data); timing does not depend on values."""
    torch.manual_seed(seed)
    model = build_model(ModelSpec(arch, num_classes, 3, image_size))
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(4, 3, image_size, image_size) * 1.5 + 0.2)
    return model.eval()


class SrelFastRecovery:
    """srel_fast.recover.Recoverer's iteration: Recoverer.step (crops, loss,
    backward, Adam, clamp) plus run_group's periodic loss check."""

    def __init__(self, model: torch.nn.Module, norm: Normalization, image_size: int, num_classes: int, batch: int,
                 device: torch.device, total_iterations: int, overrides: dict, seed: int = 0):
        # speed switches not overridden: the device's default fast path (resolve_speed)
        base = dict(out="", batch_size=batch, iterations=total_iterations, crop_mode="image", seed=seed)
        base.update(overrides)
        if device.type != "cuda":
            base["cuda_graphs"] = False
        self.rec = Recoverer(model, norm, image_size, 3, RecoverConfig(**base), device)
        self.cfg = self.rec.cfg
        self.rec.__enter__()
        self.size = image_size
        self.x = self.rec.batch_images(batch, seed)
        self.targets = (torch.arange(batch) % num_classes).to(device)
        self.gen = torch.Generator(device=device).manual_seed(seed + 1)
        self.optimizer = self.rec.optimizer(self.x)
        self.images_per_iteration = batch

    def settings(self) -> dict:
        keys = ("amp", "channels_last", "compile", "cuda_graphs", "bn_matching", "backend", "crop_mode",
                "check_every")
        return {k: getattr(self.cfg, k) for k in keys}

    def step(self, it: int) -> torch.Tensor:
        loss, _, _ = self.rec.step(self.x, self.targets, self.gen, self.optimizer, it)
        if it % self.cfg.check_every == 0 or it == self.cfg.iterations - 1:
            math.isfinite(loss.item())  # run_group's check (a device sync)
        return loss.detach()

    def close(self) -> None:
        self.rec.__exit__(None, None, None)


@dataclass
class Context:
    config_name: str
    cfg: BenchConfig
    device: torch.device
    amp: torch.dtype | None
    amp_name: str
    small: bool
    warmup: int
    repeats: int
    seed: int = 0
    check_every: int = 1
    profile: tuple = ()                # providers to profile after timing
    profile_dir: str | None = None
    teacher: torch.nn.Module | None = None
    norm: Normalization = field(default_factory=lambda: Normalization(*IMAGENET_MEAN_STD))

    @property
    def total_iterations(self) -> int:
        return self.warmup + self.repeats

    def model(self) -> torch.nn.Module:
        if self.teacher is None:
            self.teacher = make_teacher(self.cfg.arch, self.cfg.num_classes, self.cfg.image_size, self.seed)
        return copy.deepcopy(self.teacher)


def build_provider(name: str, ctx: Context):
    """Returns (object with step(it), images_per_iteration and maybe close(), settings dict)."""
    c, dev = ctx.cfg, ctx.device
    if name in (REFERENCE, REFERENCE_COMPILED):
        compiled = name == REFERENCE_COMPILED
        amp = ctx.amp if compiled else None
        p = ReferenceRecovery(ctx.model(), ctx.norm, c.image_size, c.num_classes, c.batch, dev,
                              ctx.total_iterations, amp=amp, compiled=compiled, seed=ctx.seed)
        return p, {"amp": "bf16" if amp is not None else "fp32", "compile": compiled, "bn": "forward hooks",
                   "crop": "batch-wide, host-drawn, eager", "model": "frozen"}
    if name in SREL_FAST_VARIANTS:
        if name in CUDA_ONLY and dev.type != "cuda":
            raise RuntimeError(f"{name} is a CUDA-only ablation (no CUDA graphs on {dev.type})")
        over = dict(SREL_FAST_VARIANTS[name])
        if over.get("backend") == "extension":
            over["backend"] = dev.type
        over.setdefault("check_every", ctx.check_every)
        p = SrelFastRecovery(ctx.model(), ctx.norm, c.image_size, c.num_classes, c.batch, dev,
                             ctx.total_iterations, over, seed=ctx.seed)
        return p, p.settings()
    if name in (FLOOR, FLOOR_EAGER):
        compiled = name == FLOOR
        cl = fast_path(dev)["channels_last"]
        p = FloorStep(ctx.model(), c.image_size, c.batch, dev, ctx.amp, channels_last=cl, seed=ctx.seed,
                      compiled=compiled)
        return p, {"amp": ctx.amp_name, "channels_last": cl, "compile": compiled}
    if name in BASELINES:
        if name not in c.baselines:
            raise RuntimeError(f"{name} is only defined for the convnet4-64 config")
        b = replace(c.baselines[name], seed=ctx.seed)
        step = DMStep(b, dev) if isinstance(b, DMConfig) else MTTStep(b, dev)
        return step, asdict(b)
    raise ValueError(f"unknown provider {name!r}")
