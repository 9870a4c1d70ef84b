"""The recovery and training options beyond SRe2L: real-image start, class-aware BN
matching, several teachers, crop curriculum, shift augmentation, student EMA, seeds."""
from __future__ import annotations

import json
import math

import pytest
import torch

from srel_fast.class_stats import (ClassAwareTerms, class_aware_loss_reference, collect_class_statistics,
                                   group_moments, image_moments)
from srel_fast.data import Normalization, load_builtin
from srel_fast.errors import UserError
from srel_fast.models import ModelSpec, bn_layers, build_model, load_model
from srel_fast.recover import RealImages, RecoverConfig, Recoverer, run_recover
from srel_fast.squeeze import shift_crop_flip
from srel_fast.train import TrainConfig, WeightEMA, parse_seeds, run_train

def _model(seed: int, classes: int = 5, channels: int = 1, size: int = 12) -> torch.nn.Module:
    torch.manual_seed(seed)
    m = build_model(ModelSpec("convnet3", classes, channels, size, 8))
    for bn in bn_layers(m):  # running statistics that differ from a fresh layer's
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    return m.eval()


@pytest.mark.parametrize("n,classes", [(6, 3), (10, 5), (7, 4)])
def test_group_moments_equal_direct_moments(n, classes):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, 5, 3, 4, generator=g, dtype=torch.float64) * 3 + 1
    index = torch.randint(0, classes, (n,), generator=g)
    mean, var = group_moments(*image_moments(x), index, classes)
    for c in range(classes):
        xs = x[index == c]
        if len(xs) == 0:
            assert torch.all(mean[c] == 0)
            continue
        torch.testing.assert_close(mean[c], xs.mean((0, 2, 3)))
        torch.testing.assert_close(var[c], xs.var((0, 2, 3), unbiased=False))


