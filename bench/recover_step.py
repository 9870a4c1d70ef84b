"""One recovery iteration, side by side: the original SRe2L code's way, the same
with AMP + torch.compile, srel-fast's fast path (and one ablation per switch),
one update of DM and of MTT, and the floor (forward + input-gradient backward
of the model alone, and its matmul/conv FLOPs over the measured matrix rate).

    srel-fast bench recover-step --config convnet4-64 [--small] [--device cuda]
    python -m bench.recover_step --config resnet18-224

Unit: milliseconds per synthetic image per iteration (the SRe2L paper's unit),
plus peak device memory. For recovery an iteration updates ``batch`` images;
for DM and MTT an iteration (one update of the whole synthetic set) updates
num_classes * ipc images, so their per-image figure is the iteration time
divided by that count.

Results go to ``--out-dir`` (default bench/results/) as
recover_step_<config>[_small]_<cpu|gpu>.{json,md,png}.
"""
from __future__ import annotations

import argparse
import copy
import datetime as _dt
import gc
import json
import math
import os
import platform
import random
import shlex
import statistics
import sys
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # python bench/recover_step.py
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from srel_fast.bn_matching import ReferenceBNMatching  # noqa: E402
from srel_fast.data import Normalization  # noqa: E402
from srel_fast.models import IMAGENET_MEAN_STD, ModelSpec, build_model  # noqa: E402
from srel_fast.recover import RecoverConfig, Recoverer, cosine_lr  # noqa: E402
from srel_fast.recover import fast_path as device_fast_path  # noqa: E402

from bench.baselines import DMConfig, DMStep, MTTConfig, MTTStep  # noqa: E402

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

REFERENCE = "reference"
REFERENCE_COMPILED = "reference-compiled"
SREL_FAST = "srel-fast"
FLOOR = "floor"
FLOOR_EAGER = "floor-eager"

# srel-fast and its ablations: each switches one thing off (RecoverConfig overrides).
SREL_FAST_VARIANTS = {
    "srel-fast": {},
    "srel-fast-no-compile": {"compile": False, "cuda_graphs": False},
    "srel-fast-fp32": {"amp": "none"},
    # CUDA graphs cannot capture the torch crop path (host-side box sizes): off here.
    "srel-fast-torch-backend": {"backend": "torch", "cuda_graphs": False},
    # the extension's kernels as opaque custom ops under compile ("cuda" or "cpu" by device),
    # where auto hands the BN statistics to inductor as plain ops
    "srel-fast-custom-ops": {"backend": "extension"},
    # the CUDA fast path's switches where the device's default differs (on the CPU: is compiling,
    # bf16 or channels_last worth it there?)
    "srel-fast-compile": {"compile": True},
    "srel-fast-bf16": {"amp": "bf16"},
    "srel-fast-channels-last": {"channels_last": True},
    "srel-fast-no-channels-last": {"channels_last": False},
    "srel-fast-no-cuda-graphs": {"cuda_graphs": False},
    "srel-fast-batch-crop": {"crop_mode": "batch"},
}
CUDA_ONLY = {"srel-fast-no-cuda-graphs"}
ABLATIONS = [k for k in SREL_FAST_VARIANTS if k != SREL_FAST]


@dataclass
class BenchConfig:
    arch: str
    image_size: int
    num_classes: int
    batch: int
    providers: list[str]
    baselines: dict = field(default_factory=dict)  # provider name -> DMConfig | MTTConfig


def _recovery_providers(extra: list[str]) -> list[str]:
    return [REFERENCE, REFERENCE_COMPILED, SREL_FAST, *ABLATIONS, FLOOR, FLOOR_EAGER, *extra]


# The baselines at two conventions. The SRe2L paper's DM / MTT times (18.11 / 12.64 ms per
# image) read as IPC 1 on Tiny-ImageNet: one update of 200 images; "-ipc1" is that setting
# with the official IPC-1 MTT command (syn_steps 10, expert_epochs 2, max_start_epoch 10,
# batch_syn = all 200). "dm"/"mtt" are IPC 10 (MTT's Tiny IPC-10 command: syn_steps 20,
# max_start_epoch 40). Depth 3 is both official code bases' default ConvNet
# (get_default_convnet_setting); --baseline-depth 4 gives their ConvNetD4 (about 5% more FLOPs).
BASELINES = {
    "dm-ipc1": DMConfig(num_classes=200, ipc=1, image_size=64),
    "mtt-ipc1": MTTConfig(num_classes=200, ipc=1, image_size=64, syn_steps=10, max_start_epoch=10, batch_syn=None),
    "dm": DMConfig(num_classes=200, ipc=10, image_size=64),
    "mtt": MTTConfig(num_classes=200, ipc=10, image_size=64),
}


