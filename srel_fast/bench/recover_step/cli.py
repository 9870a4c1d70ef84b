"""One recovery iteration, side by side: the original SRe2L code's way, the same
with AMP + torch.compile, srel-fast's fast path (and one ablation per switch),
one update of DM and of MTT, and the floor (forward + input-gradient backward
of the model alone, and its matmul/conv FLOPs over the measured matrix rate).

    srel-fast bench recover-step --config convnet4-64 [--small] [--device cuda]
    python -m srel_fast.bench.recover_step --config resnet18-224

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
import json
import os
import shlex
import sys
import time
from dataclasses import asdict, replace

import torch

from ..baselines import DMConfig
from .configs import CONFIGS, CUDA_ONLY, SREL_FAST_VARIANTS, BenchConfig, small_config
from ..environment import device_environment, device_name
from .device import resolve_amp
from .providers import Context
from .report import markdown, output_stem, plot, render
from .timing import add_ratios, run_providers

RESULTS_DIR = os.path.join("bench", "results")  # of the source checkout, run from its root


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
    ap.add_argument("--check-every", type=int, default=10, help="srel-fast loss check interval (run_group's check_every)")
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
        "environment": device_environment(device),
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
