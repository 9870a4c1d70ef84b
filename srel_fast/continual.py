"""`srel-fast continual`: class-incremental learning with a condensed memory
(SRe2L Sec. 3.7, following DM's GDumb-based protocol).

Protocol
--------
- Class order: ``class_order="seed"`` (default) is ``torch.randperm(K)`` under
  ``torch.Generator().manual_seed(seed)``; ``"natural"`` is 0, 1, ..., K-1.
  The order is cut into ``S`` consecutive, disjoint chunks of nearly equal
  size (the first ``K mod S`` chunks get one class more), whose union is all
  K classes. ``steps="5,10"`` runs a 5-step and a 10-step split.
- Memory: ``ipc`` images per class for every class seen so far (a
  class-balanced memory, as GDumb's sampler keeps; the budget per class is
  constant, the total grows with the steps). Three memories of the same
  budget are compared:
    * ``synthetic-soft``: the first ``ipc`` images per class of a recovery
      output tree (``--syn``), trained with soft labels from the teacher
      (online relabel, srel_fast.train.train_student);
    * ``real-soft``: ``ipc`` random real training images per class
      (srel_fast.demo.random_real_subset, fixed over the steps), trained the
      same way: the strong baseline;
    * ``real-hard``: the same real images with hard labels (GDumb itself).
- At each step a model is trained FROM SCRATCH on the whole memory (GDumb),
  then tested on the real test images of the classes seen so far, with the
  prediction restricted to the seen classes (unseen logits masked, GDumb's
  class mask). For soft labels the teacher's logits of unseen classes are
  masked the same way, so no knowledge of future classes leaks in through the
  labels; the teacher itself (the recovery model) was trained on all classes,
  as in the paper.
- A 1-class step (e.g. the first step of the 10-step split on 10 classes)
  trains a model anyway; its masked accuracy is trivially 100 %.

Outputs in ``out``: continual_results.json (config, order, splits, per-step
accuracy), continual.md (one table per split) and continual.png (accuracy vs
number of seen classes). Finished (split, memory, step) runs are kept in the
JSON and skipped when the command is run again.
"""
from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass

import torch
from torch import nn

from .data import Normalization, TensorData, dataset_normalization, is_builtin, load_builtin, random_real_subset
from .errors import UserError
from .files import environment, read_json, write_json

MODES = ("synthetic-soft", "real-soft", "real-hard")
MODE_NAMES = {
    "synthetic-soft": "srel-fast synthetic, soft labels",
    "real-soft": "random real, soft labels",
    "real-hard": "random real, hard labels (GDumb)",
}


@dataclass
class ContinualConfig:
    out: str
    syn: str | None = None            # recover output tree (needed for synthetic-soft)
    teacher: str | None = None        # soft-label teacher; default: the recovery model of --syn
    data: str = "fashion-mnist"       # built-in data set: real memory and test split
    steps: str = "5"                  # comma-separated step counts, e.g. "5,10"
    class_order: str = "seed"         # seed | natural
    modes: str = ",".join(MODES)
    ipc: int = 10                     # memory images per seen class
    arch: str = "convnet3"
    width: int = 32
    epochs: int = 100
    batch_size: int = 50
    optimizer: str = "adamw"
    lr: float = 0.01
    weight_decay: float = 0.01
    temperature: float = 20.0
    min_scale: float = 0.5
    seed: int = 0
    device: str = "auto"
    backend: str = "auto"
    progress: bool = False


# ---------------------------------------------------------------- protocol
def class_order(num_classes: int, order: str = "seed", seed: int = 0) -> list[int]:
    if order == "natural":
        return list(range(num_classes))
    if order == "seed":
        return torch.randperm(num_classes, generator=torch.Generator().manual_seed(seed)).tolist()
    raise UserError(f"--class-order must be 'seed' or 'natural', got {order!r}.")


