"""The recovery-step benchmark (srel_fast/bench/recover_step/, srel_fast/bench/baselines.py): every
provider runs, DM and MTT compute what their papers say, the reference equals
the Recoverer's torch backend, and the reports are written."""
import copy
import gzip
import json
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from srel_fast.bench import baselines as B
from srel_fast.bench.recover_step import cli, configs, providers, reference, timing
from srel_fast.bench.recover_step.device import resolve_amp


def _tiny_config():
    return configs.BenchConfig(
        "convnet4", 16, 10, 4, configs.CONFIGS["convnet4-64"].providers,
        baselines={
            "dm": B.DMConfig(num_classes=3, ipc=2, image_size=16, width=16, batch_real=4, real_pool_per_class=6),
            "mtt": B.MTTConfig(num_classes=3, ipc=2, image_size=16, width=16, syn_steps=2, batch_syn=3,
                               buffer_epochs=3),
            "dm-ipc1": B.DMConfig(num_classes=3, ipc=1, image_size=16, width=16, batch_real=4, real_pool_per_class=6),
            "mtt-ipc1": B.MTTConfig(num_classes=3, ipc=1, image_size=16, width=16, syn_steps=2, batch_syn=None,
                                    buffer_epochs=3),
        },
    )


@pytest.fixture
def fast_compile(monkeypatch):
    """torch.compile through dynamo + AOT autograd but without inductor code
    generation (seconds instead of minutes on 2 CPU cores); the graphs traced
    are the same ones inductor would get."""
    real = torch.compile

    def compile_(fn=None, *, mode=None, dynamic=None, fullgraph=False, backend=None, **kw):
        return real(fn, backend="aot_eager", dynamic=dynamic, fullgraph=fullgraph)

    monkeypatch.setattr(torch, "compile", compile_)


def test_every_provider_runs_one_iteration(fast_compile):
    dev = torch.device("cpu")
    amp, amp_name = resolve_amp(dev)
    ctx = providers.Context("tiny", _tiny_config(), dev, amp, amp_name, True, warmup=1, repeats=1)
    ran = []
    for name in ctx.cfg.providers:
        if name in configs.CUDA_ONLY:
            continue
        rec = timing.run_provider(name, ctx)
        assert rec["status"] == "ok", (name, rec.get("error"), rec.get("traceback"))
        for key in ("ms_per_image_median", "ms_per_iteration_median", "first_iteration_s", "loss"):
            assert math.isfinite(rec[key]) and rec[key] >= 0 or key == "loss", (name, key, rec[key])
        assert rec["loss_finite"], name
        assert rec["peak_memory_mb"] is None and rec["cpu_rss_delta_mb"] is not None
        ran.append(rec)
    names = [r["provider"] for r in ran]
    assert {"reference", "reference-compiled", "srel-fast", "floor", "dm", "mtt", "dm-ipc1", "mtt-ipc1"} <= set(names)
    assert "reference-frozen" not in names  # the reference is the frozen official loop itself
    floor = next(r for r in ran if r["provider"] == "floor")
    assert floor["flops"]["flops_conv"] > 0 and floor["flops_floor_ms_per_image"] > 0
    timing.add_ratios(ran)
    ref = next(r for r in ran if r["provider"] == "reference")
    assert ref["speedup_vs_reference"] == pytest.approx(1.0)
    assert all("speedup_vs_dm" in r and "speedup_vs_mtt" in r and "speedup_vs_mtt-ipc1" in r for r in ran)


def test_failing_provider_is_recorded_not_raised():
    dev = torch.device("cpu")
    cfg = replace(_tiny_config(), baselines={})
    ctx = providers.Context("tiny", cfg, dev, None, "fp32", True, warmup=1, repeats=1)
    rec = timing.run_provider("dm", ctx)
    assert rec["status"] == "error" and "dm" in rec["error"]


