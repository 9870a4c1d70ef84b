"""`srel-fast pictures`: figures of a synthetic set.

- ``tree_grid(tree, path)``: the per-class grid of any image tree (a recover
  output, or any ImageFolder tree of equal-size images): one row per class.
- ``embedding_plot(...)``: t-SNE (sklearn.manifold.TSNE; PCA when sklearn's
  t-SNE is missing or there are too few points) of the teacher's penultimate
  features, i.e. the input of its last ``nn.Linear`` (the classifier / fc /
  head), captured with a forward pre-hook, for real test images and synthetic
  images of a few classes. Real images are dots, synthetic ones crosses, one
  colour per class.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from .errors import UserError
from .files import read_json, write_json
from .images import load_tree, save_grid


@dataclass
class PicturesConfig:
    syn: str                          # recover output tree (or any image tree)
    out: str                          # output directory for the PNGs
    teacher: str | None = None        # default: the recovery model named in syn/recover_config.json
    data: str = "fashion-mnist"       # real images for the embedding plot (built-in name)
    classes: str = "0,1,2,3"          # classes in the embedding plot ("all" for every class)
    real_per_class: int = 100
    per_class: int = 10               # grid columns
    method: str = "tsne"              # tsne | pca
    seed: int = 0
    device: str = "cpu"


def tree_grid(tree: str, path: str, per_class: int = 10) -> str:
    images, labels, _ = load_tree(tree)
    save_grid(path, images.float() / 255, labels, per_class=per_class)
    return path


def last_linear(model: nn.Module) -> nn.Linear:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise UserError("the teacher has no nn.Linear classifier to take penultimate features from.")
    return linears[-1]


@torch.no_grad()
def penultimate_features(model: nn.Module, x: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Inputs of the model's last nn.Linear for normalised images ``x``."""
    model.eval()
    feats: list[torch.Tensor] = []
    handle = last_linear(model).register_forward_pre_hook(lambda m, inp: feats.append(inp[0].flatten(1).float().cpu()))
    try:
        for s in range(0, len(x), batch_size):
            model(x[s:s + batch_size])
    finally:
        handle.remove()
    return torch.cat(feats)


def project_2d(feats: torch.Tensor, method: str = "tsne", seed: int = 0) -> tuple["object", str]:
    import numpy as np

    f = feats.numpy().astype(np.float64)
    f = (f - f.mean(0)) / (f.std(0) + 1e-6)
    if method == "tsne" and len(f) > 5:
        try:
            from sklearn.manifold import TSNE

            perplexity = float(min(30, max(2, (len(f) - 1) // 3)))
            return TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(f), "t-SNE"
        except ImportError:
            pass
    # PCA fallback (torch only)
    u, s, _ = torch.pca_lowrank(torch.from_numpy(f), q=2, center=True)
    return (u[:, :2] * s[:2]).numpy(), "PCA"


def embedding_plot(teacher_path: str, syn: str, path: str, data: str = "fashion-mnist", classes=None,
                   real_per_class: int = 100, method: str = "tsne", seed: int = 0, device: str = "cpu") -> dict:
    from .data import Normalization, load_builtin
    from .models import load_model
    from .images import load_synthetic

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dev = torch.device(device)
    teacher = load_model(teacher_path)
    model = teacher.model.to(dev)
    syn_x, syn_y, _ = load_synthetic(syn, teacher, dev)
    norm = Normalization(teacher.mean, teacher.std)
    test = load_builtin(data, "test", seed)
    classes = sorted(set(syn_y.tolist())) if classes is None else list(classes)
    g = torch.Generator().manual_seed(seed)
    real_idx = []
    for c in classes:
        idx = torch.nonzero(test.labels == c).flatten()
        real_idx.append(idx[torch.randperm(len(idx), generator=g)[:real_per_class]])
    real_idx = torch.cat(real_idx)
    real_x = norm.normalize(test.images[real_idx].to(dev))
    real_y = test.labels[real_idx]
    keep = torch.isin(syn_y.cpu(), torch.tensor(classes))
    sx, sy = syn_x[keep.to(dev)], syn_y.cpu()[keep]
    feats = penultimate_features(model, torch.cat([real_x, sx]))
    xy, used = project_2d(feats, method, seed)
    n_real = len(real_y)
    names = teacher.classes
    fig, ax = plt.subplots(figsize=(6, 5))
    cmap = plt.get_cmap("tab10")
    for i, c in enumerate(classes):
        r = (real_y == c).numpy()
        s = (sy == c).numpy()
        label = names[c] if c < len(names) else str(c)
        ax.scatter(xy[:n_real][r, 0], xy[:n_real][r, 1], s=8, alpha=0.35, color=cmap(i % 10), label=f"{label} real")
        ax.scatter(xy[n_real:][s, 0], xy[n_real:][s, 1], s=70, marker="X", edgecolors="black", linewidths=0.6,
                   color=cmap(i % 10), label=f"{label} synthetic")
    ax.set_title(f"{used} of {teacher.spec.arch} penultimate features: real (dots) vs synthetic (X)", fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(fontsize=6, ncol=2, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return {"path": path, "method": used, "classes": classes, "real": n_real, "synthetic": int(len(sy))}


def run_pictures(cfg: PicturesConfig) -> dict:
    if not os.path.isdir(cfg.syn):
        raise UserError(f"synthetic image folder {cfg.syn} does not exist.")
    if cfg.method not in ("tsne", "pca"):
        raise UserError(f"--method must be tsne or pca, got {cfg.method!r}.")
    os.makedirs(cfg.out, exist_ok=True)
    out = {"grid": tree_grid(cfg.syn, os.path.join(cfg.out, "grid.png"), cfg.per_class)}
    teacher = cfg.teacher
    rec = os.path.join(cfg.syn, "recover_config.json")
    if teacher is None and os.path.exists(rec):
        teacher = read_json(rec)["config"].get("weights")
    if teacher is not None and teacher != "random":
        classes = None if cfg.classes == "all" else [int(c) for c in cfg.classes.split(",") if c.strip()]
        out["embedding"] = embedding_plot(teacher, cfg.syn, os.path.join(cfg.out, "embedding.png"), cfg.data, classes,
                                          cfg.real_per_class, cfg.method, cfg.seed, cfg.device)
    write_json(os.path.join(cfg.out, "pictures.json"), out)
    return out
