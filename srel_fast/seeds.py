"""Seeds: of units of work (a recovery batch, an epoch's batch of crops), derived from the run's seed,
and of the global generators (``seed_everything``).

A unit's seed is a hash of the run seed and the unit's indices, so what a unit draws does not
depend on which process or device runs it, nor in which order the units run.
"""
from __future__ import annotations

import hashlib
import random

import numpy as np
import torch


def derived_seed(stage: str, *parts: int) -> int:
    """63-bit seed of one unit of ``stage``: sha256 of ``srel-fast/<stage>/<part>/<part>/...``."""
    key = "/".join(["srel-fast", stage, *(str(p) for p in parts)])
    digest = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)