def test_reference_loss_equals_recoverer_hooks():
    from srel_fast.recover import RecoverConfig, Recoverer

    size, batch, classes = 16, 3, 10
    teacher = providers.make_teacher("convnet4", classes, size, seed=1)
    norm = providers.Context("t", _tiny_config(), torch.device("cpu"), None, "fp32", True, 1, 1).norm
    ref = reference.ReferenceRecovery(copy.deepcopy(teacher), norm, size, classes, batch, torch.device("cpu"), 10, seed=3)
    cfg = RecoverConfig(out="", batch_size=batch, bn_matching="hooks", backend="torch", crop_mode="batch",
                        amp="none", channels_last=False).resolved(size)
    assert (cfg.lr, cfg.r_bn, cfg.jitter) == (ref.lr, ref.r_bn, ref.jitter)
    with Recoverer(copy.deepcopy(teacher), norm, size, 3, cfg, torch.device("cpu")) as rec:
        for crop in [(2, 3, 9, 11, True, (1, 0)), (0, 0, 16, 16, False, (0, 1)), (5, 1, 4, 7, True, (1, 1))]:
            top, left, h, w, flip, shift = crop
            x = ref.x.detach().clone().requires_grad_(True)
            ref.x = x
            loss_ref, ce_ref, bn_ref = ref.loss(crop)
            (g_ref,) = torch.autograd.grad(loss_ref, x)
            x2 = x.detach().clone().requires_grad_(True)
            boxes = torch.tensor([[top, left, h, w]] * batch, dtype=torch.float32)
            loss_rec, ce_rec, bn_rec = rec.loss_fn(x2, ref.targets, boxes, torch.tensor([flip] * batch),
                                                   torch.tensor([list(shift)] * batch))
            (g_rec,) = torch.autograd.grad(loss_rec, x2)
            assert torch.allclose(loss_ref, loss_rec, rtol=1e-5, atol=1e-6), crop
            assert torch.allclose(bn_ref, bn_rec, rtol=1e-5) and torch.allclose(ce_ref, ce_rec, rtol=1e-5)
            assert torch.allclose(g_ref, g_rec, rtol=1e-4, atol=1e-7), crop
    ref.close()


def test_reference_freezes_the_model_like_the_original():
    # data_synthesis.py sets requires_grad=False on every parameter: no weight gradient
    teacher = providers.make_teacher("convnet4", 10, 16, seed=0)
    norm = providers.Context("t", _tiny_config(), torch.device("cpu"), None, "fp32", True, 1, 1).norm
    ref = reference.ReferenceRecovery(teacher, norm, 16, 10, 2, torch.device("cpu"), 4)
    ref.step(0)
    assert all(not p.requires_grad and p.grad is None for p in ref.model.parameters())
    assert ref.x.grad is not None and ref.x.grad.abs().sum() > 0
    lo, hi = norm.clamp_bounds()
    assert bool(((ref.x >= lo - 1e-6) & (ref.x <= hi + 1e-6)).all())
    ref.close()


def test_baselines_at_both_conventions():
    # the paper's DM / MTT times read as IPC 1 (200 images per update); IPC 10 beside them
    b = configs.CONFIGS["convnet4-64"].baselines
    assert (b["dm-ipc1"].ipc, b["mtt-ipc1"].ipc, b["dm"].ipc, b["mtt"].ipc) == (1, 1, 10, 10)
    assert (b["mtt-ipc1"].syn_steps, b["mtt-ipc1"].batch_syn, b["mtt-ipc1"].max_start_epoch) == (10, None, 10)
    assert (b["mtt"].syn_steps, b["mtt"].max_start_epoch) == (20, 40)
    assert {x.depth for x in b.values()} == {3}
    ns = cli.build_parser().parse_args(["--baseline-ipc", "5", "--baseline-depth", "4"])
    cfg, _ = cli.resolve_config(ns, torch.device("cuda"))
    assert cfg.baselines["dm"].ipc == 5 and cfg.baselines["dm-ipc1"].ipc == 1
    assert {x.depth for x in cfg.baselines.values()} == {4}


def test_dm_fetches_real_batches_per_class():
    # as their main_DM.py: one class's real batch alive at a time (comparable memory)
    fetched = []
    net = B.convnet_in(3, 3, 16, depth=2, width=8)
    syn = torch.randn(3, 3, 16, 16, requires_grad=True)

    def get_real(c):
        fetched.append(c)
        return torch.randn(4, 3, 16, 16)

    B.dm_loss(net.embed, syn, get_real, 1, [0, 1, 2], None, dsa=False).backward()
    assert fetched == [0, 1, 2]


