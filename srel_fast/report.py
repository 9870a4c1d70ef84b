"""`srel-fast report`: collect result files into one Markdown table and a plot.

``--inputs`` is a comma-separated list of result JSON files and/or
directories; directories are searched recursively for
``train_results.json`` (srel-fast train), ``demo_results.json`` (srel-fast
demo) and ``continual_results.json`` (srel-fast continual).

- train results form the cross-architecture table: one row per recovery model
  / synthetic set, one column per student arch, values = test top-1 (%).
  The row is named after the recovery model, IPC and the recovery model's
  own test top-1, read from the synthetic set's recover_config.json when it
  is still on disk, else after the
  synthetic directory's name (a leading ``syn-`` dropped); hard-label runs get
  ", hard labels". When one (row, column) appears twice, the later file (in
  sorted path order) wins and the report says so.
- demo results add one row per demo line (random real / synthetic), in the
  column of the demo's arch.
- continual results are added as their own per-step tables.

The Markdown goes to ``--out``; a PNG with the same stem is written beside it
(grouped bars of the cross-architecture table, plus the continual curves).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from .errors import UserError
from .files import read_json

RESULT_FILES = ("train_results.json", "demo_results.json", "continual_results.json")


@dataclass
class ReportConfig:
    inputs: str
    out: str


def find_result_files(inputs: str) -> list[str]:
    paths = [p.strip() for p in inputs.split(",") if p.strip()]
    if not paths:
        raise UserError("--inputs is empty; give result JSON files or directories, comma-separated.")
    found: list[str] = []
    for p in paths:
        if os.path.isfile(p):
            found.append(p)
        elif os.path.isdir(p):
            for root, dirs, files in os.walk(p):
                dirs.sort()
                found += [os.path.join(root, f) for f in sorted(files) if f in RESULT_FILES]
        else:
            raise UserError(f"report input {p} does not exist.")
    if not found:
        raise UserError(f"no {', '.join(RESULT_FILES)} found under {inputs}.")
    return sorted(dict.fromkeys(found))


def _kind(obj: dict, path: str) -> str:
    base = os.path.basename(path)
    if base in RESULT_FILES:
        return base.split("_")[0]
    if "results" in obj and "num_images" in obj:
        return "train"
    if "table" in obj and "markdown" in obj:
        return "demo"
    if "splits" in obj and "results" in obj:
        return "continual"
    raise UserError(f"{path} is not a train, demo or continual result file.")


def _syn_row(cfg: dict) -> str:
    syn = cfg.get("syn") or ""
    rec = os.path.join(syn, "recover_config.json") if syn else ""
    if rec and os.path.exists(rec):
        r = read_json(rec)
        acc = r.get("teacher_test_accuracy")
        name = f"{r['model']['arch']} (IPC {r['config']['ipc']}" + (f", teacher {acc:.1f}%)" if acc is not None else ")")
    else:
        name = os.path.basename(os.path.normpath(syn)) or "synthetic"
        if name.startswith("syn-"):
            name = name[4:]
    if cfg.get("label_mode") == "hard":
        name += ", hard labels"
    return name


def collect(files: list[str]) -> dict:
    cells: dict[tuple[str, str], float] = {}
    rows: list[str] = []
    cols: list[str] = []
    notes: list[str] = []
    continual: list[dict] = []

    def put(row: str, col: str, value: float, path: str) -> None:
        if (row, col) in cells:
            notes.append(f"{row} / {col}: {path} replaces an earlier value {cells[(row, col)]:.2f}")
        cells[(row, col)] = float(value)
        if row not in rows:
            rows.append(row)
        if col not in cols:
            cols.append(col)

    for path in files:
        try:
            obj = read_json(path)
        except Exception as exc:  # noqa: BLE001
            raise UserError(f"{path} is not readable JSON ({type(exc).__name__}).") from None
        kind = _kind(obj, path)
        if kind == "train":
            put(_syn_row(obj["config"]), obj["model"]["arch"], obj["results"]["test_accuracy"], path)
        elif kind == "demo":
            arch = obj["config"]["arch"]
            for name, acc in obj["table"].items():
                put(f"demo: {name}", arch, acc, path)
        else:
            continual.append(obj)
    return {"cells": cells, "rows": rows, "cols": cols, "notes": notes, "continual": continual}


def markdown(data: dict) -> str:
    lines = []
    rows, cols, cells = data["rows"], data["cols"], data["cells"]
    if rows:
        lines.append("Test top-1 (%) on the real test set; rows: recovery model / synthetic set, columns: student arch.")
        lines.append("")
        lines.append("| recovery model / synthetic set | " + " | ".join(cols) + " |")
        lines.append("|---|" + "---|" * len(cols))
        for r in rows:
            vals = [f"{cells[(r, c)]:.2f}" if (r, c) in cells else "-" for c in cols]
            lines.append(f"| {r} | " + " | ".join(vals) + " |")
    if data["continual"]:
        from .continual import continual_markdown

        for res in data["continual"]:
            lines += ["", continual_markdown(res)]
    if data["notes"]:
        lines += ["", "Notes:"] + [f"- {n}" for n in data["notes"]]
    return "\n".join(lines).strip()


def plot(data: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from .continual import draw_curves

    panels = (1 if data["rows"] else 0) + sum(len(r["results"]) for r in data["continual"])
    fig, axes = plt.subplots(1, max(1, panels), figsize=(6 * max(1, panels), 4), squeeze=False)
    axes = list(axes[0])
    if data["rows"]:
        ax = axes.pop(0)
        rows, cols = data["rows"], data["cols"]
        w = 0.8 / max(1, len(cols))
        x = np.arange(len(rows))
        for j, c in enumerate(cols):
            vals = [data["cells"].get((r, c), np.nan) for r in rows]
            bars = ax.bar(x + (j - (len(cols) - 1) / 2) * w, vals, w, label=c)
            ax.bar_label(bars, fmt="%.1f", fontsize=6)
        ax.set_xticks(x, rows, rotation=15, ha="right", fontsize=7)
        ax.set_ylabel("test top-1 (%)")
        ax.set_title("student arch (bars) per synthetic set", fontsize=9)
        ax.legend(fontsize=7, title="student", title_fontsize=7)
        ax.grid(axis="y", alpha=0.3)
    for res in data["continual"]:
        for steps, by_mode in sorted(res["results"].items(), key=lambda kv: int(kv[0])):
            ax = axes.pop(0)
            draw_curves(ax, by_mode, res.get("splits", {}).get(steps))
            ax.set_xlabel("classes seen")
            ax.set_ylabel("top-1 on seen classes (%)")
            ax.set_title(f"continual, {steps} steps, {res.get('memory_per_class')} img/class", fontsize=9)
            ax.legend(fontsize=7)
            ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_report(cfg: ReportConfig) -> dict:
    if not cfg.out.endswith(".md"):
        raise UserError(f"--out must name a Markdown file (.md), got {cfg.out}.")
    files = find_result_files(cfg.inputs)
    data = collect(files)
    md = markdown(data)
    os.makedirs(os.path.dirname(os.path.abspath(cfg.out)), exist_ok=True)
    with open(cfg.out, "w") as f:
        f.write(md + "\n")
    png = os.path.splitext(cfg.out)[0] + ".png"
    plot(data, png)
    print(md)
    return {"markdown": cfg.out, "plot": png, "files": files}
