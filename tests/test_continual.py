"""Class-incremental protocol (SRe2L Sec. 3.7, DM/GDumb): splits, memory budget, a tiny end-to-end run."""
import json

import pytest
import torch

from srel_fast.continual import (ContinualConfig, MaskedLogits, class_order, class_splits, memory_indices,
                                 run_continual, seen_classes)
from srel_fast.errors import UserError


@pytest.mark.parametrize("steps", [1, 2, 3, 5, 10])
@pytest.mark.parametrize("order", ["seed", "natural"])
def test_splits_disjoint_cover_all(steps, order):
    o = class_order(10, order, seed=3)
    splits = class_splits(o, steps)
    assert len(splits) == steps
    flat = [c for s in splits for c in s]
    assert sorted(flat) == list(range(10)) and len(set(flat)) == 10  # disjoint, union = all classes
    assert flat == o  # consecutive chunks of the order
    sizes = [len(s) for s in splits]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1
    assert seen_classes(splits, steps - 1) == o


def test_order_reproducible_from_seed():
    assert class_order(10, "seed", 0) == class_order(10, "seed", 0)
    assert class_order(10, "seed", 0) != class_order(10, "seed", 1)
    assert class_order(10, "natural", 5) == list(range(10))
    assert class_order(10, "seed", 0) == torch.randperm(10, generator=torch.Generator().manual_seed(0)).tolist()
    with pytest.raises(UserError):
        class_order(10, "random")
    with pytest.raises(UserError):
        class_splits(list(range(10)), 11)


def test_memory_budget_constant_per_class_total_grows():
    labels = torch.arange(10).repeat_interleave(7)[torch.randperm(70, generator=torch.Generator().manual_seed(0))]
    splits = class_splits(class_order(10, "seed", 0), 5)
    totals = []
    for step in range(5):
        seen = seen_classes(splits, step)
        idx = memory_indices(labels, seen, ipc=4)
        counts = torch.bincount(labels[idx], minlength=10)
        assert all(int(counts[c]) == 4 for c in seen)
        assert int(counts.sum()) == 4 * len(seen)
        totals.append(len(idx))
    assert totals == [8, 16, 24, 32, 40]
    # the memory of earlier classes is the same images at every step (a fixed class-balanced memory)
    first = memory_indices(labels, splits[0], 4)
    assert torch.equal(memory_indices(labels, seen_classes(splits, 4), 4)[:8], first)
    with pytest.raises(UserError):
        memory_indices(labels, [0], ipc=8)


def test_masked_logits():
    m = MaskedLogits(torch.nn.Identity(), [1, 3], 4)
    out = m(torch.zeros(2, 4))
    assert out.argmax(1).tolist() == [1, 1]
    assert torch.softmax(out / 20, 1)[:, [0, 2]].max() == 0


def test_continual_end_to_end_on_digits(digits_teacher, tmp_path):
    from srel_fast.cli import main

    syn = tmp_path / "syn"
    assert main(["recover", "--weights", digits_teacher[0], "--ipc", "2", "--iterations", "3", "--out", str(syn),
                 "--device", "cpu", "--no-progress"]) == 0
    out = tmp_path / "cl"
    assert main(["continual", "--syn", str(syn), "--data", "digits", "--steps", "2", "--ipc", "2", "--epochs", "2",
                 "--width", "16", "--batch-size", "10", "--device", "cpu", "--out", str(out)]) == 0
    res = json.loads((out / "continual_results.json").read_text())
    assert set(res["results"]["2"]) == {"synthetic-soft", "real-soft", "real-hard"}
    assert all(len(v) == 2 and all(0 <= a <= 100 for a in v) for v in res["results"]["2"].values())
    assert res["teacher"] == digits_teacher[0]  # defaults to the recovery model
    assert sorted(c for s in res["splits"]["2"] for c in s) == list(range(10))
    assert "| srel-fast synthetic, soft labels |" in (out / "continual.md").read_text()
    assert (out / "continual.png").stat().st_size > 1000
    # re-running skips finished steps
    r2 = run_continual(ContinualConfig(out=str(out), syn=str(syn), data="digits", steps="2", ipc=2, epochs=2,
                                       width=16, batch_size=10, device="cpu"))
    assert r2["results"] == res["results"] and r2["seconds"] < 5
