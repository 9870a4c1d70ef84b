"""Distilled vs random real images on the built-in data sets (docs/results/quality.md).

For each IPC and seed: a random real subset (the seed picks it) trained with hard and with
soft labels, SRe2L's objective (the sre2l-tiny recipe's recovery at a reduced iteration
budget) and srel's recipe (the defaults), each student trained the same way (teacher online).
One JSON line per (data, ipc, seed, row) in OUT/rows.jsonl; rows already there are skipped,
so an interrupted run goes on where it stopped.

    python scripts/quality.py --data fashion-mnist --teacher T.pt --ipc 1,10,50 --seeds 0,1,2 --out OUT
    python scripts/quality.py --summarize OUT [OUT ...] > docs/results/quality.md
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

import torch

from srel_fast.data import load_builtin
from srel_fast.demo import random_real_subset
from srel_fast.models import ModelSpec, load_model
from srel_fast.recover import RecoverConfig, run_recover
from srel_fast.train import TrainConfig, load_synthetic, make_evaluator, train_student

ROWS = ("real-hard", "real-soft", "sre2l", "srel")


def student_config(args) -> TrainConfig:
    # The demo's student (srel-fast demo): AdamW lr 0.01, batch 50, crops 0.5-1, T 20.
    return TrainConfig(syn="", out="", val=args.data, arch="convnet3", width=args.width, epochs=args.train_epochs,
                       batch_size=50, optimizer="adamw", lr=0.01, weight_decay=0.01, min_scale=0.5, progress=False,
                       device="cpu")


def recover_row(row: str, args, ipc: int, seed: int, out: str) -> str:
    syn = os.path.join(out, f"{row}_ipc{ipc}_s{seed}")
    if row == "sre2l":
        cfg = RecoverConfig(out=syn, weights=args.teacher, recipe="sre2l-tiny", ipc=ipc, iterations=args.sre2l_iterations,
                            group_batches=10, seed=seed, device="cpu", progress=False, overwrite=True)
    else:
        cfg = RecoverConfig(out=syn, weights=args.teacher, ipc=ipc, seed=seed, device="cpu", progress=False,
                            overwrite=True, **dict(args.srel_overrides))
    run_recover(cfg)
    return syn


def run_one(row: str, args, ipc: int, seed: int, out: str) -> dict:
    teacher = load_model(args.teacher)
    spec = ModelSpec("convnet3", teacher.spec.num_classes, teacher.spec.in_channels, teacher.spec.image_size, args.width)
    t0 = time.perf_counter()
    if row.startswith("real"):
        from srel_fast.data import Normalization

        norm = Normalization(teacher.mean, teacher.std)
        data = load_builtin(args.data, "train", (teacher.meta.get("config") or {}).get("seed", 0))
        u8, labels = random_real_subset(data, ipc, seed)
        images = norm.normalize(u8)
    else:
        syn = recover_row(row, args, ipc, seed, out)
        images, labels, norm = load_synthetic(syn, teacher, torch.device("cpu"))
    t_data = time.perf_counter() - t0
    mode = "hard" if row == "real-hard" else "soft"
    cfg = dataclasses.replace(student_config(args), seed=seed, label_mode=mode)
    evaluate_fn = make_evaluator(args.data, norm, spec.image_size, torch.device("cpu"), seed=seed)
    res = train_student(images, labels, spec.num_classes, spec, cfg, evaluate_fn,
                        teacher=teacher.model if mode == "soft" else None)
    return {"data": args.data, "ipc": ipc, "seed": seed, "row": row, "acc": res["test_accuracy"],
            "teacher": args.teacher, "teacher_acc": teacher.meta.get("test_accuracy"),
            "data_seconds": t_data, "train_seconds": res["seconds"], "student": dataclasses.asdict(cfg),
            "srel_overrides": dict(args.srel_overrides) if row == "srel" else None}


def summarize(dirs: list[str]) -> None:
    rows = [json.loads(line) for d in dirs for line in open(os.path.join(d, "rows.jsonl"))]
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["data"], r["ipc"], r["row"]), []).append(r["acc"])
    for (data, ipc, row), accs in sorted(groups.items()):
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        print(f"| {data} | {ipc} | {row} | {statistics.mean(accs):.2f} +- {sd:.2f} | {len(accs)} |")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="fashion-mnist")
    ap.add_argument("--teacher")
    ap.add_argument("--ipc", default="10")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--train-epochs", type=int, default=300)
    ap.add_argument("--sre2l-iterations", type=int, default=1000)
    ap.add_argument("--srel", action="append", default=[], metavar="FIELD=VALUE",
                    help="override a recover field of the srel row (ablations), e.g. r_class=0")
    ap.add_argument("--tag", default="", help="suffix of the row name (ablations)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out")
    ap.add_argument("--summarize", nargs="*")
    args = ap.parse_args(argv)
    if args.summarize:
        return summarize(args.summarize)
    torch.set_num_threads(args.threads)
    overrides = []
    for item in args.srel:
        k, v = item.split("=", 1)
        try:
            overrides.append((k, json.loads(v)))   # numbers
        except json.JSONDecodeError:
            overrides.append((k, v))               # words

    args.srel_overrides = overrides
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "rows.jsonl")
    done = set()
    if os.path.exists(path):
        done = {(r["ipc"], r["seed"], r["row"]) for r in map(json.loads, open(path))}
    for ipc in map(int, args.ipc.split(",")):
        for seed in map(int, args.seeds.split(",")):
            for row in args.rows.split(","):
                name = row + args.tag if row == "srel" else row
                if (ipc, seed, name) in done:
                    continue
                rec = run_one(row, args, ipc, seed, args.out)
                rec["row"] = name
                with open(path, "a") as f:
                    f.write(json.dumps(rec) + "\n")
                print(f"{time.strftime('%H:%M:%S')} {args.data} ipc {ipc} seed {seed} {name}: {rec['acc']:.2f}",
                      file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
