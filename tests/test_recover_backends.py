"""The fused kernels inside recovery: same objective, same trajectory as the reference."""
import pytest
import torch

from conftest import tree_bytes
from srel_fast.data import Normalization
from srel_fast.kernels import _ext
from srel_fast.models import load_model
from srel_fast.recover import Recoverer, RecoverConfig

needs_ext = pytest.mark.skipif(not _ext.has_op("bn_stat_loss", "cpu") or not _ext.has_op("multicrop_resize", "cpu"),
                               reason=f"C++ extension unavailable: {_ext.load_error()}")


# SRe2L's objective from noise in fp32 (small images with known real data default to the
# class-aware objective, and a CPU with native bf16 to bf16 autocast)
PAPER_FP32 = dict(init="noise", r_class=0.0, first_bn_multiplier=10.0, amp="none", channels_last=False)


def _run(teacher, iterations=5, **kw):
    loaded = load_model(teacher)
    kw = {"amp": "none", "channels_last": False, **kw}  # fp32 everywhere: backends compared at 1e-4
    cfg = RecoverConfig(out="", weights=teacher, ipc=1, iterations=iterations, device="cpu", progress=False, **kw)
    cfg = cfg.resolved(loaded.spec.image_size)
    with Recoverer(loaded.model, Normalization(loaded.mean, loaded.std), loaded.spec.image_size,
                   loaded.spec.in_channels, cfg, torch.device("cpu")) as rec:
        return rec.run_group([(list(range(10)), 0, 0)])[0]


@needs_ext
@pytest.mark.parametrize("crop_mode", ["batch", "image"])
def test_fused_backend_follows_reference(digits_teacher, crop_mode):
    ref = _run(digits_teacher[0], bn_matching="hooks", backend="torch", crop_mode=crop_mode)
    fused = _run(digits_teacher[0], bn_matching="fused", backend="cpu", crop_mode=crop_mode)
    assert ref.status == fused.status == "ok"
    assert fused.loss == pytest.approx(ref.loss, rel=1e-4, abs=1e-5)
    assert fused.bn == pytest.approx(ref.bn, rel=1e-4, abs=1e-5)
    torch.testing.assert_close(fused.images, ref.images, atol=1e-4, rtol=0)


def test_crop_modes_differ(digits_teacher):
    a = _run(digits_teacher[0], iterations=2, bn_matching="hooks", backend="torch", crop_mode="batch")
    b = _run(digits_teacher[0], iterations=2, bn_matching="hooks", backend="torch", crop_mode="image")
    assert not torch.equal(a.images, b.images)


@needs_ext
def test_compiled_step_matches_eager(digits_teacher):
    eager = _run(digits_teacher[0], iterations=3, backend="cpu", crop_mode="image")
    compiled = _run(digits_teacher[0], iterations=3, backend="cpu", crop_mode="image", compile=True)
    assert compiled.loss == pytest.approx(eager.loss, rel=1e-4, abs=1e-5)
    torch.testing.assert_close(compiled.images, eager.images, atol=1e-4, rtol=0)


def test_compiled_step_draws_the_same_crops_with_fused_box_arithmetic(digits_teacher):
    """With --compile the crop boxes' arithmetic runs compiled (fewer host launches per
    iteration); the crops of every iteration are those of the eager path. Under the CDA
    curriculum, whose scale changes every iteration, it stays eager."""
    loaded = load_model(digits_teacher[0])
    norm = Normalization(loaded.mean, loaded.std)
    crops = {}
    for compiled in (False, True):
        cfg = RecoverConfig(out="", weights=digits_teacher[0], ipc=1, device="cpu", progress=False, compile=compiled,
                            crop_mode="image", amp="none", channels_last=False).resolved(loaded.spec.image_size)
        with Recoverer(loaded.model, norm, loaded.spec.image_size, loaded.spec.in_channels, cfg,
                       torch.device("cpu")) as rec:
            assert (rec.boxes_from_uniforms is not None) == compiled
            gens = [torch.Generator().manual_seed(7), torch.Generator().manual_seed(8)]
            crops[compiled] = [rec._crop_params(2 * 300, gens, it) for it in range(3)]
    for eager, fused in zip(crops[False], crops[True]):
        assert torch.equal(eager.boxes, fused.boxes) and torch.equal(eager.flip, fused.flip)
        assert (eager.shift is None and fused.shift is None) or torch.equal(eager.shift, fused.shift)
    cfg = RecoverConfig(out="", weights=digits_teacher[0], ipc=1, device="cpu", progress=False, compile=True,
                        crop_curriculum="cda").resolved(loaded.spec.image_size)
    with Recoverer(loaded.model, norm, loaded.spec.image_size, loaded.spec.in_channels, cfg,
                   torch.device("cpu")) as rec:
        assert rec.boxes_from_uniforms is None


def test_compiled_box_arithmetic_falls_back_to_eager(monkeypatch, capsys):
    """If compiling the box arithmetic fails (some device or torch version), recovery warns
    once and goes on with the eager function: the same boxes."""
    from srel_fast import recover as recover_module
    from srel_fast.kernels import crop_boxes_from_uniforms, draw_crop_uniforms

    def broken_compile(fn, **kw):
        def run(*args):
            raise RuntimeError("backend compiler failed\nsecond line")
        return run

    monkeypatch.setattr(recover_module.torch, "compile", broken_compile)
    fn = recover_module._compiled_or_eager(crop_boxes_from_uniforms)
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        u = draw_crop_uniforms(50, g, torch.device("cpu"))
        assert torch.equal(fn(*u, 28, 28, (0.5, 1.0), (3 / 4, 4 / 3)),
                           crop_boxes_from_uniforms(*u, 28, 28, (0.5, 1.0), (3 / 4, 4 / 3)))
    err = capsys.readouterr().err
    assert err.count("warning: torch.compile of crop_boxes_from_uniforms failed") == 1
    assert "RuntimeError: backend compiler failed)" in err