CONFIGS = {
    # ConvNet-4 (BN) at 64x64, 200 classes (Tiny-ImageNet), batch 100; DM and MTT at their
    # Tiny-ImageNet settings, IPC 1 (the paper's convention) and IPC 10.
    "convnet4-64": BenchConfig("convnet4", 64, 200, 100, _recovery_providers(list(BASELINES)),
                               baselines=dict(BASELINES)),
    "resnet18-224": BenchConfig("resnet18", 224, 1000, 100, _recovery_providers([])),
    "resnet50-224": BenchConfig("resnet50", 224, 1000, 100, _recovery_providers([])),
}


def small_config(cfg: BenchConfig) -> BenchConfig:
    """Sizes that run on a 2-core CPU in about a minute per config."""
    size = 32
    small = {}
    for name, b in cfg.baselines.items():
        ipc = min(b.ipc, 2)
        if isinstance(b, DMConfig):
            small[name] = replace(b, num_classes=4, ipc=ipc, image_size=size, batch_real=16, real_pool_per_class=32)
        else:
            small[name] = replace(b, num_classes=4, ipc=ipc, image_size=size, syn_steps=4,
                                  batch_syn=None if b.batch_syn is None else 4, buffer_epochs=4)
    return replace(cfg, image_size=size, batch=8, baselines=small)


# ----------------------------------------------------------------------------- environment
def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} logical cores, {torch.get_num_threads()} torch threads)"
    except OSError:
        pass
    return platform.processor() or "cpu"


def environment(device: torch.device) -> dict:
    env = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
           "host": platform.node(), "python": platform.python_version(), "torch": torch.__version__,
           "device": device_name(device), "device_kind": "gpu" if device.type == "cuda" else "cpu",
           "cuda": torch.version.cuda}
    for mod in ("triton", "torchvision"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            env[mod] = None
    try:
        from srel_fast.kernels import _ext

        env["srel_fast_extension"] = bool(_ext.ensure_loaded())
        env["srel_fast_extension_error"] = _ext.load_error()
    except Exception as exc:  # noqa: BLE001
        env["srel_fast_extension"] = False
        env["srel_fast_extension_error"] = repr(exc)
    return env


def fast_path(device: torch.device) -> dict:
    """The speed switches srel-fast uses by default on this device (srel_fast.recover.fast_path)."""
    return device_fast_path(device)


def resolve_amp(device: torch.device) -> tuple[torch.dtype | None, str]:
    """The AMP dtype of srel-fast's default fast path on the device: the precision that the
    floor and reference-compiled are measured at, so that they compare like with like."""
    amp = fast_path(device)["amp"]
    return {"bf16": (torch.bfloat16, "bf16"), "fp16": (torch.float16, "fp16")}.get(amp, (None, "fp32"))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- models
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


# ----------------------------------------------------------------------------- reference
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


# ----------------------------------------------------------------------------- srel-fast
class SrelFastRecovery:
    """srel_fast.recover.Recoverer's iteration: Recoverer.step (crops, loss,
    backward, Adam, clamp) plus run_batch's periodic loss check."""

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
        keys = ("amp", "channels_last", "compile", "cuda_graphs", "backend", "crop_mode", "check_every")
        return {k: getattr(self.cfg, k) for k in keys}

    def step(self, it: int) -> torch.Tensor:
        loss, _, _ = self.rec.step(self.x, self.targets, self.gen, self.optimizer, it)
        if it % self.cfg.check_every == 0 or it == self.cfg.iterations - 1:
            math.isfinite(loss.item())  # run_batch's check (a device sync)
        return loss.detach()

    def close(self) -> None:
        self.rec.__exit__(None, None, None)


# ----------------------------------------------------------------------------- floor
class FloorStep:
    """Forward + input-gradient backward of the model alone (frozen weights,
    no BN term, no crops), at srel-fast's precision and memory format;
    torch.compile'd (``floor``) or eager (``floor-eager``)."""

    def __init__(self, model: torch.nn.Module, image_size: int, batch: int, device: torch.device,
                 amp: torch.dtype | None, channels_last: bool, seed: int = 0, compiled: bool = True):
        self.model = model.to(device).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        if channels_last:
            self.model = self.model.to(memory_format=fmt)
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn((batch, 3, image_size, image_size), generator=g).to(device)
        self.x = self.x.contiguous(memory_format=fmt).requires_grad_(True)
        self.device, self.amp = device, amp
        self.images_per_iteration = batch
        self.forward = torch.compile(self._forward, dynamic=False) if compiled else self._forward

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
            out = self.model(x)
        return out.float().sum()

    def step(self, it: int = 0) -> torch.Tensor:
        self.x.grad = None
        loss = self.forward(self.x)
        loss.backward()
        return loss.detach()

    def flops(self) -> dict:
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        with counter:
            self.x.grad = None
            self._forward(self.x).backward()  # eager: the counter sees every aten op
        counts = counter.get_flop_counts().get("Global", {})
        conv = sum(v for k, v in counts.items() if "convolution" in str(k))
        return {"flops_total": int(counter.get_total_flops()), "flops_conv": int(conv),
                "flops_by_op": {str(k): int(v) for k, v in counts.items()}}


def matmul_rate(device: torch.device, dtype: torch.dtype, small: bool) -> dict:
    """Best-of-k time of an n x n x n matmul at ``dtype``: the device's matrix rate."""
    n = 1024 if small else (8192 if device.type == "cuda" else 2048)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    for _ in range(2):
        a @ b
    sync(device)
    best = float("inf")
    for _ in range(5 if small else 10):
        t = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t)
    return {"n": n, "dtype": str(dtype).replace("torch.", ""), "seconds": best, "tflops": 2 * n ** 3 / best / 1e12}