def class_splits(order: list[int], steps: int) -> list[list[int]]:
    """``order`` cut into ``steps`` consecutive disjoint chunks of nearly equal size."""
    k = len(order)
    if not 1 <= steps <= k:
        raise UserError(f"cannot split {k} classes into {steps} steps; use 1..{k} steps.")
    base, extra = divmod(k, steps)
    out, start = [], 0
    for s in range(steps):
        n = base + (1 if s < extra else 0)
        out.append(list(order[start:start + n]))
        start += n
    return out


def seen_classes(splits: list[list[int]], step: int) -> list[int]:
    """Classes seen after step ``step`` (0-based)."""
    return [c for chunk in splits[:step + 1] for c in chunk]


def memory_indices(labels: torch.Tensor, classes: list[int], ipc: int) -> torch.Tensor:
    """Indices of the first ``ipc`` items of each class in ``classes`` (in class-list order)."""
    picks = []
    for c in classes:
        idx = torch.nonzero(labels.cpu() == c).flatten()
        if len(idx) < ipc:
            raise UserError(f"the memory has {len(idx)} images of class {c}, fewer than --ipc {ipc}.")
        picks.append(idx[:ipc])
    return torch.cat(picks)


class MaskedLogits(nn.Module):
    """``model`` with the logits of classes outside ``allowed`` set to -1e4
    (softmax mass exp(-1e4 / T) = 0 even at T = 20)."""

    def __init__(self, model: nn.Module, allowed: list[int], num_classes: int):
        super().__init__()
        self.model = model
        mask = torch.full((num_classes,), -1e4)
        mask[torch.tensor(allowed)] = 0.0
        self.register_buffer("mask", mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x) + self.mask.to(x.device)


def seen_test_subset(test: TensorData, classes: list[int]) -> TensorData:
    keep = torch.isin(test.labels, torch.tensor(classes))
    return TensorData(test.images[keep], test.labels[keep], test.classes)


# ---------------------------------------------------------------- the stage
def _parse_steps(text: str) -> list[int]:
    try:
        steps = [int(s) for s in str(text).split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--steps must be comma-separated integers, got {text!r}.") from None
    if not steps:
        raise UserError("--steps is empty; give e.g. 5 or 5,10.")
    return steps


def _parse_modes(text: str) -> list[str]:
    modes = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise UserError(f"--modes must be a comma-separated subset of {', '.join(MODES)}, got {text!r}.")
    return modes


def run_continual(cfg: ContinualConfig) -> dict:
    from .distributed import resolve_device
    from .models import load_model

    steps_list = _parse_steps(cfg.steps)
    modes = _parse_modes(cfg.modes)
    teacher_path = _check(cfg, modes)
    device = resolve_device(cfg.device)
    teacher = load_model(teacher_path) if teacher_path else None
    train = load_builtin(cfg.data, "train", cfg.seed)
    test = load_builtin(cfg.data, "test", cfg.seed)
    k = train.num_classes
    if teacher is not None and teacher.spec.num_classes != k:
        raise UserError(f"the teacher has {teacher.spec.num_classes} classes but {cfg.data} has {k}.")
    norm = Normalization(teacher.mean, teacher.std) if teacher is not None else dataset_normalization(train)
    memories = _memories(cfg, modes, teacher, train, norm, device)

    os.makedirs(cfg.out, exist_ok=True)
    json_path = os.path.join(cfg.out, "continual_results.json")
    order = class_order(k, cfg.class_order, cfg.seed)
    key = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name not in ("out", "device", "progress", "modes", "steps")}
    previous = read_json(json_path) if os.path.exists(json_path) else None
    results = previous["results"] if previous and previous.get("key") == key else {}
    t0 = time.perf_counter()
    splits_out = _train_steps(cfg, steps_list, modes, order, memories, results, key, json_path, teacher, train, test,
                              norm, device)
    out = {
        "config": dataclasses.asdict(cfg), "key": key, "class_order": order, "splits": splits_out,
        "memory_per_class": cfg.ipc, "results": results, "mode_names": MODE_NAMES,
        "teacher": teacher_path, "teacher_test_accuracy": teacher.meta.get("test_accuracy") if teacher else None,
        "seconds": time.perf_counter() - t0, "environment": environment(),
    }
    write_json(json_path, out)
    md = continual_markdown(out)
    with open(os.path.join(cfg.out, "continual.md"), "w") as f:
        f.write(md + "\n")
    plot_continual(out, os.path.join(cfg.out, "continual.png"))
    print(md)
    return {"results": results, "markdown": md, "seconds": out["seconds"]}


