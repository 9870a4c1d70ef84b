import os

import pytest
import torch
import torchvision

from srel_fast.errors import UserError
from srel_fast.models import ModelSpec, bn_layers, build_model, load_model, require_batchnorm, save_checkpoint


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_resnet_state_dict_identical_to_torchvision(arch):
    ours = build_model(ModelSpec(arch, 1000)).state_dict()
    ref = torchvision.models.get_model(arch, weights=None).state_dict()
    assert list(ours.keys()) == list(ref.keys())
    assert all(ours[k].shape == ref[k].shape for k in ref)


@pytest.mark.parametrize("arch,channels", [("resnet18-small", 1), ("resnet18-small", 3), ("resnet50-small", 2)])
def test_small_resnet_stem(arch, channels):
    model = build_model(ModelSpec(arch, 7, channels, 28))
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, torch.nn.Identity)
    assert model(torch.randn(2, channels, 28, 28)).shape == (2, 7)


@pytest.mark.parametrize("arch,n_bn", [("convnet3", 3), ("convnet4", 4), ("convnet3-in", 0), ("convnet4-in", 0)])
def test_convnets(arch, n_bn):
    model = build_model(ModelSpec(arch, 10, 3, 32, width=128))
    assert len(bn_layers(model)) == n_bn
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    if arch.endswith("-in"):
        assert any(isinstance(m, torch.nn.GroupNorm) and m.num_groups == m.num_channels for m in model.modules())


def test_torchvision_model_by_name_and_grey_input():
    model = build_model(ModelSpec("mobilenet_v2", 5, 1, 32))
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 5)
    require_batchnorm(model, "mobilenet_v2")


def test_model_without_batchnorm_is_refused():
    with pytest.raises(UserError, match="no BatchNorm"):
        require_batchnorm(build_model(ModelSpec("convnet3-in", 10, 1, 28)), "convnet3-in")
    with pytest.raises(UserError, match="unknown arch"):
        build_model(ModelSpec("resnet9000", 10))


def test_torchvision_state_dict_file_loads(tmp_path):
    ref = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18_v1.pth"
    torch.save(ref.state_dict(), path)
    loaded = load_model(str(path), "resnet18")
    assert loaded.spec.num_classes == 1000 and loaded.spec.image_size == 224
    for k, v in ref.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[k], v)
    assert loaded.mean == (0.485, 0.456, 0.406)


def test_hub_cache_weights_are_found(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    ref = torchvision.models.resnet18(weights=None)
    os.makedirs(tmp_path / "hub" / "checkpoints")
    torch.save(ref.state_dict(), tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth")
    loaded = load_model(None, "resnet18")
    assert torch.equal(loaded.model.fc.weight, ref.fc.weight)


def test_missing_hub_weights_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(UserError, match="nothing is downloaded"):
        load_model(None, "resnet50")


def test_bad_weights_files(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="not a PyTorch checkpoint"):
        load_model(str(junk), "resnet18")
    other = tmp_path / "r50.pth"
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), other)
    with pytest.raises(UserError, match="does not match arch 'resnet18'"):
        load_model(str(other), "resnet18")
    with pytest.raises(UserError, match="does not exist"):
        load_model(str(tmp_path / "nope.pt"), "resnet18")


def test_checkpoint_roundtrip(tmp_path):
    spec = ModelSpec("convnet3", 4, 1, 16, width=8)
    model = build_model(spec)
    path = str(tmp_path / "c.pt")
    save_checkpoint(path, model, spec, (0.5,), (0.25,), ["a", "b", "c", "d"], test_accuracy=12.5)
    loaded = load_model(path)
    assert loaded.spec == spec and loaded.classes == ["a", "b", "c", "d"] and loaded.meta["test_accuracy"] == 12.5
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[k], v)
    with pytest.raises(UserError, match="holds arch 'convnet3'"):
        load_model(path, "resnet18")


@pytest.mark.parametrize("channels_last", [False, True])
def test_frozen_weights_in_amp_dtype_gives_the_same_numbers_and_restores(channels_last):
    # Autocast casts frozen conv/linear weights to bf16 on every forward; storing them in bf16
    # beforehand must give bit-identical outputs and input gradients, leave BatchNorm in
    # float32, and put the float32 tensors back on exit.
    from srel_fast.models import frozen_weights_in_amp_dtype

    torch.manual_seed(0)
    model = build_model(ModelSpec("resnet18", 10, 3, 32)).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(4, 3, 32, 32).contiguous(memory_format=fmt)

    def run():
        xg = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(xg)
        out.float().square().sum().backward()
        return out, xg.grad

    out_ref, grad_ref = run()
    with frozen_weights_in_amp_dtype(model, torch.bfloat16):
        assert model.conv1.weight.dtype == torch.bfloat16 and model.fc.weight.dtype == torch.bfloat16
        assert model.bn1.weight.dtype == torch.float32 and model.bn1.running_var.dtype == torch.float32
        assert model.conv1.weight.is_contiguous(memory_format=fmt)
        out, grad = run()
    assert torch.equal(out, out_ref) and torch.equal(grad, grad_ref)
    after = model.state_dict()
    assert all(after[k].dtype == before[k].dtype and torch.equal(after[k], before[k]) for k in before)
    with frozen_weights_in_amp_dtype(model, None):  # no autocast: nothing changes
        assert model.conv1.weight.dtype == torch.float32