# ----------------------------------------------------------------------------- timing
class RSSSampler:
    """Peak resident-set-size growth over the start value, sampled every 2 ms
    from /proc/self/statm (CPU runs; no tracemalloc). Allocator caching makes
    it an indication only: memory freed by an earlier provider is reused."""

    def __init__(self):
        self.page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
        self.start = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _rss(self) -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * self.page
        except OSError:
            return 0

    def _run(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self._rss())

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def delta_mb(self) -> float:
        return (self.peak - self.start) / 2 ** 20


def _quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    pos = (len(xs) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _stats(ms: list[float], images: int) -> dict:
    per_img = [m / images for m in ms]
    q1, q3 = _quantile(per_img, 0.25), _quantile(per_img, 0.75)
    return {
        "images_per_iteration": images,
        "ms_per_image_median": statistics.median(per_img),
        "ms_per_image_min": min(per_img),
        "ms_per_image_max": max(per_img),
        "ms_per_image_q1": q1,
        "ms_per_image_q3": q3,
        "ms_per_image_iqr": q3 - q1,
        "ms_per_iteration_median": statistics.median(ms),
        "ms_per_iteration_all": ms,
    }


class Running:
    """A provider that has been built and warmed up, and is timed one iteration at a time."""

    def __init__(self, name: str, ctx: "Context"):
        self.name, self.ctx, self.dev = name, ctx, ctx.device
        self.p = None
        self.rec: dict = {"provider": name}
        self.times: list[float] = []
        self.it = 0
        self.loss = None

    def _step(self):
        self.loss = self.p.step(self.it)
        self.it += 1

    def start(self) -> bool:
        """Build, run the first iteration (compiles; timed as first_iteration_s), then the
        rest of the warm-up, over which the peak memory of this provider is measured
        (CUDA: max_memory_allocated minus what was allocated before it was built)."""
        ctx, dev = self.ctx, self.dev
        try:
            gc.collect()
            sync(dev)
            base = torch.cuda.memory_allocated(dev) if dev.type == "cuda" else 0
            t = time.perf_counter()
            self.p, settings = build_provider(self.name, ctx)
            self.rec["settings"] = settings
            self.rec["setup_s"] = time.perf_counter() - t
            sync(dev)
            t = time.perf_counter()
            self._step()
            sync(dev)
            self.rec["first_iteration_s"] = time.perf_counter() - t
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            sampler = RSSSampler() if dev.type == "cpu" else _Null()
            with sampler:
                for _ in range(max(1, ctx.warmup - 1)):
                    self._step()
                sync(dev)
            if dev.type == "cuda":
                self.rec["peak_memory_mb"] = (torch.cuda.max_memory_allocated(dev) - base) / 2 ** 20
                self.rec["persistent_memory_mb"] = (torch.cuda.memory_allocated(dev) - base) / 2 ** 20
            else:
                self.rec["peak_memory_mb"] = None
                self.rec["cpu_rss_delta_mb"] = sampler.delta_mb
            return True
        except Exception as exc:  # noqa: BLE001 - a failing provider is recorded, not fatal
            self.fail(exc)
            return False

    def time_one(self) -> bool:
        try:
            sync(self.dev)
            t = time.perf_counter()
            self._step()
            sync(self.dev)
            self.times.append(1000 * (time.perf_counter() - t))
            return True
        except Exception as exc:  # noqa: BLE001
            self.fail(exc)
            return False

    def fail(self, exc: BaseException) -> None:
        msg = str(exc).strip()
        self.rec["status"] = "error"
        self.rec["error"] = f"{type(exc).__name__}: {msg.splitlines()[0] if msg else ''}"
        self.rec["traceback"] = traceback.format_exc(limit=6)[-3000:]
        self.close()

    def profile(self, path: str, steps: int = 3) -> None:
        """torch.profiler table of a few warm iterations (kernels sorted by device time)."""
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.dev.type == "cuda" else [])
        with profile(activities=acts) as prof:
            for _ in range(steps):
                self._step()
            sync(self.dev)
        key = "self_cuda_time_total" if self.dev.type == "cuda" else "self_cpu_time_total"
        with open(path, "w") as f:
            f.write(f"# torch.profiler, {self.name}, {steps} iterations, sorted by {key}\n")
            f.write(prof.key_averages().table(sort_by=key, row_limit=45, max_name_column_width=160))
        self.rec["profile"] = os.path.basename(path)

    def finish(self) -> dict:
        if self.rec.get("status") == "error":
            return self.rec
        try:
            if self.name in self.ctx.profile and self.ctx.profile_dir:
                self.profile(os.path.join(self.ctx.profile_dir, f"profile_{self.ctx.config_name}_{self.name}.txt"))
            rec = self.rec
            rec["status"] = "ok"
            rec.update(_stats(self.times, self.p.images_per_iteration))
            rec["compile_s"] = max(0.0, rec["first_iteration_s"] - rec["ms_per_iteration_median"] / 1000)
            loss_v = float(self.loss.float().sum()) if torch.is_tensor(self.loss) else float(self.loss)
            rec["loss"], rec["loss_finite"] = loss_v, math.isfinite(loss_v)
            rec["warmup"], rec["repeats"] = self.ctx.warmup, len(self.times)
            if self.name == FLOOR:
                fl = self.p.flops()
                rate = matmul_rate(self.dev, self.ctx.amp or torch.float32, self.ctx.small)
                n = self.p.images_per_iteration
                rec["flops"], rec["matmul"] = fl, rate
                rec["flops_floor_ms_per_image"] = 1000 * fl["flops_total"] / (rate["tflops"] * 1e12) / n
                rec["conv_flops_floor_ms_per_image"] = 1000 * fl["flops_conv"] / (rate["tflops"] * 1e12) / n
        except Exception as exc:  # noqa: BLE001
            self.fail(exc)
        self.close()
        return self.rec

    def close(self) -> None:
        if self.p is not None and hasattr(self.p, "close"):
            try:
                self.p.close()
            except Exception:  # noqa: BLE001
                pass
        self.p = None
        gc.collect()
        if self.dev.type == "cuda":
            torch.cuda.empty_cache()


