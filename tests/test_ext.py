"""Loading the C++/CUDA extension: a failed CUDA build is reported, not swallowed;
the Triton interpreter is chosen by torch's view of the GPU."""
import pytest
import torch

from srel_fast.kernels import _ext
from srel_fast.kernels._backend import reset_for_tests


@pytest.fixture
def fresh_ext_state(monkeypatch):
    saved = dict(_ext._state)
    monkeypatch.delenv("SREL_FAST_NO_EXT", raising=False)
    monkeypatch.setenv("SREL_FAST_JIT", "1")
    reset_for_tests()
    yield
    _ext._state.clear()
    _ext._state.update(saved)
    _ext.has_op.cache_clear()
    from srel_fast.kernels._backend import _resolve

    _resolve.cache_clear()


def _no_prebuilt(monkeypatch):
    real = _ext.importlib.import_module

    def fake(name, *a, **k):
        if name == "srel_fast._C":
            raise ImportError("no prebuilt extension in this test")
        return real(name, *a, **k)

    monkeypatch.setattr(_ext.importlib, "import_module", fake)


def test_failed_cuda_build_is_kept_and_raised(monkeypatch, fresh_ext_state):
    """On a CUDA machine a failing nvcc build falls back to the CPU kernels, and
    require_cuda_extension() raises the compiler's message (the GPU tests call it)."""
    _no_prebuilt(monkeypatch)
    builds = []

    def fake_build(with_cuda):
        builds.append(with_cuda)
        if with_cuda:
            raise RuntimeError("Error building extension 'srel_fast_ext_cuda': bn_stat_loss_cuda.cu(42): error: boom")

    monkeypatch.setattr(_ext, "_jit_build", fake_build)
    monkeypatch.setattr(_ext, "_cuda_buildable", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert _ext.ensure_loaded()  # the CPU kernels still load
    assert builds == [True, False]
    assert not _ext._state["cuda"]
    assert "bn_stat_loss_cuda.cu(42): error: boom" in _ext.cuda_error()
    with pytest.raises(RuntimeError, match="boom"):
        _ext.require_cuda_extension()
    assert not _ext.has_op("bn_stat_loss", "cuda")


def test_no_cuda_device_requires_nothing(monkeypatch, fresh_ext_state):
    _no_prebuilt(monkeypatch)
    monkeypatch.setattr(_ext, "_jit_build", lambda with_cuda: None)
    monkeypatch.setattr(_ext, "_cuda_buildable", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _ext.ensure_loaded()
    _ext.require_cuda_extension()  # no GPU: nothing to require
    assert _ext.cuda_error() is None


def test_triton_interpreter_follows_torch_cuda(monkeypatch):
    """A machine where torch sees a GPU runs compiled Triton in its tests, whatever
    /dev says (the old rule looked for /dev/nvidia0)."""
    import conftest
    import os

    monkeypatch.setattr(os.path, "exists", lambda p: False)  # no /dev/nvidia0
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert conftest.wants_triton_interpreter() is False
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert conftest.wants_triton_interpreter() is True


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_run_uses_compiled_triton_and_cuda_kernels():
    import os

    assert os.environ.get("TRITON_INTERPRET", "0") != "1"
    assert _ext.has_op("bn_stat_loss", "cuda") and _ext.has_op("multicrop_resize", "cuda"), _ext.cuda_error()
