"""Probe: DeepInversion's competition term (Yin et al., CVPR 2020, "ADI") added to srel's recovery.

Not a recover option: it measured no gain (docs/results/quality.md, "A student's disagreement as a
recovery term"), so it lives here as the experiment that says so. For each seed a proxy student is
trained on random real images with the teacher's soft labels (the random-real row of
scripts/quality.py, same student), then srel's recovery (its defaults) runs with one more term,
``- r_adv * JS(teacher, proxy)`` on the same crops: the images move to where a student of real
images still disagrees with its teacher, the knowledge real images failed to pass on. The final
student trains on the recovered images as in scripts/quality.py. Rows to OUT/rows.jsonl.

    python scripts/competition_probe.py --teacher fmnist_default.pt --ipc 2 --seeds 0,1 --r-adv 1 --out runs/adi
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import quality  # noqa: E402  (this directory's experiment script: the student of its tables)

from srel_fast import recover  # noqa: E402
from srel_fast.data import Normalization, load_builtin, random_real_subset  # noqa: E402
from srel_fast.images import load_synthetic  # noqa: E402
from srel_fast.models import load_model  # noqa: E402
from srel_fast.train import train_student  # noqa: E402


def js_divergence(p_logits: torch.Tensor, q_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean Jensen-Shannon divergence of the two softmax distributions at ``temperature``."""
    p = F.softmax(p_logits.float() / temperature, 1)
    q = F.softmax(q_logits.float() / temperature, 1)
    log_m = (0.5 * (p + q)).clamp_min(1e-12).log()

    def kl_to_mixture(a: torch.Tensor) -> torch.Tensor:
        return (a * (a.clamp_min(1e-12).log() - log_m)).sum(1).mean()

    return 0.5 * kl_to_mixture(p) + 0.5 * kl_to_mixture(q)


SREL_LOSS = recover.Recoverer._loss   # the recovery's own objective, kept before main() replaces it


def with_competition(proxy: torch.nn.Module, r_adv: float, temperature: float):
    """Recoverer._loss plus the competition term: the proxy sees the crops the (first) teacher sees,
    taken by a forward hook inside the recovery's own loss, so that loss is not written again."""
    def loss(self, x, targets, boxes, flip, shift):
        divergence = []

        def compete(teacher, inputs, logits):   # runs inside the loss's autocast, on the same crops
            divergence.append(js_divergence(logits, proxy(inputs[0]), temperature))

        handle = self.models[0].register_forward_hook(compete)
        try:
            total, ce, bn = SREL_LOSS(self, x, targets, boxes, flip, shift)
        finally:
            handle.remove()
        return total - r_adv * divergence[0], ce, bn
    return loss


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="fashion-mnist")
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--ipc", type=int, default=2)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--r-adv", type=float, default=1.0, help="weight of the competition term")
    ap.add_argument("--temperature", type=float, default=1.0, help="of the two softmaxes in the JS divergence")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)
    teacher = load_model(args.teacher)
    norm = Normalization(teacher.mean, teacher.std)
    data = load_builtin(args.data, "train", (teacher.meta.get("config") or {}).get("seed", 0))
    tag = f"_adv{args.r_adv:g}_t{args.temperature:g}"
    rows = os.path.join(args.out, "rows.jsonl")
    for seed in map(int, args.seeds.split(",")):
        spec, cfg, evaluate = quality.default_student(args.data, teacher, norm, seed)
        proxy_path = os.path.join(args.out, f"proxy_ipc{args.ipc}_s{seed}.pt")
        if not os.path.exists(proxy_path):   # the random-real row's student, kept as the proxy
            u8, labels = random_real_subset(data, args.ipc, seed)
            res = train_student(norm.normalize(u8), labels, spec.num_classes, spec, cfg, evaluate, teacher=teacher.model)
            torch.save(res["model"], proxy_path)
            with open(rows, "a") as f:
                f.write(json.dumps({"data": args.data, "ipc": args.ipc, "seed": seed, "row": "real-soft",
                                    "acc": res["test_accuracy"]}) + "\n")
        proxy = torch.load(proxy_path, weights_only=False).eval().requires_grad_(False)
        recover.Recoverer._loss = with_competition(proxy, args.r_adv, args.temperature)
        syn = os.path.join(args.out, f"srel{tag}_ipc{args.ipc}_s{seed}")
        t0 = time.perf_counter()
        recover.run_recover(recover.RecoverConfig(out=syn, weights=args.teacher, ipc=args.ipc, seed=seed, device="cpu",
                                                  progress=False, overwrite=True))
        images, labels, _ = load_synthetic(syn, teacher, torch.device("cpu"))
        res = train_student(images, labels, spec.num_classes, spec, cfg, evaluate, teacher=teacher.model)
        with torch.no_grad():
            proxy_agrees = float((proxy(images).argmax(1) == labels).float().mean())
        rec = {"data": args.data, "ipc": args.ipc, "seed": seed, "row": "srel" + tag, "acc": res["test_accuracy"],
               "r_adv": args.r_adv, "temperature": args.temperature, "teacher": args.teacher,
               "proxy_accuracy_on_recovered": 100 * proxy_agrees, "seconds": time.perf_counter() - t0}
        with open(rows, "a") as f:
            f.write(json.dumps(rec) + "\n")
        print(rec, file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