def run_providers(names: list[str], ctx: "Context", schedule: str = "interleaved", log=None) -> list[dict]:
    """``interleaved`` (default): build and warm up every provider, then time them in
    rounds of one iteration each (alternating direction), so that a shared or
    throttling machine slows all providers alike; ``sequential``: one provider at a
    time, alone on the device."""
    log = log or (lambda msg: None)
    results: dict[str, dict] = {}
    if schedule == "sequential":
        for name in names:
            r = Running(name, ctx)
            t = time.perf_counter()
            if r.start():
                for _ in range(ctx.repeats):
                    if not r.time_one():
                        break
            results[name] = r.finish()
            results[name]["wall_s"] = time.perf_counter() - t
            _log_result(log, results[name])
            _dynamo_reset()
        return [results[n] for n in names]
    live = []
    for name in names:
        r = Running(name, ctx)
        t = time.perf_counter()
        ok = r.start()
        r.rec["wall_s"] = time.perf_counter() - t
        log(f"  {name:28s} " + (f"warm (first it {r.rec['first_iteration_s']:.2f} s)" if ok else r.rec["error"]))
        if ok:
            live.append(r)
        else:
            results[name] = r.rec
    for k in range(ctx.repeats):
        order = live if k % 2 == 0 else live[::-1]
        for r in order:
            if r.rec.get("status") != "error":
                r.time_one()
    for r in live:
        results[r.name] = r.finish()
        _log_result(log, results[r.name])
    _dynamo_reset()
    return [results[n] for n in names]


def _log_result(log, rec: dict) -> None:
    if rec.get("status") == "ok":
        log(f"  {rec['provider']:28s} {rec['ms_per_image_median']:.4g} ms/img/it "
            f"(min {rec['ms_per_image_min']:.4g}, first it {rec['first_iteration_s']:.2f} s)")
    else:
        log(f"  {rec['provider']:28s} {rec.get('error')}")


def _dynamo_reset() -> None:
    try:
        torch._dynamo.reset()
    except Exception:  # noqa: BLE001
        pass


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# ----------------------------------------------------------------------------- providers
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


def run_provider(name: str, ctx: Context) -> dict:
    """One provider alone: build, warm up, time ``ctx.repeats`` iterations."""
    return run_providers([name], ctx, "sequential")[0]


