"""The fused kernels inside recovery: same objective, same trajectory as the reference."""
import pytest
import torch

from srel_fast.data import Normalization
from srel_fast.kernels import _ext
from srel_fast.models import load_model
from srel_fast.recover import Recoverer, RecoverConfig

needs_ext = pytest.mark.skipif(not _ext.has_op("bn_stat", "cpu") or not _ext.has_op("multicrop", "cpu"),
                               reason=f"C++ extension unavailable: {_ext.load_error()}")


def _run(teacher, iterations=5, **kw):
    loaded = load_model(teacher)
    cfg = RecoverConfig(out="", weights=teacher, ipc=1, iterations=iterations, device="cpu", progress=False, **kw)
    cfg = cfg.resolved(loaded.spec.image_size)
    with Recoverer(loaded.model, Normalization(loaded.mean, loaded.std), loaded.spec.image_size,
                   loaded.spec.in_channels, cfg, torch.device("cpu")) as rec:
        return rec.run_batch(list(range(10)), 0, 0)


@needs_ext
@pytest.mark.parametrize("crop_mode", ["batch", "image"])
def test_fused_backend_follows_reference(digits_teacher, crop_mode):
    ref = _run(digits_teacher[0], backend="torch", crop_mode=crop_mode)
    fused = _run(digits_teacher[0], backend="cpu", crop_mode=crop_mode)
    assert ref.status == fused.status == "ok"
    assert fused.loss == pytest.approx(ref.loss, rel=1e-4, abs=1e-5)
    assert fused.bn == pytest.approx(ref.bn, rel=1e-4, abs=1e-5)
    torch.testing.assert_close(fused.images, ref.images, atol=1e-4, rtol=0)


def test_crop_modes_differ(digits_teacher):
    a = _run(digits_teacher[0], iterations=2, backend="torch", crop_mode="batch")
    b = _run(digits_teacher[0], iterations=2, backend="torch", crop_mode="image")
    assert not torch.equal(a.images, b.images)


@needs_ext
def test_compiled_step_matches_eager(digits_teacher):
    eager = _run(digits_teacher[0], iterations=3, backend="cpu", crop_mode="image")
    compiled = _run(digits_teacher[0], iterations=3, backend="cpu", crop_mode="image", compile=True)
    assert compiled.loss == pytest.approx(eager.loss, rel=1e-4, abs=1e-5)
    torch.testing.assert_close(compiled.images, eager.images, atol=1e-4, rtol=0)