# ----------------------------------------------------------------------------- DM
def test_dm_gradient_is_per_class():
    torch.manual_seed(0)
    net = B.convnet_in(3, 3, 16, depth=2, width=8)
    for p in net.parameters():
        p.requires_grad_(False)
    ipc = 2
    syn = torch.randn(3 * ipc, 3, 16, 16, requires_grad=True)
    reals = [torch.randn(5, 3, 16, 16) for _ in range(3)]
    classes = [0, 2]
    loss = B.dm_loss(net.embed, syn, lambda c: reals[c], ipc, classes, torch.Generator().manual_seed(0))
    loss.backward()
    g = syn.grad.view(3, ipc, -1).abs().sum(-1)
    assert (g[0] > 0).all() and (g[2] > 0).all()
    assert (g[1] == 0).all()
    # Without augmentation the loss is the sum of the per-class squared mean-embedding distances.
    with torch.no_grad():
        total = B.dm_loss(net.embed, syn, lambda c: reals[c], ipc, [0, 1, 2], None, dsa=False)
        by_hand = sum(((net.embed(reals[c]).mean(0) - net.embed(syn[c * ipc:(c + 1) * ipc]).mean(0)) ** 2).sum()
                      for c in range(3))
    assert torch.allclose(total, by_hand, rtol=1e-5)


def test_dm_step_updates_images_with_sgd_momentum():
    dm = B.DMStep(B.DMConfig(num_classes=2, ipc=1, image_size=16, width=8, depth=2, batch_real=3,
                             real_pool_per_class=4), torch.device("cpu"))
    before = dm.image_syn.detach().clone()
    loss = dm.step()
    assert torch.isfinite(loss) and loss > 0
    assert dm.image_syn.grad is not None and dm.image_syn.grad.abs().sum() > 0
    assert torch.allclose(dm.image_syn.detach(), before - 1.0 * dm.image_syn.grad)  # lr_img 1, first step


@pytest.mark.parametrize("family", ["color", "crop", "cutout", "flip", "scale", "rotate"])
def test_dsa_siamese_same_params_for_real_and_syn(family):
    g = torch.Generator().manual_seed(4)
    d = B.dsa_draw(1, 8, 8, g, batchmode=True, family=family)
    x = torch.randn(5, 3, 8, 8, requires_grad=True)
    y = B.dsa_apply(x, d)
    assert y.shape == x.shape and torch.isfinite(y).all()
    # batch mode: image 0 of a batch of 5 gets what a batch of 1 holding it gets
    assert torch.allclose(y[:1], B.dsa_apply(x[:1], d), atol=1e-6)
    y.sum().backward()
    assert x.grad is not None


# ----------------------------------------------------------------------------- MTT
def test_mtt_gradient_reaches_images_and_lr():
    mtt = B.MTTStep(B.MTTConfig(num_classes=2, ipc=2, image_size=8, width=4, depth=2, syn_steps=3, batch_syn=2,
                                buffer_epochs=3), torch.device("cpu"))
    loss = mtt.step()
    assert torch.isfinite(loss)
    assert mtt.image_syn.grad is not None and mtt.image_syn.grad.abs().sum() > 0
    assert mtt.syn_lr.grad is not None and mtt.syn_lr.grad != 0


def test_mtt_one_step_matches_hand_computation_float64():
    torch.manual_seed(0)
    k, d, n = 3, 12, 5
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(d, k)).double()
    num = sum(p.numel() for p in model.parameters())
    start = torch.randn(num, dtype=torch.float64)
    target = start + 0.1 * torch.randn(num, dtype=torch.float64)
    images = torch.randn(n, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 0, 1])
    syn_lr = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    loss = B.mtt_unroll(model, start, target, images, labels, syn_lr, syn_steps=1, batch_syn=n,
                        generator=torch.Generator().manual_seed(0), dsa=False)
    loss.backward()
    # by hand: softmax regression gradient, one SGD step, normalised squared distance
    W, b = start[:k * d].view(k, d), start[k * d:]
    X = images.detach().reshape(n, d)
    P = torch.softmax(X @ W.T + b, 1)
    G = (P - F.one_hot(labels, k).double()) / n
    grad = torch.cat([(G.T @ X).reshape(-1), G.sum(0)])
    theta1 = start - 0.3 * grad
    expected = ((theta1 - target) ** 2).sum() / ((start - target) ** 2).sum()
    assert torch.allclose(loss.detach(), expected, rtol=1e-12, atol=1e-14)
    dlr = (2 * (theta1 - target) @ (-grad)) / ((start - target) ** 2).sum()
    assert torch.allclose(syn_lr.grad, dlr, rtol=1e-10)
    assert images.grad is not None and images.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- reports and CLI