def _check(cfg: ContinualConfig, modes: list[str]) -> str | None:
    """Refuse what cannot run; the teacher's checkpoint (--teacher, or the one --syn was recovered from)."""
    if cfg.ipc <= 0:
        raise UserError(f"--ipc must be positive, got {cfg.ipc}.")
    if not is_builtin(cfg.data):
        raise UserError(f"--data must be a built-in data set name (fashion-mnist, digits), got {cfg.data!r}.")
    need_soft = any(m.endswith("soft") for m in modes)
    if "synthetic-soft" in modes and cfg.syn is None:
        raise UserError("the synthetic-soft memory needs --syn (a recover output directory).")
    teacher_path = cfg.teacher
    if teacher_path is None and cfg.syn is not None:
        rec = os.path.join(cfg.syn, "recover_config.json")
        if os.path.exists(rec):
            teacher_path = read_json(rec)["config"].get("weights")
    if need_soft and teacher_path is None:
        raise UserError("soft-label memories need --teacher (or a --syn whose recover_config.json names its weights).")
    return teacher_path


def _memories(cfg: ContinualConfig, modes: list[str], teacher, train: TensorData, norm: Normalization,
              device) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The memories the modes draw from: "synthetic-soft" (the recovered set, by class) and "real"
    (random real images), normalised, on ``device``."""
    from .images import load_synthetic

    memories: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    if "synthetic-soft" in modes:
        syn_x, syn_y, syn_norm = load_synthetic(cfg.syn, teacher, device)
        if tuple(syn_norm.mean) != tuple(norm.mean) or tuple(syn_norm.std) != tuple(norm.std):
            raise UserError(f"the synthetic set {cfg.syn} was recovered with another normalisation than the teacher's.")
        if tuple(syn_x.shape[1:]) != tuple(train.images.shape[1:]):
            raise UserError(f"synthetic images are {tuple(syn_x.shape[1:])}, the real ones {tuple(train.images.shape[1:])}.")
        order_idx = torch.argsort(syn_y.cpu(), stable=True)  # by class, then file (ipc) order
        memories["synthetic-soft"] = (syn_x[order_idx.to(device)], syn_y[order_idx.to(device)])
    if "real-soft" in modes or "real-hard" in modes:
        rx, ry = random_real_subset(train, cfg.ipc, cfg.seed)
        memories["real"] = (norm.normalize(rx.to(device)), ry.to(device))
    return memories


def _train_steps(cfg: ContinualConfig, steps_list: list[int], modes: list[str], order: list[int], memories: dict,
                 results: dict, key: dict, json_path: str, teacher, train: TensorData, test: TensorData,
                 norm: Normalization, device) -> dict:
    """A student per (split, mode, step) not in ``results`` yet, each result saved as it comes;
    returns the splits."""
    from .distributed import main_print
    from .models import ModelSpec
    from .train import TrainConfig, train_student
    from .evaluation import evaluate

    k = train.num_classes
    spec_base = teacher.spec if teacher is not None else ModelSpec(cfg.arch, k, train.channels, train.image_size, cfg.width)
    spec = ModelSpec(cfg.arch, k, spec_base.in_channels, spec_base.image_size, cfg.width)
    tcfg = TrainConfig(syn="", out="", val=cfg.data, arch=cfg.arch, epochs=cfg.epochs, batch_size=cfg.batch_size,
                       optimizer=cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay,
                       temperature=cfg.temperature, min_scale=cfg.min_scale, width=cfg.width, seed=cfg.seed,
                       backend=cfg.backend, progress=cfg.progress)
    splits_out = {}
    for steps in steps_list:
        splits = class_splits(order, steps)
        splits_out[str(steps)] = splits
        for mode in modes:
            accs = results.setdefault(str(steps), {}).setdefault(mode, [])
            images, labels = memories["synthetic-soft" if mode == "synthetic-soft" else "real"]
            for step in range(len(accs), steps):
                seen = seen_classes(splits, step)
                idx = memory_indices(labels, seen, cfg.ipc).to(device)
                x, y = images[idx], labels[idx]
                sub = seen_test_subset(test, seen)
                hard = mode == "real-hard"
                masked_teacher = None if hard else MaskedLogits(teacher.model, seen, k).to(device)

                def evaluate_fn(model, sub=sub, seen=seen):
                    return evaluate(MaskedLogits(model, seen, k).to(device), sub, norm, device,
                                    image_size=spec.image_size)

                main_print(f"continual {steps}-step, {mode}, step {step + 1}/{steps}: classes {seen}, memory {len(x)} images")
                res = train_student(x, y, k, spec, dataclasses.replace(tcfg, label_mode="hard" if hard else "soft"),
                                    evaluate_fn, teacher=masked_teacher)
                accs.append(round(res["test_accuracy"], 2))
                results[str(steps)][mode] = accs
                write_json(json_path, {"key": key, "results": results})
                main_print(f"  -> top-1 on the {len(sub)} test images of the seen classes: {accs[-1]:.2f} % "
                           f"({res['seconds']:.0f} s)")
    return splits_out


def ordered_modes(by_mode: dict) -> list:
    """(mode, accuracies) in MODES order (JSON files may hold them sorted)."""
    return [(m, by_mode[m]) for m in MODES if m in by_mode] + [(m, v) for m, v in by_mode.items() if m not in MODES]


def continual_markdown(res: dict) -> str:
    lines = []
    ipc = res.get("memory_per_class")
    for steps, by_mode in sorted(res["results"].items(), key=lambda kv: int(kv[0])):
        splits = res.get("splits", {}).get(steps)
        n = max(len(v) for v in by_mode.values())
        head = [f"step {s + 1}" + (f" ({len(seen_classes(splits, s))} cl.)" if splits else "") for s in range(n)]
        lines.append(f"Class-incremental, {steps} steps, memory {ipc} images per seen class, "
                     "test top-1 (%) on the seen classes:")
        lines.append("")
        lines.append("| memory | " + " | ".join(head) + " |")
        lines.append("|---|" + "---|" * n)
        for mode, accs in ordered_modes(by_mode):
            cells = [f"{a:.2f}" for a in accs] + [""] * (n - len(accs))
            lines.append(f"| {MODE_NAMES.get(mode, mode)} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines).rstrip()


def draw_curves(ax, by_mode: dict, splits: list[list[int]] | None) -> None:
    """One line per memory mode on ``ax``: top-1 on the seen classes against the classes seen
    (against the step without ``splits``)."""
    for mode, accs in ordered_modes(by_mode):
        xs = [len(seen_classes(splits, s)) if splits else s + 1 for s in range(len(accs))]
        ax.plot(xs, accs, marker="o", label=MODE_NAMES.get(mode, mode))


def plot_continual(res: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = res["results"]
    fig, axes = plt.subplots(1, len(runs), figsize=(5 * len(runs), 3.6), squeeze=False)
    for ax, (steps, by_mode) in zip(axes[0], sorted(runs.items(), key=lambda kv: int(kv[0]))):
        splits = res.get("splits", {}).get(steps)
        draw_curves(ax, by_mode, splits)
        ax.set_xlabel("classes seen" if splits else "step")
        ax.set_ylabel("test top-1 on seen classes (%)")
        ax.set_title(f"{steps}-step class-incremental, {res.get('memory_per_class')} img/class")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
