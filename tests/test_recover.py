import os

import pytest
import torch
import torch.nn.functional as F

from conftest import recover, tree_bytes
from srel_fast.bn_matching import ReferenceBNMatching
from srel_fast.errors import NonFiniteLoss, UserError
from srel_fast.models import ModelSpec, bn_layers, build_model, load_model
from srel_fast.recover import class_batches, cosine_lr


def _bn_model(seed=0, arch="convnet3", channels=1, size=8, width=6, classes=5):
    torch.manual_seed(seed)
    model = build_model(ModelSpec(arch, classes, channels, size, width=width))
    # Give the BN layers non-trivial running statistics and affine parameters.
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, channels, size, size) * 2 + 0.5)
        for m in bn_layers(model):
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-0.2, 0.2)
    return model.eval()


def _float64_objective(model, x, targets, r_bn, first_mult):
    """Independent float64 computation of CE + r_bn * sum_l w_l (||var-rv|| + ||mu-rm||)."""
    model = model.double()
    inputs = []
    handles = [m.register_forward_hook(lambda mod, inp, out: inputs.append((mod, inp[0]))) for m in bn_layers(model)]
    logits = model(x.double())
    for h in handles:
        h.remove()
    total = 0.0
    for k, (mod, a) in enumerate(inputs):
        m = a.shape[0] * a.shape[2] * a.shape[3]
        mu = a.sum(dim=(0, 2, 3)) / m
        var = ((a - mu.view(1, -1, 1, 1)) ** 2).sum(dim=(0, 2, 3)) / m
        term = torch.sqrt(((var - mod.running_var) ** 2).sum()) + torch.sqrt(((mu - mod.running_mean) ** 2).sum())
        total = total + (first_mult if k == 0 else 1.0) * term
    ce = -torch.log_softmax(logits, 1)[torch.arange(len(targets)), targets].mean()
    return ce + r_bn * total


@pytest.mark.parametrize("arch,size", [("convnet3", 8), ("resnet18-small", 8)])
def test_reference_loss_equals_float64_formula(arch, size):
    model = _bn_model(arch=arch, size=size, width=8)
    x = torch.randn(5, 1, size, size)
    targets = torch.tensor([0, 1, 2, 3, 4])
    ref = ReferenceBNMatching(model, 10.0)
    loss = F.cross_entropy(model(x), targets) + 0.7 * ref.loss()
    ref.close()
    expected = _float64_objective(model, x, targets, 0.7, 10.0).detach()
    loss = loss.detach()
    assert abs(loss.item() - expected.item()) <= 1e-4 * abs(expected.item())


