"""BN-ViT (SRe2L Sec. 2.1): DeiT with BatchNorm over tokens, recoverable like any BN model."""
import pytest
import torch
from torch import nn

from srel_fast.bn_matching import bn_matching
from srel_fast.bn_vit import TokenBN, bn_vit_config
from srel_fast.data import Normalization
from srel_fast.kernels import _ext
from srel_fast.models import ModelSpec, bn_layers, build_model, load_model
from srel_fast.recover import Recoverer, RecoverConfig

HAS_CPU_EXT = _ext.has_op("bn_stat_loss", "cpu")


@pytest.mark.parametrize("arch,size,ch,tokens", [
    ("bn-vit-tiny", 32, 3, 4), ("bn-vit-tiny-small", 28, 1, 49), ("bn-vit-tiny-small", 8, 1, 16)])
def test_forward_backward_shapes_and_norms(arch, size, ch, tokens):
    torch.manual_seed(0)
    model = build_model(ModelSpec(arch, 7, ch, size))
    cfg = model.cfg
    assert (size // cfg.patch) ** 2 == tokens
    assert model.pos_embed.shape == (1, tokens + 1, cfg.dim)
    x = torch.randn(3, ch, size, size, requires_grad=True)
    out = model(x)
    assert out.shape == (3, 7)
    out.sum().backward()
    assert x.grad.shape == x.shape and torch.isfinite(x.grad).all()
    assert model.embed(x).shape == (3, cfg.dim)
    assert not any(isinstance(m, nn.LayerNorm) for m in model.modules())
    bns = bn_layers(model)
    assert len(bns) == 3 * cfg.depth + 1  # norm1, norm2, FFN BN per block + final norm
    assert all(type(m) is nn.BatchNorm1d for m in bns)
    for blk in model.blocks:  # Linear -> BN -> GELU -> Linear
        assert [type(m) for m in blk.mlp.children()] == [nn.Linear, TokenBN, nn.GELU, nn.Linear]
        assert blk.mlp.norm.bn.num_features == 4 * cfg.dim


def test_configs():
    assert bn_vit_config("bn-vit-tiny", 224).to_dict() == dict(patch=16, dim=192, depth=12, heads=3, mlp_ratio=4.0)
    assert bn_vit_config("bn-vit-tiny-small", 28).to_dict() == dict(patch=4, dim=96, depth=4, heads=3, mlp_ratio=4.0)
    assert bn_vit_config("bn-vit-tiny-small", 8).patch == 2
    # DeiT-Tiny has 5,717,416 parameters; the FFN BNs add 2 * 768 per block.
    m = build_model(ModelSpec("bn-vit-tiny", 1000, 3, 224))
    assert sum(p.numel() for p in m.parameters()) == 5_717_416 + 12 * 2 * 768


def test_token_bn_statistics_are_over_batch_and_tokens():
    torch.manual_seed(0)
    model = build_model(ModelSpec("bn-vit-tiny-small", 10, 1, 8)).eval()
    for m in bn_layers(model):
        m.running_mean.normal_()
        m.running_var.uniform_(0.5, 2)
    captured = []
    bn0 = model.blocks[0].norm1.bn
    h = bn0.register_forward_pre_hook(lambda m, i: captured.append(i[0]))
    x = torch.randn(4, 1, 8, 8)
    with bn_matching(model, 10.0, "hooks") as stats:
        model(x)
        ref = stats.hooks[0].loss  # first BN in module order: blocks[0].norm1
    h.remove()
    t = captured[0].transpose(1, 2)  # back to (B, N, D)
    mu = t.reshape(-1, t.shape[-1]).mean(0)
    var = t.reshape(-1, t.shape[-1]).var(0, unbiased=False)
    expected = torch.norm(bn0.running_var - var) + torch.norm(bn0.running_mean - mu)
    torch.testing.assert_close(ref, expected, rtol=1e-5, atol=1e-6)


def _backends():
    return ["auto", "cpu"] if HAS_CPU_EXT else ["auto"]


@pytest.fixture(scope="module")
def vit_teacher(tmp_path_factory):
    from srel_fast.squeeze import SqueezeConfig, run_squeeze

    path = str(tmp_path_factory.mktemp("vit") / "bn_vit.pt")
    run_squeeze(SqueezeConfig(data="digits", out=path, arch="bn-vit-tiny-small", epochs=1, batch_size=128,
                              optimizer="adamw", lr=2e-3, weight_decay=0.05, min_scale=0.5, device="cpu",
                              progress=False))
    return path


@pytest.mark.parametrize("backend", _backends())
def test_fused_bn_loss_and_gradient_equal_reference(vit_teacher, backend):
    loaded = load_model(vit_teacher)
    assert loaded.spec.arch == "bn-vit-tiny-small" and loaded.spec.image_size == 8
    model = loaded.model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    x0 = torch.randn(10, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    res = {}
    for b in ("torch", backend):   # torch: the original code's hooks
        x = x0.clone().requires_grad_(True)
        with bn_matching(model, 10.0, "hooks" if b == "torch" else "fused", b) as stats:
            out = model(x)
            loss = stats.loss()
        (loss + out.sum()).backward()
        res[b] = (out.detach(), loss.detach(), x.grad)
        assert len(stats.layers if b != "torch" else stats.hooks) == 13
    torch.testing.assert_close(res[backend][0], res["torch"][0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(res[backend][1], res["torch"][1], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(res[backend][2], res["torch"][2], rtol=1e-3, atol=1e-5)
    assert not any(isinstance(m, nn.Module) and type(m).__name__ == "FusedBNStat" for m in model.modules())


@pytest.mark.parametrize("backend", _backends())
def test_checkpoint_recovers_with_reference_and_fused(vit_teacher, backend):
    loaded = load_model(vit_teacher)
    runs = {}
    for b in ("torch", backend):
        cfg = RecoverConfig(out="", weights=vit_teacher, ipc=1, iterations=2, device="cpu", progress=False,
                            bn_matching="hooks" if b == "torch" else "fused", backend=b, crop_mode="image",
                            amp="none", channels_last=False).resolved(8)
        with Recoverer(loaded.model, Normalization(loaded.mean, loaded.std), 8, 1, cfg, torch.device("cpu")) as rec:
            runs[b] = rec.run_group([(list(range(10)), 0, 0)])[0]
    assert runs["torch"].status == runs[backend].status == "ok"
    assert runs[backend].bn == pytest.approx(runs["torch"].bn, rel=1e-4, abs=1e-5)
    torch.testing.assert_close(runs[backend].images, runs["torch"].images, atol=1e-4, rtol=0)


def test_recover_cli_on_bn_vit(vit_teacher, tmp_path):
    from srel_fast.cli import main

    out = tmp_path / "syn"
    assert main(["recover", "--weights", vit_teacher, "--ipc", "1", "--iterations", "2", "--out", str(out),
                 "--device", "cpu", "--no-progress", "--backend", "auto"]) == 0
    assert len(list(out.glob("*/*.png"))) == 10