@pytest.mark.parametrize("matching,backend", [("hooks", "torch"), pytest.param("fused", "cpu", marks=needs_ext)])
def test_grouped_batches_follow_their_own_objectives(digits_teacher, tmp_path, matching, backend):
    """Three recovery batches stacked into one launch give each batch the images it gets alone."""
    from srel_fast.recover import run_recover

    def run(out, groups):
        return run_recover(RecoverConfig(out=str(tmp_path / out), weights=digits_teacher[0], ipc=3, iterations=6,
                                         batch_size=5, crop_mode="image", bn_matching=matching, backend=backend,
                                         group_batches=groups,
                                         device="cpu", progress=False, **PAPER_FP32))

    alone, stacked = run("alone", 1), run("stacked", 3)
    assert {e["group_batches"] for e in stacked["batches"]} == {3}
    a, b = tree_bytes(tmp_path / "alone"), tree_bytes(tmp_path / "stacked")
    assert a.keys() == b.keys() and len(a) == 30
    from srel_fast.images import load_tree

    ia, _, _ = load_tree(str(tmp_path / "alone"))
    ib, _, _ = load_tree(str(tmp_path / "stacked"))
    assert (ia.int() - ib.int()).abs().max() <= 1  # at most one grey level of rounding
    total = lambda m: sum(e["loss"] for e in m["batches"])
    assert total(stacked) == pytest.approx(total(alone), rel=1e-4)


def test_grouped_divergence_fails_only_that_batch(digits_teacher, tmp_path):
    from srel_fast.recover import run_recover

    m = run_recover(RecoverConfig(out=str(tmp_path / "g"), weights=digits_teacher[0], ipc=1, iterations=3, batch_size=4,
                                  r_bn=1e38, group_batches=2, on_nonfinite="skip", device="cpu", progress=False,
                                  **PAPER_FP32))
    assert len(m["failed_batches"]) == 3 and all(e["group_batches"] in (1, 2) for e in m["batches"])


def _bn_only_model() -> torch.nn.Module:
    """Conv -> BN -> ReLU -> pool -> Linear with a zero classifier: the cross-entropy
    gradient w.r.t. the images is exactly zero, so x.grad is the BN term's alone."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 10))
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
        model[5].weight.zero_()
    return model.eval()


def _bn_grad(amp: str, matching: str, backend: str) -> torch.Tensor:
    import copy

    cfg = RecoverConfig(out="", ipc=1, iterations=10, device="cpu", progress=False, amp=amp, bn_matching=matching,
                        backend=backend, r_bn=1e-5, crop_mode="image").resolved(64)
    with Recoverer(copy.deepcopy(_bn_only_model()), Normalization((0.5,) * 3, (0.5,) * 3), 64, 3, cfg,
                   torch.device("cpu")) as rec:
        x = rec.batch_images(4, seed=3)
        opt = torch.optim.Adam([x], lr=cfg.lr, betas=(0.5, 0.9), eps=1e-8)
        rec.step(x, torch.arange(4), torch.Generator().manual_seed(1), opt, 0)
        return x.grad.detach().clone()  # unscaled by the step when a scaler is used


@pytest.mark.parametrize("matching,backend", [("hooks", "torch"), pytest.param("fused", "cpu", marks=needs_ext)])
def test_fp16_recovery_keeps_tiny_bn_gradients(matching, backend):
    # At r_bn 1e-5 the BN-term gradient at the conv output is ~1e-9 per element, below
    # fp16's smallest subnormal: without loss scaling it flushes to zero in fp16.
    ref = _bn_grad("none", matching, backend)
    half = _bn_grad("fp16", matching, backend)
    assert ref.abs().max() > 0
    cos = torch.nn.functional.cosine_similarity(ref.flatten(), half.flatten(), dim=0)
    assert cos > 0.99, f"fp16 gradient lost the BN term (cosine {cos:.3f})"
    assert (half.norm() / ref.norm() - 1).abs() < 0.05


def test_cuda_graphs_off_with_torch_backend(capsys):
    # The torch crop path reads box sizes on the host, which a CUDA graph cannot capture:
    # graphs must be refused there (decided without a GPU: only the flag logic runs).
    base = dict(out="", compile=True, cuda_graphs=True)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert Recoverer.graphs_enabled(RecoverConfig(**base, backend="auto"), cuda)
    assert not Recoverer.graphs_enabled(RecoverConfig(**base, backend="auto"), cpu)
    assert not Recoverer.graphs_enabled(RecoverConfig(out="", cuda_graphs=True, backend="auto"), cuda)  # no compile
    assert "--cuda-graphs" not in capsys.readouterr().err
    assert not Recoverer.graphs_enabled(RecoverConfig(**base, backend="torch"), cuda)
    assert "--cuda-graphs is off with --backend torch" in capsys.readouterr().err