def test_reference_loss_gradient_gradcheck():
    model = _bn_model(width=4).double()
    targets = torch.tensor([0, 1, 2])
    ref = ReferenceBNMatching(model, 10.0)

    def objective(x):
        return F.cross_entropy(model(x), targets) + 0.5 * ref.loss()

    x = torch.randn(3, 1, 8, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(objective, (x,), eps=1e-6, atol=1e-5)
    ref.close()
    assert not any(m._forward_hooks for m in bn_layers(model))


def test_class_batches_round_robin():
    assert class_batches(5, 2) == [[0, 3], [1, 4], [2]]
    assert class_batches(10, 10) == [list(range(10))]
    b = class_batches(1000, 100)
    assert len(b) == 10 and sorted(c for batch in b for c in batch) == list(range(1000))
    assert cosine_lr(0.25, 0, 100) == 0.25 and abs(cosine_lr(0.25, 100, 100)) < 1e-12


# SRe2L's objective from noise (small images with known real data default to the class-aware one)
PAPER_OBJECTIVE = dict(init="noise", r_class=0.0, first_bn_multiplier=10.0)


def test_recover_tree_is_complete_and_reproducible(digits_teacher, tmp_path):
    teacher, _ = digits_teacher
    m1 = recover(teacher, tmp_path / "a")
    recover(teacher, tmp_path / "b")
    a, b = tree_bytes(tmp_path / "a"), tree_bytes(tmp_path / "b")
    assert a == b and len(a) == 20
    for c in range(10):
        files = sorted(os.listdir(tmp_path / "a" / f"{c:05d}"))
        assert files == ["ipc00000.png", "ipc00001.png"]
    assert m1["completed_batches"] == 2 * 3 and not m1["failed_batches"]
    assert all(e["iterations_done"] == 6 for e in m1["batches"])
    # Another seed gives other images.
    recover(teacher, tmp_path / "c", seed=1)
    assert tree_bytes(tmp_path / "c") != a


@pytest.mark.parametrize("objective", [PAPER_OBJECTIVE, dict(class_images=1)],
                         ids=["paper", "class-aware"])
def test_recover_in_pieces_equals_one_run(digits_teacher, tmp_path, objective):
    teacher, _ = digits_teacher
    recover(teacher, tmp_path / "whole", **objective)
    recover(teacher, tmp_path / "parts", ipc_start=1, ipc_end=2, **objective)
    recover(teacher, tmp_path / "parts", ipc_start=0, ipc_end=1, **objective)
    os.remove(tmp_path / "parts" / "00003" / "ipc00000.png")  # a lost file is redone
    recover(teacher, tmp_path / "parts", **objective)
    assert tree_bytes(tmp_path / "whole") == tree_bytes(tmp_path / "parts")


def test_class_aware_pieces_must_hold_whole_groups(digits_teacher, tmp_path):
    teacher, _ = digits_teacher
    with pytest.raises(UserError, match="multiples of 2"):
        recover(teacher, tmp_path / "o", class_images=2, ipc_start=1, ipc_end=2)


def test_recover_refuses_other_config_in_same_output(digits_teacher, tmp_path):
    teacher, _ = digits_teacher
    recover(teacher, tmp_path / "o")
    with pytest.raises(UserError, match="different config"):
        recover(teacher, tmp_path / "o", lr=0.3)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        recover(teacher, tmp_path / "other")


def test_recover_resumes_a_run_recorded_before_bn_matching(digits_teacher, tmp_path):
    """A recover_config.json written before --bn-matching existed: backend torch then meant the hooks."""
    import json

    teacher, _ = digits_teacher
    kw = dict(PAPER_OBJECTIVE, backend="torch")
    recover(teacher, tmp_path / "o", ipc_end=1, bn_matching="hooks", **kw)
    path = tmp_path / "o" / "recover_config.json"
    record = json.loads(path.read_text())
    del record["config"]["bn_matching"]
    path.write_text(json.dumps(record))
    recover(teacher, tmp_path / "o", ipc_start=1, bn_matching="hooks", **kw)   # resumes
    with pytest.raises(UserError, match=r"different config \(bn_matching\)"):
        recover(teacher, tmp_path / "o", bn_matching="fused", **kw)


def test_bn_matching_and_backend_are_checked_where_the_config_is_read(digits_teacher, tmp_path):
    teacher, _ = digits_teacher
    with pytest.raises(UserError, match="--bn-matching must be hooks or fused"):
        recover(teacher, tmp_path / "a", bn_matching="torch")
    with pytest.raises(UserError, match="--backend must be one of"):
        recover(teacher, tmp_path / "b", backend="hooks")
    assert not os.path.exists(tmp_path / "a") and not os.path.exists(tmp_path / "b")


def test_recover_nonfinite_stops_and_keeps_last_finite(digits_teacher, tmp_path):
    teacher, _ = digits_teacher
    with pytest.raises(NonFiniteLoss, match=r"ipc 0, batch 0"):
        recover(teacher, tmp_path / "nan", r_bn=1e38, **PAPER_OBJECTIVE)
    failed = tmp_path / "nan" / "failed" / "ipc00000_batch00000"
    assert len(os.listdir(failed)) == 4
    assert not os.path.exists(tmp_path / "nan" / "00000" / "ipc00000.png")


def test_recover_skip_nonfinite_goes_on(digits_teacher, tmp_path):
    teacher, _ = digits_teacher
    m = recover(teacher, tmp_path / "skip", r_bn=1e38, on_nonfinite="skip", ipc=1, **PAPER_OBJECTIVE)
    assert len(m["failed_batches"]) == 3 and m["completed_batches"] == 0


@pytest.mark.parametrize("kw,msg", [({"ipc": 0}, "--ipc must be a positive"), ({"iterations": 0}, "--iterations"),
                                    ({"crop_mode": "tile"}, "--crop-mode"), ({"ipc_start": 2}, "--ipc-start"),
                                    ({"lr": -0.1}, "--lr must be"), ({"lr": float("nan")}, "--lr must be")])
def test_recover_bad_ranges(digits_teacher, tmp_path, kw, msg):
    with pytest.raises(UserError, match=msg):
        recover(digits_teacher[0], tmp_path / "bad", **kw)
    assert not os.path.exists(tmp_path / "bad")


def test_squeeze_checkpoint_reloads_with_same_accuracy(digits_teacher):
    from srel_fast.data import Normalization, load_builtin
    from srel_fast.evaluation import evaluate

    path, res = digits_teacher
    loaded = load_model(path)
    acc = evaluate(loaded.model, load_builtin("digits", "test"), Normalization(loaded.mean, loaded.std), torch.device("cpu"))
    assert acc == pytest.approx(res["test_accuracy"]) and acc > 50


def test_image_optimizer_is_fused_adam_equal_to_the_loop_update():
    """Recoverer.optimizer: the original code's Adam(betas 0.5, 0.9), fused on the CPU too;
    over 20 steps it follows the for-loop Adam within float rounding."""
    from types import SimpleNamespace

    from srel_fast.recover import Recoverer

    g = torch.Generator().manual_seed(0)
    start = torch.randn(3, 2, 5, 5, generator=g)
    grads = [torch.randn(start.shape, generator=g) for _ in range(20)]
    ours = start.clone().requires_grad_(True)
    opt = Recoverer.optimizer(SimpleNamespace(cfg=SimpleNamespace(lr=0.1)), ours)  # needs only cfg.lr
    assert opt.defaults["fused"] is True
    ref = start.clone().requires_grad_(True)
    ref_opt = torch.optim.Adam([ref], lr=0.1, betas=(0.5, 0.9), eps=1e-8, foreach=False)
    for grad in grads:
        for x, o in ((ours, opt), (ref, ref_opt)):
            x.grad = grad.clone()
            o.step()
    torch.testing.assert_close(ours.detach(), ref.detach(), rtol=0, atol=1e-5)
