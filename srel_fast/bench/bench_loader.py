"""Data-loader benchmark: images per second of each back-end of srel_fast.loaders.

Side by side in one process run, on the same JPEG ImageFolder tree and the
same LoaderConfig (transform, batch size, worker count):

* ``dali-cpu``  DALI with CPU operators (device_id=None), batches on the CPU
* ``torch``     torchvision ImageFolder transforms + DataLoader, batches on the
                CPU (or moved to CUDA with ``--device cuda``)
* ``dali-gpu``  DALI with mixed (nvJPEG) decode, batches on the GPU (only when
                CUDA and DALI are both present)

By default the tree is generated from Fashion-MNIST (``--per-class`` images
per class, upscaled to ``--src-size`` px, RGB JPEGs) in a temporary folder;
``--data DIR`` benchmarks an existing ImageFolder tree instead.

Each loader runs ``--warmup`` untimed epoch(s), then ``--epochs`` timed
epochs; the reported rate is the median over timed epochs of
images / wall seconds (the batch is consumed: for GPU batches the timing ends
with a synchronise).

    python -m srel_fast.bench.bench_loader --workers 2 --out bench/results/loader_cpu.json
    srel-fast bench loader --workers 2 --out bench/results/loader_cpu.json

``--out X.json`` writes the JSON record (device, versions, date, exact
command, per-loader img/s, ratios) and ``X.md`` with a Markdown table.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shlex
import statistics
import sys
import tempfile
import time

import torch

from srel_fast.loaders import LoaderConfig, build_loader, dali_available

from .environment import loader_environment

ALL_LOADERS = ("dali-cpu", "torch", "dali-gpu")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="srel-fast bench loader", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=None, help="existing ImageFolder tree (default: generate one from Fashion-MNIST)")
    p.add_argument("--per-class", type=int, default=300, help="generated tree: images per class (10 classes)")
    p.add_argument("--src-size", type=int, default=64, help="generated tree: JPEG side in px (upscaled from 28)")
    p.add_argument("--split", default="train", choices=("train", "test"), help="generated tree: Fashion-MNIST split")
    p.add_argument("--tree-dir", default=None, help="generated tree: write it here and keep it (default: temp dir)")
    p.add_argument("--mode", default="train", choices=("train", "val"),
                   help="train: random resized crop + flip; val: resize + centre crop")
    p.add_argument("--image-size", type=int, default=56, help="output side")
    p.add_argument("--channels", type=int, default=3, choices=(1, 3))
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers = DALI threads")
    p.add_argument("--epochs", type=int, default=3, help="timed epochs per loader")
    p.add_argument("--warmup", type=int, default=1, help="untimed epochs per loader")
    p.add_argument("--loaders", default="auto",
                   help=f"comma list of {', '.join(ALL_LOADERS)}; auto = all that can run here")
    p.add_argument("--device", default="cpu", help="where torch-loader batches land (cpu or cuda)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write JSON here and a Markdown table next to it (.md)")
    p.add_argument("--note", default=None, help="free-text remark stored with the results (e.g. machine load)")
    return p


def _available_loaders() -> list[str]:
    out = []
    if dali_available():
        out.append("dali-cpu")
    out.append("torch")
    if dali_available() and torch.cuda.is_available():
        out.append("dali-gpu")
    return out


def _count_tree(root: str) -> tuple[int, float]:
    n, size = 0, 0
    for dirpath, _, files in os.walk(root):
        for f in files:
            n += 1
            size += os.path.getsize(os.path.join(dirpath, f))
    return n, size / max(n, 1)


def run_one(name: str, data: str, ns: argparse.Namespace) -> dict:
    mean, std = IMAGENET_MEAN[: ns.channels], IMAGENET_STD[: ns.channels]
    if ns.channels == 1:
        mean, std = (0.5,), (0.5,)
    device = "cuda" if name == "dali-gpu" else (ns.device if name == "torch" else "cpu")
    cfg = LoaderConfig(root=data, train=ns.mode == "train", image_size=ns.image_size, batch_size=ns.batch_size,
                       mean=mean, std=std, channels=ns.channels, loader="dali" if name.startswith("dali") else "torch",
                       num_workers=ns.workers, seed=ns.seed, device=device)
    t0 = time.perf_counter()
    loader = build_loader(cfg)
    build_s = time.perf_counter() - t0
    rates, times, images = [], [], 0
    for ep in range(ns.warmup + ns.epochs):
        loader.set_epoch(ep)
        n = 0
        t = time.perf_counter()
        last = None
        for x, y in loader:
            n += x.shape[0]
            last = x
        if last is not None and last.is_cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t
        if ep >= ns.warmup:
            rates.append(n / dt)
            times.append(dt)
            images = n
    return {
        "loader": name,
        "backend": loader.backend,
        "device": str(loader.device),
        "img_per_s": statistics.median(rates),
        "img_per_s_epochs": rates,
        "epoch_s": times,
        "images_per_epoch": images,
        "batches_per_epoch": len(loader),
        "build_s": build_s,
    }


def to_markdown(record: dict) -> str:
    env, cfg = record["environment"], record["config"]
    lines = [
        "# Data-loader throughput",
        "",
        f"- date: {record['date']}",
        f"- command: `{record['command']}`",
        f"- device: {env['cpu']} ({env['cpu_affinity']} usable cores)" + (f", GPU {env['gpu']}" if env.get("gpu") else ""),
        f"- versions: torch {env['torch']}, torchvision {env['torchvision']}, DALI {env['dali']}, "
        f"Pillow {env['pillow']}, python {env['python']}",
        f"- data: {record['data']['description']}",
        f"- pipeline: {cfg['mode']}, {cfg['image_size']}x{cfg['image_size']}, {cfg['channels']} channel(s), "
        f"batch {cfg['batch_size']}, {cfg['workers']} workers / DALI threads, "
        f"{cfg['warmup']} warm-up + {cfg['epochs']} timed epochs (median)",
    ]
    if record.get("note"):
        lines.append(f"- note: {record['note']}")
    lines += [
        "",
        "| loader | batches on | img/s | vs torch |",
        "|---|---|---:|---:|",
    ]
    torch_rate = next((r["img_per_s"] for r in record["results"] if r["loader"] == "torch"), None)
    for r in record["results"]:
        ratio = f"{r['img_per_s'] / torch_rate:.2f}x" if torch_rate else "-"
        lines.append(f"| {r['loader']} | {r['device']} | {r['img_per_s']:.0f} | {ratio} |")
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ns = build_parser().parse_args(argv)
    names = _available_loaders() if ns.loaders == "auto" else [s.strip() for s in ns.loaders.split(",") if s.strip()]
    for n in names:
        if n not in ALL_LOADERS:
            print(f"srel-fast bench loader: unknown loader {n!r}; choose from {', '.join(ALL_LOADERS)}.",
                  file=sys.stderr)
            return 2
        if n.startswith("dali") and not dali_available():
            print(f"srel-fast bench loader: {n} needs NVIDIA DALI (pip install 'srel-fast[dali]').", file=sys.stderr)
            return 2
        if n == "dali-gpu" and not torch.cuda.is_available():
            print("srel-fast bench loader: dali-gpu needs a CUDA device.", file=sys.stderr)
            return 2

    tmp = None
    if ns.data:
        if not os.path.isdir(ns.data):
            print(f"srel-fast bench loader: --data {ns.data!r} is not a directory.", file=sys.stderr)
            return 2
        data = ns.data
        n_files, avg = _count_tree(data)
        desc = f"{data}: {n_files} files, {avg / 1024:.1f} KiB average"
    else:
        from .jpeg_tree import make_fashion_mnist_jpeg_tree

        if ns.tree_dir:
            data = ns.tree_dir
        else:
            tmp = tempfile.TemporaryDirectory(prefix="srel_loader_bench_")
            data = os.path.join(tmp.name, "tree")
        t = time.perf_counter()
        make_fashion_mnist_jpeg_tree(data, ns.per_class, split=ns.split, size=ns.src_size, rgb=ns.channels == 3)
        n_files, avg = _count_tree(data)
        desc = (f"Fashion-MNIST {ns.split}, {ns.per_class}/class x 10 classes = {n_files} JPEGs (quality 95), "
                f"28 px upscaled to {ns.src_size} px, {'RGB' if ns.channels == 3 else 'grey'}, "
                f"{avg / 1024:.1f} KiB average; written in {time.perf_counter() - t:.1f} s")
    print(f"data: {desc}", flush=True)

    results = []
    try:
        for name in names:
            r = run_one(name, data, ns)
            if r["images_per_epoch"] == 0:
                print(f"srel-fast bench loader: {name} yielded no full batch of {ns.batch_size} per epoch; "
                      "use more images (--per-class) or a smaller --batch-size.", file=sys.stderr)
                return 2
            results.append(r)
            print(f"{name:9s} {r['img_per_s']:9.0f} img/s   (epochs: "
                  + ", ".join(f"{v:.0f}" for v in r["img_per_s_epochs"]) + ")", flush=True)
    finally:
        if tmp is not None:
            tmp.cleanup()

    by = {r["loader"]: r["img_per_s"] for r in results}
    ratios = {}
    if "torch" in by:
        for k, v in by.items():
            if k != "torch":
                ratios[f"{k}/torch"] = v / by["torch"]
    for k, v in ratios.items():
        print(f"{k}: {v:.2f}x")

    record = {
        "benchmark": "loader",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(["srel-fast", "bench", "loader", *argv]),
        "python_argv": list(sys.argv),
        "environment": loader_environment(),
        "config": {k: v for k, v in vars(ns).items() if k not in ("out", "note")},
        "note": ns.note,
        "data": {"description": desc, "files": n_files, "avg_bytes": avg},
        "results": results,
        "ratios": ratios,
    }
    if ns.out:
        os.makedirs(os.path.dirname(os.path.abspath(ns.out)), exist_ok=True)
        with open(ns.out, "w") as f:
            json.dump(record, f, indent=1, default=str)
            f.write("\n")
        md = os.path.splitext(ns.out)[0] + ".md"
        with open(md, "w") as f:
            f.write(to_markdown(record))
        print(f"wrote {ns.out} and {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
