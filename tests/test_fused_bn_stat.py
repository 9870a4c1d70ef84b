"""srel_fast.kernels.fused_bn_stat: fused eval BN + stat loss, and fused_bn_matching."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from srel_fast.kernels import bn_stat_loss_reference, fused_bn_matching, fused_bn_stat
from srel_fast.kernels.fused_bn_stat import FusedBNStat, fused_bn_stat_reference

from conftest import BN_TOL, gpu_backends, make_bn_input

BACKENDS = ["torch", "cpu", "triton"]
CASES = [
    ((2, 3, 5, 5), "contiguous"),
    ((2, 3, 5, 5), "channels_last"),
    ((1, 7, 4, 6), "channels_last"),
    ((5, 6, 1, 1), "contiguous"),
    ((6, 10), "contiguous"),
    ((3, 9, 8), "transposed"),
    ((3, 9, 8), "contiguous"),
]


def bn_params(c, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(c, generator=g), torch.randn(c, generator=g)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape,layout", CASES, ids=str)
@pytest.mark.parametrize("uses", ["both", "y_only", "loss_only"])
def test_fused_matches_reference(backend, dtype, shape, layout, uses):
    x, rm, rv = make_bn_input(shape, layout, dtype, seed=7)
    w, b = bn_params(shape[1])
    eps = 1e-3
    x.requires_grad_(True)
    y, loss = fused_bn_stat(x, rm, rv, w, b, eps, loss_weight=2.5, backend=backend)
    assert y.dtype == x.dtype and y.shape == x.shape and y.stride() == x.stride()
    assert loss.dtype == torch.float32 and loss.dim() == 0
    gy = torch.randn(shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    obj = {"both": (y.float() * gy).sum() + loss, "y_only": (y.float() * gy).sum(), "loss_only": loss}[uses]
    obj.backward()

    xd = x.detach().double().requires_grad_(True)
    yr, lr = fused_bn_stat_reference(xd, rm.double(), rv.double(), w.double(), b.double(), eps, 2.5)
    objr = {"both": (yr * gy.double()).sum() + lr, "y_only": (yr * gy.double()).sum(), "loss_only": lr}[uses]
    objr.backward()

    lt, gt = BN_TOL[dtype]
    ytol = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    torch.testing.assert_close(y.double(), yr.detach(), rtol=ytol, atol=ytol * yr.abs().max().item())
    torch.testing.assert_close(loss.double(), lr.detach(), rtol=lt, atol=1e-6)
    assert x.grad.dtype == dtype and x.grad.stride() == x.stride()
    gmax = xd.grad.abs().max().item()
    torch.testing.assert_close(x.grad.double(), xd.grad, rtol=0, atol=gt * gmax)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_fused_dy_in_other_layout_and_affine_grads(backend):
    x, rm, rv = make_bn_input((3, 5, 4, 4), "channels_last", torch.float32)
    w, b = bn_params(5)
    x.requires_grad_(True)
    w.requires_grad_(True)
    b.requires_grad_(True)
    y, loss = fused_bn_stat(x, rm, rv, w, b, 1e-5, 0.3, backend=backend)
    gy = torch.randn(3, 5, 4, 4)  # contiguous while y is channels_last
    ((y * gy).sum() + loss).backward()
    xr, wr, br = (t.detach().clone().requires_grad_(True) for t in (x, w, b))
    yr, lr = fused_bn_stat_reference(xr, rm, rv, wr, br, 1e-5, 0.3)
    ((yr * gy).sum() + lr).backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w.grad, wr.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b.grad, br.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape,layout", [((4, 6, 5, 3), "channels_last"), ((4, 6, 7), "contiguous")], ids=str)
def test_eager_function_equals_the_custom_op(backend, dtype, shape, layout):
    """Eager mode runs the kernels through an autograd.Function (no dispatcher overhead), compile
    through the custom op srel_fast::fused_bn_stat: the same kernels, so the same bits, gradients
    for x, weight and bias included, with groups."""
    from srel_fast.kernels.fused_bn_stat import _FusedEager

    x0, rm, rv = make_bn_input(shape, layout, dtype, seed=3)
    w0, b0 = bn_params(shape[1], seed=4)
    g = torch.Generator().manual_seed(5)
    gy, gm, gv = torch.randn(shape, generator=g).to(dtype), torch.randn(2, shape[1], generator=g), torch.rand(2, shape[1], generator=g)
    results = []
    for run in (_FusedEager.apply, torch.ops.srel_fast.fused_bn_stat):
        x, w, b = (t.detach().clone().requires_grad_(True) for t in (x0, w0, b0))
        y, mean, var = run(x, rm, rv, w, b, 1e-3, 2, backend)
        ((y.float() * gy.float()).sum() + (mean * gm).sum() + (var * gv).sum()).backward()
        results.append((y, mean, var, x.grad, w.grad, b.grad))
    for eager, op in zip(*results):
        assert torch.equal(eager, op)
    torch.library.opcheck(torch.ops.srel_fast.fused_bn_stat.default, (x0, rm, rv, w0, b0, 1e-3, 2, backend))


def test_fused_without_affine_and_groups():
    x, rm, rv = make_bn_input((6, 4, 3, 3), "contiguous", torch.float32)
    y, loss = fused_bn_stat(x, rm, rv, None, None, 1e-5, 1.0, backend="torch", groups=3)
    yr = nn.functional.batch_norm(x, rm, rv, training=False)
    torch.testing.assert_close(y, yr)
    torch.testing.assert_close(loss, bn_stat_loss_reference(x, rm, rv, groups=3))


def small_model():
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Sequential(nn.Conv2d(6, 5, 3, padding=1, bias=False), nn.BatchNorm2d(5)), nn.Flatten(),
        nn.Linear(5 * 6 * 6, 12), nn.BatchNorm1d(12), nn.ReLU(), nn.Linear(12, 4))
    for mod in m.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            mod.running_mean.normal_()
            mod.running_var.uniform_(0.5, 2.0)
            mod.weight.data.normal_()
            mod.bias.data.normal_()
    return m.eval().requires_grad_(False)


def reference_objective(model, x, first_bn_multiplier=10.0):
    """The original SRe2L way: forward hooks computing the loss per BN."""
    losses = []
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    hooks = []
    for i, bn in enumerate(bns):
        def hook(mod, inp, out, i=i):
            losses.append(bn_stat_loss_reference(inp[0], mod.running_mean, mod.running_var,
                                                 first_bn_multiplier if i == 0 else 1.0))
        hooks.append(bn.register_forward_hook(hook))
    try:
        out = model(x)
    finally:
        for h in hooks:
            h.remove()
    return out.square().mean() + 0.1 * sum(losses)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_fused_bn_matching_eager(backend):
    model = small_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bn_types = [type(m) for m in model.modules()]
    x = torch.randn(4, 3, 6, 6).to(memory_format=torch.channels_last)
    xr = x.clone().requires_grad_(True)
    ref = reference_objective(model, xr)
    ref.backward()
    with fused_bn_matching(model, first_bn_multiplier=10.0, backend=backend) as stats:
        assert len(stats.layers) == 3 and stats.layers[0].loss_weight == 10.0
        assert list(model.state_dict()) == list(before)
        xe = x.clone().requires_grad_(True)
        obj = model(xe).square().mean() + 0.1 * stats.loss()
        obj.backward()
    torch.testing.assert_close(obj, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(xe.grad, xr.grad, rtol=1e-4, atol=1e-7)
    assert [type(m) for m in model.modules()] == bn_types
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("backend", ["torch", "cpu"], indirect=True)
def test_fused_bn_matching_compile_fullgraph(backend):
    model = small_model()
    x = torch.randn(4, 3, 6, 6)
    with fused_bn_matching(model, first_bn_multiplier=10.0, backend=backend) as stats:
        def objective(x):
            return model(x).square().mean() + 0.1 * stats.loss()

        xe = x.clone().requires_grad_(True)
        le = objective(xe)
        le.backward()
        torch._dynamo.reset()
        compiled = torch.compile(objective, fullgraph=True)
        xc = x.clone().requires_grad_(True)
        lc = compiled(xc)
        lc.backward()
    torch.testing.assert_close(lc, le, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(xc.grad, xe.grad, rtol=1e-4, atol=1e-7)


def test_fused_bn_matching_errors():
    with pytest.raises(ValueError):
        with fused_bn_matching(nn.Sequential(nn.Linear(3, 3))):
            pass
    with pytest.raises(ValueError):
        with fused_bn_matching(nn.Sequential(nn.BatchNorm2d(3, track_running_stats=False))):
            pass
    model = small_model()
    with fused_bn_matching(model, backend="torch") as stats:
        with pytest.raises(RuntimeError):
            stats.loss()
    # restored even when the body raises
    with pytest.raises(KeyError):
        with fused_bn_matching(model, backend="torch"):
            raise KeyError
    assert isinstance(model[1], nn.BatchNorm2d)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_fused_gpu(dtype, layout):
    x, rm, rv = make_bn_input((32, 96, 28, 28), layout, dtype, seed=4)
    x, rm, rv = x.cuda(), rm.cuda(), rv.cuda()
    w, b = (t.cuda() for t in bn_params(96))
    gy = torch.randn(x.shape, device="cuda").to(dtype)
    xd = x.detach().double().requires_grad_(True)
    yr, lr = fused_bn_stat_reference(xd, rm.double(), rv.double(), w.double(), b.double(), 1e-5, 0.5)
    ((yr * gy.double()).sum() + lr).backward()
    for be in gpu_backends("bn_stat_loss"):
        xx = x.detach().clone().requires_grad_(True)
        y, loss = fused_bn_stat(xx, rm, rv, w, b, 1e-5, 0.5, backend=be)
        ((y.float() * gy.float()).sum() + loss).backward()
        lt, gt = BN_TOL[dtype]
        torch.testing.assert_close(loss.double(), lr.detach(), rtol=lt, atol=1e-6)
        torch.testing.assert_close(xx.grad.double(), xd.grad, rtol=0, atol=gt * xd.grad.abs().max().item())


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("affine_grad", [False, True])
def test_decomposed_path_matches_reference_float64(groups, layout, affine_grad):
    """The plain-op path ``auto`` uses under torch.compile: same y, loss and every gradient."""
    from srel_fast.kernels.fused_bn_stat import fused_bn_stat_decomposed

    x, rm, rv = make_bn_input((4, 6, 5, 7), layout, torch.float64, seed=7)
    w, b = (t.double() for t in bn_params(6))
    gy = torch.randn(x.shape, dtype=torch.float64)
    grads = []
    for fn in (fused_bn_stat_decomposed, fused_bn_stat_reference):
        xx = x.detach().clone().requires_grad_(True)
        ww, bb = (t.detach().clone().requires_grad_(affine_grad) for t in (w, b))
        y, loss = fn(xx, rm.double(), rv.double(), ww, bb, 1e-5, 0.3, groups=groups)
        ((y * gy).sum() + loss).backward()
        grads.append((y.detach(), loss.detach(), xx.grad, ww.grad, bb.grad))
    (y1, l1, g1, w1, b1), (y2, l2, g2, w2, b2) = grads
    torch.testing.assert_close(y1, y2)
    torch.testing.assert_close(l1.double(), l2.double())
    torch.testing.assert_close(g1, g2)
    if affine_grad:
        torch.testing.assert_close(w1, w2)
        torch.testing.assert_close(b1, b2)


def test_auto_under_compile_takes_the_plain_op_path_with_the_same_result(monkeypatch):
    """``auto`` inside torch.compile on CUDA traces plain ops (inductor fuses them with the
    layers around); the loss and input gradient equal the eager custom-op path's. (The plain
    path is chosen for CUDA tensors; here it is forced on the CPU to test it without a GPU.)"""
    import importlib

    fused_bn = importlib.import_module("srel_fast.kernels.fused_bn_stat")  # the module; the package's
    # attribute of that name is the op

    calls = []
    real = fused_bn.fused_bn_moments_decomposed  # the plain-op moments the layer's loss is built from

    def spy(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(fused_bn, "fused_bn_moments_decomposed", spy)
    monkeypatch.setattr(fused_bn, "plain_ops_under_compile", lambda x: torch.compiler.is_compiling())
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)).eval()
    for m in model:
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    for p in model.parameters():
        p.requires_grad_(False)
    x = torch.randn(4, 3, 12, 12)
    seen = []

    def loss_of(xx):
        with fused_bn_matching(model, backend="auto") as stats:
            out = model(xx)
            seen.append(torch.compiler.is_compiling())
            return out.square().mean() + stats.loss()

    results = []
    for fn in (loss_of, torch.compile(loss_of, backend="aot_eager", fullgraph=True)):
        xx = x.clone().requires_grad_(True)
        loss = fn(xx)
        loss.backward()
        results.append((loss.detach(), xx.grad))
    assert seen == [False, True] and len(calls) == 2  # two BN layers, traced once
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-4, atol=1e-7)


# --------------------------------------------------------------------------
# the frozen-layer path of FusedBNStat (recovery's case): the layer's loss is an output of
# one autograd node, csrc/fused_bn_stat.cpp on the extension's backends, _FusedLossEager
# on torch and triton
# --------------------------------------------------------------------------
def frozen_bn(c, dim, seed=3):
    bn = (nn.BatchNorm2d(c) if dim == 4 else nn.BatchNorm1d(c)).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    bn.running_mean.copy_(torch.randn(c, generator=g))
    bn.running_var.copy_(torch.rand(c, generator=g) + 0.5)
    bn.weight.copy_(torch.randn(c, generator=g))
    bn.bias.copy_(torch.randn(c, generator=g))
    return bn


FROZEN_NODE = {"cpu": "CppFunction", "torch": "_FusedLossEagerBackward", "triton": "_FusedLossEagerBackward"}


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape,layout", CASES + [((4, 3, 5, 5), "strided")], ids=str)
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("uses", ["both", "y_only", "loss_only"])
def test_frozen_layer_matches_reference_float64(backend, dtype, shape, layout, groups, uses):
    if shape[0] % groups:
        pytest.skip("batch not divisible into the groups")
    if layout == "strided":  # neither layout: a view with a gap (the C++ op reads a copy)
        x, rm, rv = make_bn_input((shape[0], shape[1], shape[2], 2 * shape[3]), "contiguous", dtype, seed=11)
        x = x[..., ::2]
    else:
        x, rm, rv = make_bn_input(shape, layout, dtype, seed=11)
    bn = frozen_bn(shape[1], x.dim())
    bn.running_mean.copy_(rm)
    bn.running_var.copy_(rv)
    layer = FusedBNStat(bn, loss_weight=1.7, backend=backend, groups=groups)
    x = x.detach().requires_grad_(True)
    y = layer(x)
    loss = layer.stat_loss
    assert type(loss.grad_fn).__name__ == FROZEN_NODE[backend]
    assert y.dtype == x.dtype and y.shape == x.shape and loss.dtype == torch.float32 and loss.dim() == 0
    if layout != "strided":
        assert y.stride() == x.stride()
    gy = torch.randn(x.shape, generator=torch.Generator().manual_seed(5)).to(dtype)
    obj = {"both": (y.float() * gy).sum() + 0.3 * loss, "y_only": (y.float() * gy).sum(), "loss_only": 0.3 * loss}[uses]
    obj.backward()

    xd = x.detach().double().requires_grad_(True)
    yr, lr = fused_bn_stat_reference(xd, rm.double(), rv.double(), bn.weight.double(), bn.bias.double(), bn.eps, 1.7,
                                     groups)
    objr = {"both": (yr * gy.double()).sum() + 0.3 * lr, "y_only": (yr * gy.double()).sum(), "loss_only": 0.3 * lr}[uses]
    objr.backward()
    lt, gt = BN_TOL[dtype]
    ytol = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    torch.testing.assert_close(y.double(), yr.detach(), rtol=ytol, atol=ytol * yr.abs().max().item())
    torch.testing.assert_close(loss.double(), lr.detach(), rtol=lt, atol=1e-6)
    assert x.grad.dtype == dtype and x.grad.shape == x.shape
    torch.testing.assert_close(x.grad.double(), xd.grad, rtol=0, atol=gt * xd.grad.abs().max().item())


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_frozen_layer_zero_norm_gives_the_zero_subgradient(backend):
    # Running statistics equal to the batch's exactly (each channel constant, variance 0):
    # both norms are 0, and the loss's gradient must be torch's subgradient 0, not NaN.
    level = torch.tensor([0.5, -1.25, 2.0])
    x = level.view(1, 3, 1, 1).expand(4, 3, 5, 5).contiguous()
    bn = frozen_bn(3, 4)
    bn.running_mean.copy_(level)
    bn.running_var.zero_()
    layer = FusedBNStat(bn, backend=backend)
    xg = x.clone().requires_grad_(True)
    layer(xg)
    assert layer.stat_loss.item() == 0.0
    layer.stat_loss.backward()
    assert torch.equal(xg.grad, torch.zeros_like(xg))


@pytest.mark.parametrize("backend", ["torch", "cpu"], indirect=True)
def test_frozen_layer_sees_in_place_changes_of_the_bn(backend):
    # The layer keeps the frozen BN's scale and shift between calls; an in-place change of
    # the statistics or the affine parameters (load_state_dict, a user's edit) must reach y.
    x = torch.randn(2, 4, 3, 3)
    bn = frozen_bn(4, 4)
    layer = FusedBNStat(bn, backend=backend)
    layer(x)
    new = frozen_bn(4, 4, seed=9).state_dict()
    bn.load_state_dict(new)
    y = layer(x)
    yr, lr = fused_bn_stat_reference(x, new["running_mean"], new["running_var"], new["weight"], new["bias"], bn.eps)
    torch.testing.assert_close(y, yr, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.stat_loss, lr, rtol=1e-5, atol=1e-6)
    bn.weight.mul_(2.0)
    torch.testing.assert_close(layer(x), fused_bn_stat_reference(x, bn.running_mean, bn.running_var, bn.weight,
                                                                 bn.bias, bn.eps)[0], rtol=1e-5, atol=1e-5)


def test_frozen_layer_path_is_not_taken_when_the_affine_needs_a_gradient():
    bn = frozen_bn(4, 4)
    bn.weight.requires_grad_(True)
    layer = FusedBNStat(bn, backend="cpu")
    x = torch.randn(2, 4, 3, 3, requires_grad=True)
    y = layer(x)
    assert type(layer.stat_loss.grad_fn).__name__ not in FROZEN_NODE.values()
    (y.sum() + layer.stat_loss).backward()
    assert bn.weight.grad is not None and x.grad is not None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("groups", [1, 4])
def test_frozen_layer_gpu(dtype, layout, groups):
    x, rm, rv = make_bn_input((32, 96, 28, 28), layout, dtype, seed=4)
    bn = frozen_bn(96, 4).cuda()
    bn.running_mean.copy_(rm)
    bn.running_var.copy_(rv)
    x = x.cuda()
    gy = torch.randn(x.shape, device="cuda").to(dtype)
    xd = x.detach().double().requires_grad_(True)
    yr, lr = fused_bn_stat_reference(xd, bn.running_mean.double(), bn.running_var.double(), bn.weight.double(),
                                     bn.bias.double(), bn.eps, 0.5, groups)
    ((yr * gy.double()).sum() + lr).backward()
    for be in gpu_backends("bn_stat_loss"):
        layer = FusedBNStat(bn, loss_weight=0.5, backend=be, groups=groups)
        xx = x.detach().clone().requires_grad_(True)
        y = layer(xx)
        assert type(layer.stat_loss.grad_fn).__name__ == ("CppFunction" if be == "cuda" else "_FusedLossEagerBackward")
        ((y.float() * gy.float()).sum() + layer.stat_loss).backward()
        lt, gt = BN_TOL[dtype]
        torch.testing.assert_close(layer.stat_loss.double(), lr.detach(), rtol=lt, atol=1e-6)
        torch.testing.assert_close(xx.grad.double(), xd.grad, rtol=0, atol=gt * xd.grad.abs().max().item())


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("x_layout,dy_layout", [("channels_last", "contiguous"), ("contiguous", "channels_last")])
def test_frozen_layer_takes_dy_in_another_layout(backend, x_layout, dy_layout):
    x, rm, rv = make_bn_input((3, 5, 4, 6), x_layout, torch.float32, seed=2)
    bn = frozen_bn(5, 4)
    layer = FusedBNStat(bn, backend=backend)
    x = x.detach().requires_grad_(True)
    y = layer(x)
    gy = torch.randn(x.shape)
    gy = gy.contiguous(memory_format=torch.channels_last) if dy_layout == "channels_last" else gy.contiguous()
    torch.autograd.backward([y, layer.stat_loss], [gy, None])
    xd = x.detach().double().requires_grad_(True)
    yr, lr = fused_bn_stat_reference(xd, bn.running_mean.double(), bn.running_var.double(), bn.weight.double(),
                                     bn.bias.double(), bn.eps)
    torch.autograd.backward([yr, lr], [gy.double(), None])
    torch.testing.assert_close(x.grad.double(), xd.grad, rtol=0, atol=2e-5 * xd.grad.abs().max().item())
