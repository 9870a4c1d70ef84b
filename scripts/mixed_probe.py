"""Probe: mixed formation, stored images of 2 x 2 tiles beside whole ones in one set.

IDC's multi-formation stores k x k smaller images in one; at Fashion-MNIST IPC 2 srel's tiles and
its whole images train equally good students (docs/results/quality.md, "Four images in one at IPC
1"), so this asks whether the two together, in the same storage, beat either. Per seed: M stored
images of tiles per class (`--tiled-ipc`, srel's rule for tiles at IPC M: 3,000 iterations at IPC 1,
1,000 above; seed s) and N whole images (`--whole-ipc`, the rule for whole images at IPC N: 1,000
iterations at IPC 1, 100 above; seed s + 1000, so that they start at other real images than the
tiles), each recovered as in scripts/quality.py; the student (the train defaults, teacher online)
trains on the decoded images of both, M + N stored per class. Rows to OUT/rows.jsonl.

    python scripts/mixed_probe.py --teacher fmnist_default.pt --tiled-ipc 1 --whole-ipc 1 --seeds 0,1,2,3 --out runs/mixed
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import quality  # noqa: E402  (this directory's experiment script: recovery rows and the student)

from srel_fast.images import load_synthetic  # noqa: E402
from srel_fast.models import load_model  # noqa: E402
from srel_fast.train import train_student  # noqa: E402

WHOLE_SEED_OFFSET = 1000   # the whole image's recovery seed: its real start differs from the tiles'


def parts(tiled_ipc: int, whole_ipc: int) -> dict:
    """name: (IPC, recovery overrides, seed offset); the iterations are the rule's for the part."""
    return {"t2_nf15": (tiled_ipc, [("tiles_per_side", 2), ("tiled_images", tiled_ipc)], 0),
            "t1_nf15": (whole_ipc, [("tiles_per_side", 1)], WHOLE_SEED_OFFSET)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="fashion-mnist")
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--tiled-ipc", type=int, default=1, help="stored images of tiles per class")
    ap.add_argument("--whole-ipc", type=int, default=1, help="whole images per class")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)
    teacher = load_model(args.teacher)
    rows = os.path.join(args.out, "rows.jsonl")
    set_parts = parts(args.tiled_ipc, args.whole_ipc)
    for seed in map(int, args.seeds.split(",")):
        t0 = time.perf_counter()
        images, labels, norm = [], [], None
        for tag, (ipc, overrides, offset) in set_parts.items():
            part_args = argparse.Namespace(teacher=args.teacher, srel=True, srel_overrides=overrides, tag="_" + tag)
            syn = quality.recover_row("srel", part_args, ipc, seed + offset, args.out)
            x, y, norm = load_synthetic(syn, teacher, torch.device("cpu"))
            images.append(x)
            labels.append(y)
        images, labels = torch.cat(images), torch.cat(labels)
        spec, cfg, evaluate = quality.default_student(args.data, teacher, norm, seed)
        res = train_student(images, labels, spec.num_classes, spec, cfg, evaluate, teacher=teacher.model)
        rec = {"data": args.data, "ipc": args.tiled_ipc + args.whole_ipc, "seed": seed,
               "row": f"srel_mixed_t2x{args.tiled_ipc}+t1x{args.whole_ipc}_nf15",
               "acc": res["test_accuracy"], "images_per_class": int((labels == 0).sum()),
               "teacher": args.teacher, "teacher_acc": teacher.meta.get("test_accuracy"),
               "parts": {tag: dict(overrides, ipc=ipc, seed=seed + offset)
                         for tag, (ipc, overrides, offset) in set_parts.items()},
               "seconds": time.perf_counter() - t0, "student": dataclasses.asdict(cfg)}
        with open(rows, "a") as f:
            f.write(json.dumps(rec) + "\n")
        print(f"{time.strftime('%H:%M:%S')} seed {seed}: {rec['acc']:.2f}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
