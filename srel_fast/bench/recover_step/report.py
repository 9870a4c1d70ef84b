"""The recovery-step report: Markdown table, chart, and re-rendering of a saved result JSON."""
from __future__ import annotations

import json

import torch

from .configs import BASELINES, FLOOR, FLOOR_EAGER, REFERENCE, REFERENCE_COMPILED, SREL_FAST
from .timing import add_ratios


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
    issued = [r for r in record["results"] if r.get("status") == "ok" and "host_enqueue_ms_per_iteration_median" in r]
    if issued and record["environment"].get("device_kind") == "gpu":
        lines += ["", "Host time to issue one iteration (before waiting for the GPU), median ms, of the whole "
                      "iteration's: " + ", ".join(f"{r['provider']} {_fmt(r['host_enqueue_ms_per_iteration_median'])}"
                                                  f" of {_fmt(r['ms_per_iteration_median'])}" for r in issued)
                  + ". Near the whole, the host bounds the step."]
    for r in record["results"]:
        if "profile_host_ms_per_iteration" in r:
            device = r.get("profile_device_ms_per_iteration")
            bound = "" if device is None else (" (host-bound: the device waits between launches)"
                                               if r["profile_host_ms_per_iteration"] > device else " (device-bound)")
            lines += ["", f"Profile of `{r['provider']}` ({r['profile']}, trace {r['profile_trace']}): host "
                          f"{_fmt(r['profile_host_ms_per_iteration'])} ms per iteration"
                          + ("" if device is None else f", device {_fmt(device)} ms") + bound
                          + ", under the profiler."]
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
    SREL_FAST: "Recoverer with the device's default fast path (srel_fast.recover.fast_path): on CUDA backend "
               "auto (under compile: BN statistics as plain ops fused by inductor, the crop kernel as a custom op), "
               "bf16, channels_last, torch.compile, CUDA graphs, fused Adam; on the CPU the C++ kernels in eager "
               "mode, fused Adam, and bf16 with channels_last where the CPU computes bf16 natively (fp32 "
               "otherwise); per-image crops drawn on the device.",
    "srel-fast-no-compile": "srel-fast without torch.compile / CUDA graphs.",
    "srel-fast-fp32": "srel-fast without AMP.",
    "srel-fast-hooks": "srel-fast with the original code's BN hooks (--bn-matching hooks) and the per-image "
                       "plain-PyTorch crop (--backend torch) under compile (no CUDA graphs: the torch crop reads "
                       "box sizes on the host).",
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
