"""Resume state of the training loops (squeeze, train): after every epoch the model, optimiser,
scheduler, generator and RNG states go to a resume file, from which an interrupted run goes on;
a file written under another config (srel_fast.files.result_config) is refused, and --overwrite
discards it."""
from __future__ import annotations

import os
import random

import numpy as np
import torch

from .errors import UserError
from .files import torch_save_atomic


def rng_state() -> dict:
    """The RNG states as tensors, numbers and strings only, so that a resume file loads with
    ``torch.load(weights_only=True)`` (no numpy arrays, which would need unpickling numpy globals)."""
    version, words, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": (version, torch.tensor(words, dtype=torch.int64), gauss),
        "numpy": (str(kind), torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict) -> None:
    version, words, gauss = state["python"]
    random.setstate((version, tuple(int(w) for w in words.tolist()), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_resume_state(path: str, epoch: int, model, optimizer, scheduler, generator: torch.Generator, extra: dict) -> None:
    torch_save_atomic({
        "epoch": epoch,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "generator": generator.get_state(),
        "rng": rng_state(),
        **extra,
    }, path)


def discard_resume_state(path: str, overwrite: bool) -> None:
    """--overwrite starts a run again: rank 0 deletes an interrupted run's resume file once every
    rank has checked the output (srel_fast.files.check_output)."""
    from . import distributed as _dist

    _dist.barrier()
    if overwrite and os.path.exists(path) and _dist.is_main():
        os.remove(path)
    _dist.barrier()


def load_resume_state(path: str, config: dict, model, optimizer, scheduler, generator: torch.Generator) -> int:
    """Restore an interrupted run; returns the number of finished epochs.
    A state file written under another config is refused."""
    if not os.path.exists(path):
        return 0
    state = load_resume_file(path)
    if state.get("config") != config:
        raise UserError(f"resume file {path} was written by a run with a different config; "
                        "delete it or use --overwrite to start again.")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    generator.set_state(state["generator"])
    set_rng_state(state["rng"])
    return int(state["epoch"])


def load_resume_file(path: str) -> dict:
    """A resume state, loaded with ``weights_only=True``: tensors, numbers, strings and plain
    containers only (what save_resume_state writes: state dicts, generator states, rng_state()),
    so a file planted in the output directory cannot run code when it is read."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001  (UnpicklingError for a forbidden global, anything for a broken file)
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "weights_only" in str(exc) or "Unsupported global" in str(exc) or "GLOBAL" in str(exc):
            reason = "it holds objects other than tensors and plain containers"
        raise UserError(f"resume file {path} cannot be loaded safely ({reason[:160]}); delete it or use "
                        "--overwrite to start again.") from None
    if not isinstance(state, dict):
        raise UserError(f"resume file {path} is not a resume state; delete it or use --overwrite to start again.")
    return state