def test_main_writes_json_markdown_png(tmp_path, capsys):
    code = cli.main(["--config", "convnet4-64", "--device", "cpu", "--small", "--image-size", "16", "--batch", "2",
                    "--providers", "reference,floor,dm,mtt", "--warmup", "1", "--repeats", "2",
                    "--mtt-syn-steps", "2", "--dm-batch-real", "4", "--out-dir", str(tmp_path)])
    assert code == 0
    stem = tmp_path / "recover_step_convnet4-64_small_cpu"
    rec = json.loads((stem.with_suffix(".json")).read_text())
    assert rec["environment"]["device_kind"] == "cpu" and rec["environment"]["torch"] == torch.__version__
    assert "triton" in rec["environment"] and rec["command"].startswith("srel-fast bench recover-step")
    assert rec["config"]["image_size"] == 16 and rec["small"] is True
    assert [r["provider"] for r in rec["results"]] == ["reference", "floor", "dm", "mtt"]
    assert all(r["status"] == "ok" for r in rec["results"])
    md = (stem.with_suffix(".md")).read_text()
    assert "| reference |" in md and "CPU figures" in md
    png = (stem.with_suffix(".png")).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    assert matplotlib.image.imread(str(stem.with_suffix(".png"))).ndim == 3
    (stem.with_suffix(".md")).unlink()
    assert cli.main(["--render", str(stem.with_suffix(".json"))]) == 0
    assert "x ref (min)" in (stem.with_suffix(".md")).read_text()


def test_profile_writes_tables_trace_and_host_time(tmp_path):
    code = cli.main(["--config", "convnet4-64", "--device", "cpu", "--small", "--image-size", "16", "--batch", "2",
                    "--providers", "reference,srel-fast-no-compile", "--warmup", "1", "--repeats", "1",
                    "--profile", "srel-fast-no-compile", "--out-dir", str(tmp_path)])
    assert code == 0
    rec = json.loads((tmp_path / "recover_step_convnet4-64_small_cpu.json").read_text())
    prof = next(r for r in rec["results"] if r["provider"] == "srel-fast-no-compile")
    assert "profile" not in rec["results"][0]
    assert prof["profile"] == "profile_convnet4-64_srel-fast-no-compile.txt"
    table = (tmp_path / prof["profile"]).read_text()
    assert "sorted by self_cpu_time_total" in table and "aten::" in table
    assert 0 < prof["profile_host_ms_per_iteration"] < 60_000
    for r in rec["results"]:  # issuing a step cannot take longer than the step with its wait
        assert 0 < r["host_enqueue_ms_per_iteration_median"] <= r["ms_per_iteration_median"] + 1e-6
    with gzip.open(tmp_path / prof["profile_trace"]) as f:
        trace = json.load(f)
    names = {e.get("name", "") for e in trace["traceEvents"]}
    assert any(n.startswith("aten::") for n in names)
    md = (tmp_path / "recover_step_convnet4-64_small_cpu.md").read_text()
    assert "Profile of `srel-fast-no-compile`" in md and "host " in md


def test_bench_cli_dispatch(capsys):
    from srel_fast.bench import cli as bench_cli

    assert bench_cli.main(["recover-step", "--config", "resnet18-224", "--device", "cpu", "--list"]) == 0
    listed = capsys.readouterr().out.split()
    assert listed[:3] == ["reference", "reference-compiled", "srel-fast"] and "floor" in listed
    assert "dm" not in listed and "srel-fast-no-cuda-graphs" not in listed
    assert bench_cli.main(["nope"]) == 2
    from srel_fast.cli import main as srel_main

    assert srel_main(["bench", "recover-step", "--config", "convnet4-64", "--device", "cpu", "--list"]) == 0
    assert "mtt" in capsys.readouterr().out.split()