def add_ratios(results: list[dict]) -> None:
    by = {r["provider"]: r for r in results if r.get("status") == "ok"}
    for r in results:
        if r.get("status") != "ok":
            continue
        for other in (REFERENCE, REFERENCE_COMPILED, *BASELINES):
            if other in by:
                r[f"speedup_vs_{other}"] = by[other]["ms_per_image_median"] / r["ms_per_image_median"]
                r[f"speedup_vs_{other}_from_min"] = by[other]["ms_per_image_min"] / r["ms_per_image_min"]
        if FLOOR in by and r["provider"] != FLOOR:
            r["ratio_to_floor"] = r["ms_per_image_median"] / by[FLOOR]["ms_per_image_median"]


# ----------------------------------------------------------------------------- reports
def _fmt(v, nd=3):
    if v is None:
        return "-"
    if isinstance(v, float):
        if v == 0:
            return "0"
        return f"{v:.{nd}g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def markdown(record: dict) -> str:
    env, cfg = record["environment"], record["config"]
    gpu = env["device_kind"] == "gpu"
    lines = [f"# Recovery step: {record['config_name']} ({'small' if record['small'] else 'full'} sizes, "
             f"{env['device_kind'].upper()})", ""]
    if not gpu:
        lines += ["**CPU figures** (torch on CPU, small sizes): they test the suite; they are not GPU numbers.", ""]
    lines += [f"- device: {env['device']}; torch {env['torch']}, triton {env['triton']}, date {env['date']}",
              f"- command: `{record['command']}`",
              f"- model {cfg['arch']} at {cfg['image_size']}x{cfg['image_size']}, {cfg['num_classes']} classes, "
              f"recovery batch {cfg['batch']}; AMP dtype used: {record['amp']}; warm-up {record['warmup']}, "
              f"timed repeats {record['repeats']} ({record['schedule']} schedule)",
              "- unit: ms per synthetic image per iteration (median over repeats; IQR = q3 - q1); "
              "x ref = reference time / this time (higher is faster), from medians; x ref (min) from the "
              "fastest iteration of each (less sensitive to a shared, loaded machine); / floor = this time / the "
              "compiled floor's (lower is better); x dm-ipc1 / x mtt-ipc1 against the baselines at IPC 1 (the "
              "paper's convention), x dm / x mtt at their IPC (10 unless --baseline-ipc)", ""]
    mem_col = "peak MB" if gpu else "RSS +MB"
    head = ["provider", "ms/img/it", "min", "max", "IQR", "ms/it", "img/it", "1st it s", mem_col,
            "x ref", "x ref (min)", "x ref-comp", "/ floor", *[f"x {b}" for b in BASELINES]]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for r in record["results"]:
        if r.get("status") != "ok":
            lines.append(f"| {r['provider']} | error: {r.get('error', '')[:90].replace('|', '/')} |" + " |" * (len(head) - 2))
            continue
        mem = r.get("peak_memory_mb") if gpu else r.get("cpu_rss_delta_mb")
        row = [r["provider"], _fmt(r["ms_per_image_median"]), _fmt(r["ms_per_image_min"]),
               _fmt(r["ms_per_image_max"]), _fmt(r["ms_per_image_iqr"], 2), _fmt(r["ms_per_iteration_median"]),
               str(r["images_per_iteration"]), _fmt(r["first_iteration_s"], 3), _fmt(mem, 4),
               _fmt(r.get("speedup_vs_reference"), 3), _fmt(r.get("speedup_vs_reference_from_min"), 3),
               _fmt(r.get("speedup_vs_reference-compiled"), 3), _fmt(r.get("ratio_to_floor"), 3),
               *[_fmt(r.get(f"speedup_vs_{b}"), 3) for b in BASELINES]]
        lines.append("| " + " | ".join(row) + " |")
    floor = next((r for r in record["results"] if r["provider"] == FLOOR and r.get("status") == "ok"), None)
    if floor is not None:
        fl, mm = floor["flops"], floor["matmul"]
        lines += ["", f"Floor: forward + input-gradient backward measured at {_fmt(floor['ms_per_image_median'])} "
                      f"ms/img; {fl['flops_total'] / 1e9:.3g} GFLOP per iteration ({fl['flops_conv'] / 1e9:.3g} in "
                      f"convolutions), matrix rate {mm['tflops']:.3g} TFLOP/s ({mm['dtype']} {mm['n']}^3 matmul) "
                      f"-> FLOP floor {_fmt(floor['flops_floor_ms_per_image'])} ms/img "
                      f"(convolutions alone {_fmt(floor['conv_flops_floor_ms_per_image'])} ms/img)."]
    lines += ["", "Providers:", ""]
    for r in record["results"]:
        lines.append(f"- `{r['provider']}`: {PROVIDER_DOC.get(r['provider'], '')} settings: "
                     f"`{json.dumps(r.get('settings', {}), sort_keys=True)}`")
    lines += ["", f"Memory: {record['memory_note']}", ""]
    return "\n".join(lines)


