"""The soft-label store written by relabel and read by train.

Soft-label store: a directory, format "srel-fast-soft-labels" version 2
(docs/soft_label_format.md is the full specification):
  labels.json               meta: seed, epochs, batch size, image count, classes,
                            temperature, top-k and its mode, index dtype, crop and mix settings
  epoch_EEEEE.logits.npy    float16 (num_images, num_classes): full store, or
  epoch_EEEEE.values.npy    float16 (num_images, k) top-k logits, descending, and
  epoch_EEEEE.indices.npy   int16 (classes <= 32767) or int32 (num_images, k) their classes,
  epoch_EEEEE.lse.npy       float16 (num_images,) logsumexp(z/T) - max(z/T) ("spread" mode only)
Rows are in the epoch's batch order (``epoch_plan``). Files are written
atomically per epoch; an interrupted relabel resumes at the first missing
epoch; under torchrun rank r writes epochs r, r + W, ... Reads are memory-mapped.
"""
from __future__ import annotations

import io
import os

import numpy as np
import torch

from .errors import UserError
from .files import atomic_write_bytes, read_json

STORE_FORMAT = "srel-fast-soft-labels"
STORE_VERSION = 2
READABLE_VERSIONS = (1, 2)             # version 1: top-k always "renorm", no index_dtype field
TOPK_MODES = ("renorm", "spread")


def index_dtype(num_classes: int):
    """Class indices of a top-k store: int16 when every class fits, else int32."""
    return np.int16 if num_classes <= np.iinfo(np.int16).max else np.int32


def reference_bytes(epochs: int, num_images: int, num_classes: int, batch_size: int, cutmix: float) -> dict:
    """Payload bytes of the reference relabel (SRe2L generate_soft_label.py, FKD-style) for
    the same run: one torch.save file per batch holding [crop coords float32 (N, 4),
    flip bool (N,), CutMix index int64 (N,), lambda float64, box 4 x int64, logits float16 (N, C)].
    The mix fields are counted only when CutMix is on; the pickle/zip container is not counted."""
    batches = -(-num_images // batch_size)
    logits = epochs * num_images * num_classes * 2
    crops = epochs * num_images * (16 + 1)
    mix = epochs * (num_images * 8 + batches * (8 + 32)) if cutmix > 0 else 0
    return {"logits": logits, "crop_flip": crops, "mix": mix, "total": logits + crops + mix}


class SoftLabelStore:
    """Reads a soft-label store (memory-mapped)."""

    def __init__(self, root: str):
        meta_path = os.path.join(root, "labels.json")
        if not os.path.exists(meta_path):
            raise UserError(f"soft-label directory {root} has no labels.json; run 'srel-fast relabel' first.")
        self.root = root
        self.meta = read_json(meta_path)
        if self.meta.get("format") != STORE_FORMAT or self.meta.get("version") not in READABLE_VERSIONS:
            raise UserError(f"{meta_path} is not a version-{STORE_VERSION} srel-fast soft-label store.")
        self.topk = self.meta.get("topk")
        self.topk_mode = (self.meta.get("topk_mode") or "renorm") if self.topk else None

    def _names(self) -> list[str]:
        if not self.topk:
            return ["logits"]
        return ["values", "indices"] + (["lse"] if self.topk_mode == "spread" else [])

    def has_epoch(self, epoch: int) -> bool:
        return all(os.path.exists(self._path(epoch, n)) for n in self._names())

    def _path(self, epoch: int, name: str) -> str:
        return os.path.join(self.root, f"epoch_{epoch:05d}.{name}.npy")

    def write_array(self, epoch: int, name: str, arr: np.ndarray) -> None:
        """Write one array of an epoch (``logits``; or ``values``, ``indices`` and, spread mode,
        ``lse``) atomically; the epoch counts as stored once all of its arrays are."""
        buf = io.BytesIO()
        np.save(buf, arr)
        atomic_write_bytes(self._path(epoch, name), buf.getvalue())

    def _check_epoch(self, epoch: int) -> None:
        if not self.has_epoch(epoch):
            raise UserError(f"soft-label store {self.root} has no labels for epoch {epoch} "
                            f"(it holds {self.meta['epochs']} epochs); train for fewer epochs or relabel more.")

    def epoch_logits(self, epoch: int):
        """(values, indices) memory-mapped; indices is None for a full store."""
        self._check_epoch(epoch)
        if self.topk:
            return (np.load(self._path(epoch, "values"), mmap_mode="r"),
                    np.load(self._path(epoch, "indices"), mmap_mode="r"))
        return np.load(self._path(epoch, "logits"), mmap_mode="r"), None

    def soft_targets(self, epoch: int, rows: slice, temperature: float, device) -> torch.Tensor:
        """The target distribution of a batch's crops (rows of the epoch, batch order).

        full store:      softmax(logits / T)
        top-k "renorm":  softmax over the kept logits / T; other classes get 0
        top-k "spread":  kept classes get their softmax probability over all classes
                         (from the stored logsumexp gap), the remaining mass is spread
                         uniformly over the other classes (needs T = the store's T)."""
        values, indices = self.epoch_logits(epoch)
        v = torch.from_numpy(np.asarray(values[rows], dtype=np.float32)).to(device)
        if indices is None:
            return torch.softmax(v / temperature, dim=1)
        idx = torch.from_numpy(np.asarray(indices[rows], dtype=np.int64)).to(device)
        n_cls = self.meta["num_classes"]
        if self.topk_mode == "spread":
            if float(temperature) != float(self.meta["temperature"]):
                raise UserError(f"the spread top-k store {self.root} was made at temperature "
                                f"{self.meta['temperature']}; train with the same --temperature.")
            gap = np.load(self._path(epoch, "lse"), mmap_mode="r")
            g = torch.from_numpy(np.asarray(gap[rows], dtype=np.float32)).to(device)
            kept = torch.exp((v - v[:, :1]) / temperature - g[:, None])
            k = kept.shape[1]
            rest = (1.0 - kept.sum(1, keepdim=True)).clamp_min(0.0)
            other = rest / (n_cls - k) if n_cls > k else torch.zeros_like(rest)
            probs = other.expand(v.shape[0], n_cls).clone()
            return probs.scatter_(1, idx, kept)
        probs = torch.zeros(v.shape[0], n_cls, device=device)
        return probs.scatter_(1, idx, torch.softmax(v / temperature, dim=1))

    def files(self) -> list[str]:
        return sorted(f for f in os.listdir(self.root) if f.endswith(".npy"))

    def nbytes(self) -> int:
        """Bytes of the label files on disk (the .npy headers included)."""
        return sum(os.path.getsize(os.path.join(self.root, f)) for f in self.files())

    def payload_bytes(self) -> int:
        """Bytes of the arrays alone (no .npy headers)."""
        return sum(np.load(os.path.join(self.root, f), mmap_mode="r").nbytes for f in self.files())