def test_collect_class_statistics_matches_float64_formula():
    model = _model(0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(23, 1, 12, 12, generator=g)
    y = torch.randint(0, 5, (23,), generator=g)
    y[:5] = torch.arange(5)
    acts = []
    hooks = [m.register_forward_hook(lambda m, i, o: acts.append(i[0].double())) for m in bn_layers(model)]
    model(x.double().float())
    for h in hooks:
        h.remove()
    stats = collect_class_statistics(model, x, y, 5, batch_size=7)  # batches split classes
    for a, (cm, cv) in zip(acts, stats):
        for c in range(5):
            torch.testing.assert_close(cm[c].double(), a[y == c].mean((0, 2, 3)), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(cv[c].double(), a[y == c].var((0, 2, 3), unbiased=False), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("matching,backend", [("hooks", "torch"), ("fused", "cpu"), ("fused", "auto")])
@pytest.mark.parametrize("per,groups", [(5, 2), (3, 3)])
def test_class_aware_terms_and_gradient_match_float64_reference(matching, backend, per, groups):
    """The (paper, class) terms of the hooks and of the fused kernels from per-image
    moments, and their input gradient, against the obvious float64 formula."""
    _check_class_aware_terms(matching, backend, per, groups, torch.device("cpu"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["triton", "cuda", "auto"])
@pytest.mark.parametrize("per,groups", [(5, 2), (4, 8)])
def test_class_aware_terms_gpu(backend, per, groups):
    """The class-aware path (per-image moments, groups = N) through the CUDA and Triton kernels."""
    _check_class_aware_terms("fused", backend, per, groups, torch.device("cuda"))


def _check_class_aware_terms(matching, backend, per, groups, device):
    from srel_fast.bn_matching import bn_matching

    model = _model(3)
    n = per * groups
    g = torch.Generator().manual_seed(per * 10 + groups)
    class_index = torch.randint(0, 5, (n,), generator=g)
    batch_index = torch.arange(n) // per
    targets = [(torch.randn(5, bn.num_features, generator=g), torch.rand(5, bn.num_features, generator=g) + 0.5)
               for bn in bn_layers(model)]
    x0 = torch.randn(n, 1, 12, 12, generator=g)
    fbm = 3.0
    weights = [fbm] + [1.0] * (len(targets) - 1)
    model.to(device)
    with bn_matching(model, fbm, matching, backend) as stats:
        terms = ClassAwareTerms([(m.to(device), v.to(device)) for m, v in targets], stats.layers, 5)
        stats.set_moments_loss(terms)
        stats.set_groups(n)
        terms.set_batch(batch_index.to(device), class_index.to(device))
        x = x0.clone().to(device).requires_grad_(True)
        model(x)
        paper, cls = stats.loss()
        (2.0 * paper + 0.5 * cls).backward()
    model.cpu()
    acts = []
    hooks = [m.register_forward_hook(lambda m, i, o: acts.append(i[0])) for m in bn_layers(model)]
    xr = x0.double().requires_grad_(True)
    model.double()(xr)
    for h in hooks:
        h.remove()
    running = [(m.running_mean, m.running_var) for m in bn_layers(model)]
    ref_paper, ref_cls = class_aware_loss_reference(acts, running, targets, weights, batch_index, class_index)
    (2.0 * ref_paper + 0.5 * ref_cls).backward()
    torch.testing.assert_close(paper.double().cpu(), ref_paper, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cls.double().cpu(), ref_cls, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(x.grad.double().cpu(), xr.grad, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("matching,backend", [("hooks", "torch"), ("fused", "auto")])
def test_several_teachers_loss_is_mean_ce_plus_summed_bn_terms(matching, backend):
    norm = Normalization((0.5,), (0.25,))
    cfg = RecoverConfig(out="", batch_size=5, bn_matching=matching, backend=backend, crop_mode="image", init="noise",
                        r_class=0.0,
                        r_bn=0.7, iterations=4)
    teachers = [_model(1), _model(2)]
    boxes = torch.tensor([[0, 0, 12, 12], [1, 2, 9, 10], [0, 0, 7, 7], [3, 3, 12, 12], [2, 0, 10, 12]],
                         dtype=torch.float32)
    flip = torch.tensor([False, True, False, True, False])
    x = torch.randn(5, 1, 12, 12, generator=torch.Generator().manual_seed(5))
    y = torch.arange(5)
    parts = []
    for t in teachers:
        with Recoverer([t], norm, 12, 1, cfg, torch.device("cpu")) as rec:
            parts.append([v.detach() for v in rec.loss_fn(x, y, boxes, flip, None)])
    with Recoverer(teachers, norm, 12, 1, cfg, torch.device("cpu")) as rec:
        loss, ce, bn = rec.loss_fn(x, y, boxes, flip, None)
    torch.testing.assert_close(ce.detach(), (parts[0][1] + parts[1][1]) / 2)
    torch.testing.assert_close(bn.detach(), parts[0][2] + parts[1][2])
    torch.testing.assert_close(loss.detach(), ce.detach() + 0.7 * bn.detach())


def test_real_images_are_of_the_class_distinct_and_seeded():
    data = load_builtin("digits", "train")
    real = RealImages(data.images, data.labels, 10, seed=3)
    picks = [[real.index(c, i) for i in range(5)] for c in range(10)]
    for c, idx in enumerate(picks):
        assert all(int(data.labels[i]) == c for i in idx)
        assert len(set(idx)) == 5
    assert picks == [[RealImages(data.images, data.labels, 10, seed=3).index(c, i) for i in range(5)] for c in range(10)]
    assert picks != [[RealImages(data.images, data.labels, 10, seed=4).index(c, i) for i in range(5)] for c in range(10)]
    assert torch.equal(real.pick([4, 7], 2), data.images[[picks[4][2], picks[7][2]]])


def _herding_reference(features: list[list[float]], count: int) -> list[int]:
    """Herding written out in plain Python floats: each step picks the unpicked vector
    that brings the running mean of the picks nearest the mean of all (normalised)."""
    unit = [[v / math.sqrt(sum(u * u for u in f)) for v in f] for f in features]
    mu = [sum(col) / len(unit) for col in zip(*unit)]
    picked: list[int] = []
    total = [0.0] * len(mu)
    for k in range(1, count + 1):
        best = min((i for i in range(len(unit)) if i not in picked),
                   key=lambda i: sum(((t + v) / k - m) ** 2 for t, v, m in zip(total, unit[i], mu)))
        picked.append(best)
        total = [t + v for t, v in zip(total, unit[best])]
    return picked


@pytest.mark.parametrize("n,d,count", [(9, 3, 4), (30, 7, 30), (50, 16, 10)])
def test_herding_order_matches_plain_python_reference(n, d, count):
    from srel_fast.recover import herding_order

    g = torch.Generator().manual_seed(n * 100 + d)
    features = torch.randn(n, d, generator=g) * torch.rand(n, 1, generator=g) + 0.3
    order = herding_order(features, count)
    assert order.tolist() == _herding_reference(features.double().tolist(), count)
    assert len(set(order.tolist())) == min(count, n)


def test_penultimate_features_are_the_classifier_input():
    from srel_fast.recover import penultimate_features

    model = _model(2)
    x = torch.randn(13, 1, 12, 12, generator=torch.Generator().manual_seed(0))
    features, logits = penultimate_features(model, x, batch_size=4)
    with torch.no_grad():
        torch.testing.assert_close(features, model.embed(x).flatten(1))
        torch.testing.assert_close(logits, model(x))
        torch.testing.assert_close(model.classifier(features), logits)


@pytest.mark.parametrize("select", ["confident", "band", "herding"])
def test_real_images_chosen_by_the_teacher(digits_teacher, select):
    """confident: the class's images in the teacher's order of confidence (every image of a
    digits class is a candidate); herding: the reference's picks over the teacher's features;
    both of the right class, seeded, and independent of the order classes are asked in."""
    from srel_fast.recover import INIT_CANDIDATES, penultimate_features

    lm = load_model(digits_teacher[0])
    data = load_builtin("digits", "train")
    norm = Normalization(lm.mean, lm.std)
    images = norm.normalize(data.images)
    real = RealImages(images, data.labels, 10, seed=3, select=select, model=lm.model.eval(), count=4)
    assert real.model is None   # chosen at once: nothing is asked of the teacher later
    for c in (7, 0, 3):
        idx = torch.nonzero(data.labels == c).flatten()
        assert idx.numel() <= INIT_CANDIDATES
        picks = [real.index(c, i) for i in range(4)]
        assert all(int(data.labels[i]) == c for i in picks)
        features, logits = penultimate_features(lm.model, images[idx])
        pos = {int(j): k for k, j in enumerate(idx)}
        if select in ("confident", "band"):
            # near-certain images have log-probabilities a float rounding apart: compare with a tolerance
            logp = logits.double().log_softmax(1)[:, c]
            got = [float(logp[pos[i]]) for i in picks]
            assert all(a >= b - 1e-5 for a, b in zip(got, got[1:]))
            ranked = sorted((float(v) for v in logp), reverse=True)
            skip = len(ranked) // 4 if select == "band" else 0   # band: from the first quartile on
            assert got == pytest.approx(ranked[skip:skip + 4], abs=1e-5)
        else:
            order = _herding_reference(features.double().tolist(), 4)
            # the candidates come in a seeded order: compare as sets of image indices, then the order
            assert sorted(picks) == sorted(int(idx[k]) for k in order)
    again = RealImages(images, data.labels, 10, seed=3, select=select, model=lm.model.eval(), count=4)
    assert [again.index(c, i) for c in range(10) for i in range(4)] == \
        [real.index(c, i) for c in range(10) for i in range(4)]


def test_init_select_is_a_recipe_field_and_validated(digits_teacher, tmp_path):
    m = run_recover(RecoverConfig(out=str(tmp_path / "h"), weights=digits_teacher[0], ipc=1, iterations=1, lr=0.0,
                                  device="cpu", progress=False, init_select="herding", seed=2))
    assert m["config"]["init_select"] == "herding"
    assert m["recipe"]["overrides"]["init_select"] == {"value": "herding", "recipe": "random"}
    d = run_recover(RecoverConfig(out=str(tmp_path / "d"), weights=digits_teacher[0], ipc=1, iterations=1, lr=0.0,
                                  device="cpu", progress=False))
    assert d["config"]["init_select"] == "random" and "init_select" not in d["recipe"]["overrides"]
    with pytest.raises(UserError, match="--init-select must be"):
        run_recover(RecoverConfig(out=str(tmp_path / "x"), weights=digits_teacher[0], ipc=1, device="cpu",
                                  progress=False, init_select="best"))
    with pytest.raises(UserError, match="needs --init real"):
        run_recover(RecoverConfig(out=str(tmp_path / "n"), weights=digits_teacher[0], ipc=1, device="cpu",
                                  progress=False, init="noise", init_select="herding"))


def test_recovery_from_real_images_starts_at_them(digits_teacher, tmp_path):
    """With no iteration budget spent (lr 0), the saved images are the chosen real images."""
    out = tmp_path / "r"
    run_recover(RecoverConfig(out=str(out), weights=digits_teacher[0], ipc=2, iterations=1, lr=0.0, device="cpu",
                              progress=False, init="real", r_class=0.0, seed=5))
    data = load_builtin("digits", "train")
    real = RealImages(data.images, data.labels, 10, seed=5)
    from srel_fast.images import load_tree

    images, labels, classes = load_tree(str(out))
    assert images.dtype == torch.uint8
    for img, lab in zip(images.float() / 255, labels):
        c = int(classes[lab])
        starts = [data.images[real.index(c, i)].float() / 255 for i in range(2)]
        assert min(float((img - s).abs().max()) for s in starts) <= 1 / 255 + 1e-6


def test_class_aware_recovery_records_rules_and_lowers_its_term(digits_teacher, tmp_path):
    m = run_recover(RecoverConfig(out=str(tmp_path / "c"), weights=digits_teacher[0], ipc=2, iterations=30,
                                  device="cpu", progress=False, class_images=2))
    assert m["config"]["init"] == "real" and m["config"]["r_class"] == 1.0 and m["completed_batches"] == 2
    assert m["recipe"]["from_recipe"]["r_class"] == 1.0
    assert all(b["class_term"] > 0 and math.isfinite(b["class_term"]) for b in m["batches"])
    # the class term of the start images is larger than after 30 iterations
    m0 = run_recover(RecoverConfig(out=str(tmp_path / "c0"), weights=digits_teacher[0], ipc=2, iterations=1,
                                   lr=0.0, device="cpu", progress=False, class_images=2))
    assert sum(b["class_term"] for b in m["batches"]) < sum(b["class_term"] for b in m0["batches"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_class_aware_recovery_on_the_cuda_fast_path(digits_teacher, tmp_path):
    """Class-aware recovery on CUDA: the compiled step with CUDA graphs gives the eager
    kernels' terms at the start images (lr 0), and 30 iterations lower the class term."""
    common = dict(weights=digits_teacher[0], ipc=2, device="cuda", progress=False, class_images=2, amp="none",
                  channels_last=False)
    at_start = {}
    for name, fast in (("eager", False), ("compiled", True)):
        m = run_recover(RecoverConfig(out=str(tmp_path / name), iterations=1, lr=0.0, compile=fast,
                                      cuda_graphs=fast, **common))
        assert m["config"]["compile"] is fast and m["config"]["r_class"] == 1.0
        at_start[name] = [(b["ce"], b["bn"], b["class_term"]) for b in m["batches"]]
    for eager, compiled in zip(at_start["eager"], at_start["compiled"]):
        assert compiled == pytest.approx(eager, rel=2e-3)
    m = run_recover(RecoverConfig(out=str(tmp_path / "run"), iterations=30, compile=True, cuda_graphs=True, **common))
    assert m["completed_batches"] == 2
    assert sum(b["class_term"] for b in m["batches"]) < sum(c for _, _, c in at_start["compiled"])


def test_class_aware_needs_real_data(tmp_path):
    with pytest.raises(UserError, match="--r-class needs the per-class BN statistics"):
        Recoverer(_model(0), Normalization((0.5,), (0.25,)), 12, 1,
                  RecoverConfig(out="", r_class=1.0, init="noise"), torch.device("cpu"))
    with pytest.raises(UserError, match="--init real needs real training images"):
        Recoverer(_model(0), Normalization((0.5,), (0.25,)), 12, 1,
                  RecoverConfig(out="", init="real", r_class=0.0), torch.device("cpu"))


def test_squeeze_checkpoint_carries_class_statistics(digits_teacher):
    lm = load_model(digits_teacher[0])
    stats = lm.meta["class_bn_stats"]
    assert len(stats) == len(bn_layers(lm.model))
    assert stats[0]["mean"].shape == (10, bn_layers(lm.model)[0].num_features)


def test_crop_curriculum_eases_from_max_to_min_scale():
    cfg = RecoverConfig(out="", crop_curriculum="cda", min_scale=0.2, max_scale=0.9, iterations=11, init="noise",
                        r_class=0.0)
    rec = Recoverer(_model(0), Normalization((0.5,), (0.25,)), 12, 1, cfg, torch.device("cpu"))
    lows = [rec.min_scale_at(i) for i in range(11)]
    assert lows[0] == pytest.approx(0.9) and lows[-1] == pytest.approx(0.2)
    assert all(a >= b for a, b in zip(lows, lows[1:]))
    flat = Recoverer(_model(0), Normalization((0.5,), (0.25,)), 12, 1,
                     RecoverConfig(out="", min_scale=0.2, iterations=11, init="noise", r_class=0.0),
                     torch.device("cpu"))
    assert {flat.min_scale_at(i) for i in range(11)} == {0.2}


def test_shift_crop_flip_moves_pixels_within_the_pad():
    g = torch.Generator().manual_seed(0)
    x = torch.arange(2 * 1 * 6 * 6, dtype=torch.float32).view(2, 1, 6, 6) + 1
    out = shift_crop_flip(x, 2, g, 2)
    g = torch.Generator().manual_seed(0)
    off = torch.randint(0, 5, (2, 2), generator=g)
    flip = torch.rand(2, generator=g) < 0.5
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(2):
        ref = padded[i, :, off[i, 0]:off[i, 0] + 6, off[i, 1]:off[i, 1] + 6]
        if flip[i]:
            ref = ref.flip(-1)
        assert torch.equal(out[i], ref)


def test_weight_ema_update():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    ema = WeightEMA(model, 0.9)
    before = [p.detach().clone() for p in ema.model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    model.train()(torch.randn(4, 3))  # moves the BN buffers
    ema.update(model)
    for e, b, p in zip(ema.model.parameters(), before, model.parameters()):
        torch.testing.assert_close(e, 0.9 * b + 0.1 * p.detach())
    for e, b in zip(ema.model.buffers(), model.buffers()):
        assert torch.equal(e, b)


def test_seeds_parse_and_summary(digits_teacher, tmp_path):
    assert parse_seeds("0, 2,5") == [0, 2, 5]
    for bad in ("", "1,1", "a"):
        with pytest.raises(UserError):
            parse_seeds(bad)
    syn = tmp_path / "syn"
    run_recover(RecoverConfig(out=str(syn), weights=digits_teacher[0], ipc=1, iterations=2, device="cpu",
                              progress=False))
    res = run_train(TrainConfig(syn=str(syn), out=str(tmp_path / "t"), val="digits", arch="convnet3", width=8,
                                teacher=digits_teacher[0], epochs=2, device="cpu", progress=False, seeds="0,1",
                                ema=0.5))
    saved = json.load(open(tmp_path / "t" / "train_results.json"))
    accs = [saved["test_accuracy"][k] for k in ("0", "1")]
    assert saved["test_accuracy_mean"] == pytest.approx(sum(accs) / 2)
    assert saved["test_accuracy_std"] == pytest.approx(abs(accs[0] - accs[1]) / math.sqrt(2))
    assert res["seeds"] == [0, 1] and (tmp_path / "t" / "seed1" / "student.pt").exists()