PROVIDER_DOC = {
    REFERENCE: "the official SRe2L recovery loop (data_synthesis.py): frozen model, fp32, eager, BN forward "
               "hooks (mean + permute/contiguous/var), host-drawn batch-wide RandomResizedCrop + flip + roll, "
               "Adam, per-channel clamp.",
    REFERENCE_COMPILED: "the same loss with AMP and torch.compile of model + hooks + loss (crop eager).",
    SREL_FAST: "Recoverer with the device's default fast path (srel_fast.recover.FAST_PATH): on CUDA backend "
               "auto (under compile: BN statistics as plain ops fused by inductor, the crop kernel as a custom op), "
               "bf16, channels_last, torch.compile, CUDA graphs, fused Adam; on the CPU the C++ kernels, fp32, "
               "eager; per-image crops drawn on the device.",
    "srel-fast-no-compile": "srel-fast without torch.compile / CUDA graphs.",
    "srel-fast-fp32": "srel-fast without AMP.",
    "srel-fast-torch-backend": "srel-fast with the original code's BN hooks and the per-image torch crop under "
                               "compile (no CUDA graphs: the torch crop reads box sizes on the host).",
    "srel-fast-custom-ops": "srel-fast with the extension's fused BN-statistics and crop kernels as opaque custom ops "
                            "under compile (backend cuda / cpu); srel-fast's auto gives inductor the BN statistics "
                            "as plain ops instead, to fuse with the layers around them.",
    "srel-fast-no-channels-last": "srel-fast without channels_last.",
    "srel-fast-compile": "srel-fast with torch.compile (the default on CUDA, not on the CPU).",
    "srel-fast-bf16": "srel-fast with bf16 autocast (the default on CUDA, not on the CPU).",
    "srel-fast-channels-last": "srel-fast with channels_last (the default on CUDA, not on the CPU).",
    "srel-fast-no-cuda-graphs": "srel-fast without CUDA graphs (CUDA only).",
    "srel-fast-batch-crop": "srel-fast with one crop per batch (the paper's augmentation) instead of per image.",
    FLOOR: "model forward + input-gradient backward only (frozen weights, no BN term, no crops), srel-fast's "
           "precision and memory format, torch.compile'd.",
    FLOOR_EAGER: "the floor without torch.compile.",
    "dm": "one Distribution Matching update (Zhao & Bilen) at IPC 10 (or --baseline-ipc): fresh random ConvNet "
          "(instance norm, depth 3 unless --baseline-depth), DSA color_crop_cutout_flip_scale_rotate (Siamese), "
          "per class batch_real real (fetched per class) + IPC synthetic embeddings, sum of squared mean "
          "differences, SGD(lr 1, momentum 0.5) on the images; per image = / (classes * ipc).",
    "mtt": "one MTT update (Cazenavette et al.) at IPC 10 (Tiny command: syn_steps 20, batch_syn 200): ConvNet "
           "(instance norm) run functionally on a flat parameter vector, syn_steps unrolled SGD steps with "
           "create_graph on DSA-augmented minibatches of batch_syn synthetic images with learnable syn_lr, "
           "normalised parameter distance to the expert epoch start + expert_epochs, backward into images and "
           "syn_lr; per image = / (classes * ipc).",
    "dm-ipc1": "dm at IPC 1 (200 images per update): the convention of the SRe2L paper's DM time.",
    "mtt-ipc1": "mtt at IPC 1 with the official IPC-1 settings (syn_steps 10, batch_syn = all 200 images, "
                "max_start_epoch 10): the convention of the SRe2L paper's MTT time.",
}


