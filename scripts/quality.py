"""Distilled vs random real images on the built-in data sets (docs/results/quality.md).

For each IPC and seed: a random real subset (the seed picks it) trained with hard and with
soft labels, SRe2L's objective (the sre2l-tiny recipe's recovery at a reduced iteration
budget) and srel's recipe (the defaults), each student trained the same way (teacher online).
One JSON line per (data, ipc, seed, row) in OUT/rows.jsonl; rows already there are skipped,
so an interrupted run goes on where it stopped.

    python scripts/quality.py --data fashion-mnist --teacher T.pt --ipc 1,10,50 --seeds 0,1,2 --out OUT
    python scripts/quality.py --summarize OUT|ROWS.jsonl [...] --json cells.json
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

from srel_fast.data import load_builtin, random_real_subset
from srel_fast.images import load_synthetic
from srel_fast.models import ModelSpec, load_model
from srel_fast.recipes import apply_recipe, with_student_rules
from srel_fast.recover import RecoverConfig, run_recover
from srel_fast.train import TrainConfig, make_evaluator, train_student

ROWS = ("real-hard", "real-soft", "sre2l", "srel", "srel-hard")


def student_config(args) -> TrainConfig:
    if args.student_defaults:  # `srel-fast train` with no tuning flag (srel recipe, ConvNet-3 width 128)
        fields = dict(ema=args.ema, cutmix=args.cutmix, epochs=args.train_epochs)
    else:  # the demo's student (srel-fast demo): AdamW lr 0.01, batch 50, crops 0.5-1, T 20
        fields = dict(ema=args.ema or 0.0, cutmix=args.cutmix or 0.0, width=args.width,
                      epochs=args.train_epochs or 300, batch_size=50, optimizer="adamw", lr=0.01,
                      weight_decay=0.01, min_scale=0.5)
    # --student FIELD=VALUE last: it wins over the flags above
    return TrainConfig(syn="", out="", val=args.data, arch="convnet3", progress=False, device="cpu",
                       **{**fields, **dict(args.student_overrides)})


def parse_overrides(items: list[str]) -> list[tuple[str, object]]:
    """FIELD=VALUE pairs: the value as JSON where it parses (numbers), else as the word."""
    pairs = []
    for item in items:
        k, v = item.split("=", 1)
        try:
            pairs.append((k, json.loads(v)))
        except json.JSONDecodeError:
            pairs.append((k, v))
    return pairs


def default_student(data: str, teacher, norm, seed: int):
    """The --student-defaults student (`srel-fast train` with no tuning flag) for the probes:
    its spec (ConvNet-3 width 128), its config for one seed with soft labels, its evaluator."""
    spec = ModelSpec("convnet3", teacher.spec.num_classes, teacher.spec.in_channels, teacher.spec.image_size, 128)
    args = argparse.Namespace(student_defaults=True, ema=None, cutmix=None, train_epochs=None, data=data,
                              student_overrides=())
    cfg = dataclasses.replace(student_config(args), seed=seed, label_mode="soft")
    return spec, cfg, make_evaluator(data, norm, spec.image_size, torch.device("cpu"), seed=seed)


def recover_row(row: str, args, ipc: int, seed: int, out: str) -> str:
    """The synthetic tree of a row (recovered once; srel-hard trains srel's with hard labels)."""
    row = "srel" if row == "srel-hard" else row
    syn = os.path.join(out, f"{row}{args.tag if row == 'srel' and args.srel else ''}_ipc{ipc}_s{seed}")
    if os.path.exists(os.path.join(syn, "manifest.json")):
        return syn
    if row == "sre2l":
        cfg = RecoverConfig(out=syn, weights=args.teacher, recipe="sre2l-tiny", ipc=ipc, iterations=args.sre2l_iterations,
                            group_batches=10, seed=seed, device="cpu", progress=False, overwrite=True)
    else:
        fields = dict(out=syn, weights=args.teacher, ipc=ipc, seed=seed, device="cpu", progress=False, overwrite=True)
        fields.update(args.srel_overrides)   # e.g. weights=a.pt,b.pt (several teachers)
        cfg = RecoverConfig(**fields)
    run_recover(cfg)
    return syn


def run_one(row: str, args, ipc: int, seed: int, out: str) -> dict:
    teacher = load_model(args.teacher)
    width = 128 if args.student_defaults else args.width
    spec = ModelSpec("convnet3", teacher.spec.num_classes, teacher.spec.in_channels, teacher.spec.image_size, width)
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
    mode = "hard" if row.endswith("-hard") else "soft"
    cfg = dataclasses.replace(student_config(args), seed=seed, label_mode=mode)
    evaluate_fn = make_evaluator(args.data, norm, spec.image_size, torch.device("cpu"), seed=seed)
    res = train_student(images, labels, spec.num_classes, spec, cfg, evaluate_fn,
                        teacher=teacher.model if mode == "soft" else None)
    return {"data": args.data, "ipc": ipc, "seed": seed, "row": row, "acc": res["test_accuracy"],
            "teacher": args.teacher, "teacher_acc": teacher.meta.get("test_accuracy"),
            "data_seconds": t_data, "train_seconds": res["seconds"],
            "student": dataclasses.asdict(with_student_rules(apply_recipe(cfg, "train"), images.shape)),   # as it ran
            "srel_overrides": dict(args.srel_overrides) if row == "srel" else None}


PUBLISHED = {  # ConvNet on Fashion-MNIST, IPC 1 / 10 / 50 (as quoted in issue 15)
    "DC": (70.5, 82.3, 83.6), "DSA": (70.6, 84.6, 88.7), "KIP (images, trained ConvNet)": (73.8, 86.8, 87.8)}
ROW_NAMES = {"real-hard": "random real, hard labels", "real-soft": "random real, soft labels",
             "sre2l": "SRe2L objective (sre2l-tiny recovery, 1000 it)", "srel": "srel recipe (defaults)",
             "srel-hard": "srel recipe, hard labels"}


def _mean_sd(values):
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def dd_ranking(full_hard: float, syn_hard: float, syn_soft: float, random_soft: float, lam: float = 0.5) -> dict:
    """DD-Ranking's metrics by their published formulas (the ddranking package's code):
    HLR = full-data hard-label acc - synthetic hard-label acc, IOR = synthetic soft-label acc -
    random-real soft-label acc, LRS = (exp(lam IOR - (1 - lam) HLR) - e^-1) / (e - e^-1), with
    accuracies as fractions (so LRS lies in [0, 1] for |alpha| <= 1)."""
    import math

    hlr = (full_hard - syn_hard) / 100
    ior = (syn_soft - random_soft) / 100
    alpha = lam * ior - (1 - lam) * hlr
    return {"HLR": 100 * hlr, "IOR": 100 * ior, "LRS": (math.exp(alpha) - math.exp(-1)) / (math.e - math.exp(-1))}


def summarize(dirs: list[str], strip_tag: str = "") -> dict:
    files = [d if os.path.isfile(d) else os.path.join(d, "rows.jsonl") for d in dirs]
    rows = [json.loads(line) for f in files for line in open(f)]
    if strip_tag:   # the rows of one student protocol, under the plain row names
        rows = [dict(r, row=r["row"][:-len(strip_tag)]) for r in rows if r["row"].endswith(strip_tag)]
    by = {}
    for r in rows:
        by.setdefault((r["data"], r["ipc"], r["row"]), {})[r["seed"]] = r
    out = {"cells": [], "dd_ranking": []}
    for data in sorted({r["data"] for r in rows}):
        print(f"\n### {data}\n")
        teacher_row = next(r for r in rows if r["data"] == data)
        teacher = teacher_row["teacher_acc"]
        print(f"Teacher ({os.path.basename(teacher_row['teacher'])}, full training set, hard labels): {teacher:.2f}\n")
        ipcs = sorted({r["ipc"] for r in rows if r["data"] == data})
        print("| row | " + " | ".join(f"IPC {k}" for k in ipcs) + " |")
        print("|---|" + "---|" * len(ipcs))
        names = [n for n in ROW_NAMES] + sorted({r["row"] for r in rows if r["data"] == data} - set(ROW_NAMES))
        for name in names:
            cells = []
            for k in ipcs:
                runs = by.get((data, k, name), {})
                if not runs:
                    cells.append("-")
                    continue
                m, sd = _mean_sd([r["acc"] for r in runs.values()])
                cell = f"{m:.2f} +- {sd:.2f}"
                # gain over random real images trained the same way (same student suffix, if any)
                suffix = name[len("srel"):] if name.startswith("srel") else ""
                base = by.get((data, k, "real-soft" + suffix)) or by.get((data, k, "real-soft"), {})
                paired = [runs[s]["acc"] - base[s]["acc"] for s in runs if s in base]
                if not name.startswith("real") and paired and not name.endswith("-hard"):
                    cell += f" ({statistics.mean(paired):+.2f})"
                cells.append(cell + (f" [n={len(runs)}]" if len(runs) != 3 else ""))
                out["cells"].append({"data": data, "ipc": k, "row": name, "mean": m, "std": sd,
                                     "seeds": sorted(runs), "accs": [runs[s]["acc"] for s in sorted(runs)],
                                     "paired_gain_over_real_soft": statistics.mean(paired) if paired else None})
            print(f"| {ROW_NAMES.get(name, name)} | " + " | ".join(cells) + " |")
        if data == "fashion-mnist":
            for method, accs in PUBLISHED.items():
                print(f"| published: {method} | " + " | ".join(
                    f"{accs[(1, 10, 50).index(k)]:.1f}" if k in (1, 10, 50) else "-" for k in ipcs) + " |")
        print("\nDD-Ranking metrics of the srel recipe (mean over seeds; formulas of the ddranking package, "
              "accuracies as fractions, lambda 0.5; full-data hard-label accuracy = the teacher's):\n")
        print("| IPC | HLR (points) | IOR (points) | LRS |")
        print("|---|---|---|---|")
        for k in ipcs:
            need = [(data, k, n) for n in ("srel-hard", "srel", "real-soft")]
            if not all(n in by for n in need):
                continue
            seeds = sorted(set.intersection(*(set(by[n]) for n in need)))
            ms = [dd_ranking(teacher, by[need[0]][s]["acc"], by[need[1]][s]["acc"], by[need[2]][s]["acc"])
                  for s in seeds]
            agg = {key: statistics.mean(m[key] for m in ms) for key in ("HLR", "IOR", "LRS")}
            out["dd_ranking"].append({"data": data, "ipc": k, "seeds": seeds, **agg})
            print(f"| {k} | {agg['HLR']:.2f} | {agg['IOR']:+.2f} | {agg['LRS']:.3f} |")
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="fashion-mnist")
    ap.add_argument("--teacher")
    ap.add_argument("--ipc", default="10")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--train-epochs", type=int, default=None,
                    help="student epochs (default: 300 for the demo's student, the train stage's rule with "
                         "--student-defaults)")
    ap.add_argument("--sre2l-iterations", type=int, default=1000)
    ap.add_argument("--srel", action="append", default=[], metavar="FIELD=VALUE",
                    help="override a recover field of the srel row (ablations), e.g. r_class=0")
    ap.add_argument("--student", action="append", default=[], metavar="FIELD=VALUE",
                    help="override a train field of every row's student, e.g. temperature=4")
    ap.add_argument("--tag", default="", help="suffix of the row name (ablations)")
    ap.add_argument("--student-defaults", action="store_true",
                    help="train students with `srel-fast train`'s defaults instead of the demo's student")
    ap.add_argument("--tag-all", action="store_true", help="add --tag to every row's name (other students)")
    # unset: off for the demo's student, the train stage's default with --student-defaults
    ap.add_argument("--ema", type=float, default=None, help="student EMA decay (0: off)")
    ap.add_argument("--cutmix", type=float, default=None, help="student CutMix probability per batch")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out")
    ap.add_argument("--summarize", nargs="*", help="print the tables of these output directories")
    ap.add_argument("--json", help="with --summarize: also write the cells as JSON here")
    ap.add_argument("--strip-tag", default="", help="with --summarize: only the rows named ROW+TAG, as ROW")
    args = ap.parse_args(argv)
    if args.summarize:
        out = summarize(args.summarize, args.strip_tag)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(out, f, indent=1)
        return None
    torch.set_num_threads(args.threads)
    args.srel_overrides = parse_overrides(args.srel)
    args.student_overrides = parse_overrides(args.student)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "rows.jsonl")
    done = set()
    if os.path.exists(path):
        done = {(r["ipc"], r["seed"], r["row"]) for r in map(json.loads, open(path))}
    for ipc in map(int, args.ipc.split(",")):
        for seed in map(int, args.seeds.split(",")):
            for row in args.rows.split(","):
                name = row + args.tag if row.startswith("srel") or args.tag_all else row
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
