"""Warm-up and timing of the providers (interleaved or sequential), their statistics and ratios."""
from __future__ import annotations

import gc
import math
import os
import statistics
import time
import traceback

import torch

from .configs import BASELINES, FLOOR, REFERENCE, REFERENCE_COMPILED
from .device import sync
from .floor import matmul_rate
from .providers import Context, build_provider
from .rss import NoSampler, RSSSampler


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
        self.enqueue_times: list[float] = []
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
            sampler = RSSSampler() if dev.type == "cpu" else NoSampler()
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
            # the time to issue the step, before waiting for the device: near the whole
            # iteration's time, the host is what bounds it (on a GPU)
            self.enqueue_times.append(1000 * (time.perf_counter() - t))
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
        """torch.profiler of a few warm iterations: a table sorted by device time, on a GPU
        a second one sorted by host time, the host and device time per iteration in the
        record (host time above device time: the step is bound by the host, and the GPU
        waits between launches), and a gzipped Chrome trace beside the table, where the gaps
        between kernels can be read."""
        from torch.profiler import ProfilerActivity, profile

        gpu = self.dev.type == "cuda"
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
        with profile(activities=acts) as prof:
            for _ in range(steps):
                self._step()
            sync(self.dev)
        events = prof.key_averages()
        host_us = sum(e.self_cpu_time_total for e in events)
        self.rec["profile_host_ms_per_iteration"] = host_us / 1000 / steps
        if gpu:
            device_us = sum(getattr(e, "self_device_time_total", 0) for e in events)
            self.rec["profile_device_ms_per_iteration"] = device_us / 1000 / steps
        keys = ["self_cuda_time_total", "self_cpu_time_total"] if gpu else ["self_cpu_time_total"]
        with open(path, "w") as f:
            for key in keys:
                f.write(f"# torch.profiler, {self.name}, {steps} iterations, sorted by {key}\n")
                f.write(events.table(sort_by=key, row_limit=45, max_name_column_width=160))
                f.write("\n")
        trace = os.path.splitext(path)[0] + ".trace.json.gz"
        prof.export_chrome_trace(trace)   # gzipped by torch for a .gz path
        self.rec["profile"] = os.path.basename(path)
        self.rec["profile_trace"] = os.path.basename(trace)

    def finish(self) -> dict:
        if self.rec.get("status") == "error":
            return self.rec
        try:
            if self.name in self.ctx.profile and self.ctx.profile_dir:
                self.profile(os.path.join(self.ctx.profile_dir, f"profile_{self.ctx.config_name}_{self.name}.txt"))
            rec = self.rec
            rec["status"] = "ok"
            rec.update(_stats(self.times, self.p.images_per_iteration))
            rec["host_enqueue_ms_per_iteration_median"] = statistics.median(self.enqueue_times)
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