def plot(record: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in record["results"] if r.get("status") == "ok"]
    gpu = record["environment"]["device_kind"] == "gpu"
    names = [r["provider"] for r in ok]
    vals = [r["ms_per_image_median"] for r in ok]
    err_lo = [r["ms_per_image_median"] - r["ms_per_image_q1"] for r in ok]
    err_hi = [r["ms_per_image_q3"] - r["ms_per_image_median"] for r in ok]
    mems = [(r.get("peak_memory_mb") if gpu else r.get("cpu_rss_delta_mb")) for r in ok]
    fig, axes = plt.subplots(1, 2, figsize=(13, 0.45 * max(4, len(ok)) + 1.5))
    colors = ["tab:red" if n.startswith("reference") else "tab:green" if n.startswith("srel-fast")
              else "tab:gray" if n.startswith(FLOOR) else "tab:blue" for n in names]
    y = list(range(len(ok)))
    axes[0].barh(y, vals, xerr=[err_lo, err_hi], color=colors)
    axes[0].set_yticks(y, names)
    axes[0].invert_yaxis()
    axes[0].set_xscale("log")
    axes[0].set_xlabel("ms per image per iteration (median, IQR bars; log)")
    for yi, v in zip(y, vals):
        axes[0].text(v, yi, f" {v:.3g}", va="center", fontsize=8)
    mv = [m if m is not None else 0.0 for m in mems]
    axes[1].barh(y, mv, color=colors)
    axes[1].set_yticks(y, names)
    axes[1].invert_yaxis()
    axes[1].set_xlabel("peak device memory (MB)" if gpu else "CPU: sampled RSS growth (MB, indicative)")
    env, cfg = record["environment"], record["config"]
    fig.suptitle(f"recovery step, {record['config_name']} ({cfg['arch']} {cfg['image_size']}px, batch {cfg['batch']}"
                 f"{', small sizes' if record['small'] else ''}) on {env['device_kind'].upper()}: {env['device'][:60]}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render(json_path: str) -> int:
    """Rewrite <stem>.md and <stem>.png from <stem>.json (ratios recomputed)."""
    with open(json_path) as f:
        record = json.load(f)
    record.setdefault("schedule", "sequential")
    add_ratios(record["results"])
    stem = json_path[:-5] if json_path.endswith(".json") else json_path
    with open(json_path, "w") as f:
        json.dump(record, f, indent=1, default=str)
    md = markdown(record)
    with open(stem + ".md", "w") as f:
        f.write(md)
    plot(record, stem + ".png")
    print(md)
    return 0


def output_stem(config_name: str, small: bool, device: torch.device) -> str:
    return f"recover_step_{config_name}{'_small' if small else ''}_{'gpu' if device.type == 'cuda' else 'cpu'}"


# ----------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="srel-fast bench recover-step", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="convnet4-64", choices=sorted(CONFIGS))
    ap.add_argument("--device", default="auto", help="auto (cuda if available) | cuda | cpu")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--small", dest="small", action="store_true", default=None,
                   help="small sizes (batch 8, 32x32, small DM/MTT); the default on CPU")
    g.add_argument("--full", dest="small", action="store_false", help="paper sizes even on CPU")
    ap.add_argument("--providers", default=None,
                    help="comma-separated subset (default: all of the config's); see --list")
    ap.add_argument("--skip", default="", help="comma-separated providers to leave out")
    ap.add_argument("--list", action="store_true", help="print the config's providers and exit")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up iterations (default 5 on GPU, 2 on CPU)")
    ap.add_argument("--repeats", type=int, default=None, help="timed iterations (default 20 on GPU, 7 on CPU)")
    ap.add_argument("--batch", type=int, default=None, help="override the recovery batch")
    ap.add_argument("--image-size", type=int, default=None, help="override the resolution")
    ap.add_argument("--baseline-ipc", type=int, default=None,
                    help="IPC of the dm/mtt providers (default 10; 2 when small); dm-ipc1/mtt-ipc1 stay at IPC 1")
    ap.add_argument("--baseline-depth", type=int, default=None,
                    help="ConvNet depth of DM and MTT (default 3, the official default; 4 = their ConvNetD4)")
    ap.add_argument("--mtt-syn-steps", type=int, default=None)
    ap.add_argument("--mtt-batch-syn", type=int, default=None)
    ap.add_argument("--dm-batch-real", type=int, default=None)
    ap.add_argument("--check-every", type=int, default=10, help="srel-fast loss check interval (run_batch's check_every)")
    ap.add_argument("--schedule", choices=("interleaved", "sequential"), default="interleaved",
                    help="interleaved: time all providers in rounds of one iteration each (default; fair on a "
                         "shared machine); sequential: one provider at a time, alone")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--profile", default="",
                    help="comma-separated providers to profile (torch.profiler table written to --out-dir)")
    ap.add_argument("--out-dir", default=RESULTS_DIR)
    ap.add_argument("--no-write", action="store_true", help="print the table only")
    ap.add_argument("--render", metavar="JSON", default=None,
                    help="re-render the Markdown table and chart of a saved result JSON (no measurement)")
    return ap


def resolve_config(ns, device: torch.device) -> tuple[BenchConfig, bool]:
    cfg = CONFIGS[ns.config]
    small = ns.small if ns.small is not None else device.type != "cuda"
    if small:
        cfg = small_config(cfg)
    if ns.batch is not None:
        cfg = replace(cfg, batch=ns.batch)
    if ns.image_size is not None:
        size = ns.image_size
        cfg = replace(cfg, image_size=size,
                      baselines={k: replace(b, image_size=size) for k, b in cfg.baselines.items()})
    baselines = {}
    for name, b in cfg.baselines.items():
        b = replace(b, depth=ns.baseline_depth or b.depth)
        if name in ("dm", "mtt"):  # the IPC-1 providers keep the paper's convention
            b = replace(b, ipc=ns.baseline_ipc or b.ipc)
        if isinstance(b, DMConfig):
            b = replace(b, batch_real=ns.dm_batch_real or b.batch_real)
        else:
            b = replace(b, syn_steps=ns.mtt_syn_steps or b.syn_steps, batch_syn=ns.mtt_batch_syn or b.batch_syn)
        baselines[name] = b
    cfg = replace(cfg, baselines=baselines)
    providers = list(cfg.providers)
    if device.type != "cuda":
        providers = [p for p in providers if p not in CUDA_ONLY]
    if ns.providers:
        wanted = [p.strip() for p in ns.providers.split(",") if p.strip()]
        unknown = [p for p in wanted if p not in cfg.providers and p not in SREL_FAST_VARIANTS]
        if unknown:
            raise SystemExit(f"recover-step: unknown provider(s) for {ns.config}: {', '.join(unknown)}; "
                             f"choose from {', '.join(cfg.providers)}")
        providers = wanted
    skip = {p.strip() for p in ns.skip.split(",") if p.strip()}
    providers = [p for p in providers if p not in skip]
    return replace(cfg, providers=providers), small


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ns = build_parser().parse_args(argv)
    if ns.render:
        return render(ns.render)
    if ns.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(ns.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            print("recover-step: --device cuda requested but no CUDA device is available.", file=sys.stderr)
            return 2
    cfg, small = resolve_config(ns, device)
    if ns.list:
        print("\n".join(cfg.providers))
        return 0
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as the original SRe2L code
    for knob in ("recompile_limit", "cache_size_limit"):  # one compiled loss per provider, all alive at once
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, max(64, getattr(torch._dynamo.config, knob)))
    amp, amp_name = resolve_amp(device)
    warmup = ns.warmup if ns.warmup is not None else (5 if device.type == "cuda" else 2)
    repeats = ns.repeats if ns.repeats is not None else (20 if device.type == "cuda" else 7)
    ctx = Context(ns.config, cfg, device, amp, amp_name, small, max(1, warmup), max(1, repeats), ns.seed,
                  ns.check_every, tuple(p for p in ns.profile.split(",") if p), None if ns.no_write else ns.out_dir)
    if ctx.profile_dir:
        os.makedirs(ctx.profile_dir, exist_ok=True)
    command = shlex.join(["srel-fast", "bench", "recover-step", *argv])
    print(f"recover-step {ns.config} on {device_name(device)} ({'small' if small else 'full'} sizes, amp {amp_name}): "
          f"{', '.join(cfg.providers)}", file=sys.stderr)
    t_all = time.perf_counter()
    results = run_providers(cfg.providers, ctx, ns.schedule, log=lambda m: print(m, file=sys.stderr, flush=True))
    add_ratios(results)
    cfg_dict = asdict(cfg)
    record = {
        "benchmark": "recover_step",
        "config_name": ns.config,
        "small": small,
        "command": command,
        "python_argv": list(sys.argv),
        "environment": environment(device),
        "config": cfg_dict,
        "amp": amp_name,
        "warmup": ctx.warmup,
        "repeats": ctx.repeats,
        "seed": ns.seed,
        "schedule": ns.schedule,
        "unit": "ms per synthetic image per iteration",
        "memory_note": ("peak_memory_mb = torch.cuda.max_memory_allocated over the warm-up iterations after the "
                        "first (reset_peak_memory_stats after it) minus the memory allocated before the provider was "
                        "built: the provider's own peak (model copy, images, optimizer state, activations)"
                        if device.type == "cuda" else
                        "CPU run: peak_memory_mb is null (no device memory); cpu_rss_delta_mb is the peak RSS growth "
                        "sampled every 2 ms over the warm-up iterations after the first (no tracemalloc), indicative "
                        "only (allocator caching)"),
        "results": results,
        "total_s": time.perf_counter() - t_all,
    }
    md = markdown(record)
    print(md)
    if not ns.no_write:
        os.makedirs(ns.out_dir, exist_ok=True)
        stem = os.path.join(ns.out_dir, output_stem(ns.config, small, device))
        with open(stem + ".json", "w") as f:
            json.dump(record, f, indent=1, default=str)
        with open(stem + ".md", "w") as f:
            f.write(md)
        try:
            plot(record, stem + ".png")
        except Exception as exc:  # noqa: BLE001
            print(f"recover-step: could not draw the chart ({exc})", file=sys.stderr)
        print(f"wrote {stem}.json/.md/.png", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
