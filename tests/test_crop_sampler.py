"""sample_crop_boxes / sample_flip_shift: distribution equals torchvision's
RandomResizedCrop.get_params, boxes inside the image, device-only tensor ops."""
import math

import numpy as np
import pytest
import torch
from scipy import stats

from srel_fast.kernels.crop_sampler import sample_crop_boxes, sample_flip_shift

tv_transforms = pytest.importorskip("torchvision.transforms")


def torchvision_boxes(n, height, width, scale, ratio, seed):
    torch.manual_seed(seed)
    img = torch.empty(1, height, width)
    return np.array([tv_transforms.RandomResizedCrop.get_params(img, list(scale), list(ratio)) for _ in range(n)],
                    dtype=np.float64)


def check_inside(b, height, width):
    assert b.shape[1] == 4
    assert torch.equal(b, b.round())
    top, left, h, w = b.unbind(1)
    assert (h >= 1).all() and (w >= 1).all()
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + h <= height).all() and (left + w <= width).all()


SIZES = [
    (224, 224, (0.08, 1.0), (3 / 4, 4 / 3)),
    (64, 48, (0.08, 1.0), (3 / 4, 4 / 3)),
    (20, 100, (0.08, 1.0), (3 / 4, 4 / 3)),  # many tries fail: centre-crop fallback is common
]


@pytest.mark.parametrize("height,width,scale,ratio", SIZES)
def test_matches_torchvision_distribution(height, width, scale, ratio):
    n = 3000
    ref = torchvision_boxes(n, height, width, scale, ratio, seed=0)
    gen = torch.Generator().manual_seed(1)
    ours_t = sample_crop_boxes(n, height, width, scale, ratio, generator=gen)
    check_inside(ours_t, height, width)
    ours = ours_t.double().numpy()

    def feats(b):
        top, left, h, w = b.T
        return {
            "area": h * w / (height * width),
            "log_aspect": np.log(w / h),
            "top": (top + 0.5) / (height - h + 1),
            "left": (left + 0.5) / (width - w + 1),
        }

    fr, fo = feats(ref), feats(ours)
    for k in fr:
        p = stats.ks_2samp(fr[k], fo[k]).pvalue
        assert p > 1e-3, (k, p)
    # same fallback frequency (the exact centre box)
    fb_ref = np.mean(np.all(ref == ref_fallback(height, width, ratio), axis=1))
    fb_ours = np.mean(np.all(ours == ref_fallback(height, width, ratio), axis=1))
    assert abs(fb_ref - fb_ours) < 4 * math.sqrt(max(fb_ref, 1e-3) * (1 - fb_ref) / n) + 2e-3


def ref_fallback(height, width, ratio):
    # torchvision's fallback, for a draw whose 10 tries all fail
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return np.array([(height - h) // 2, (width - w) // 2, h, w], dtype=np.float64)


def test_detects_wrong_distribution():
    # the KS check above has power: a wrong scale range is caught
    n = 3000
    ref = torchvision_boxes(n, 224, 224, (0.08, 1.0), (3 / 4, 4 / 3), seed=0)
    wrong = sample_crop_boxes(n, 224, 224, (0.2, 1.0), generator=torch.Generator().manual_seed(1)).double().numpy()
    area = lambda b: b[:, 2] * b[:, 3]  # noqa: E731
    assert stats.ks_2samp(area(ref), area(wrong)).pvalue < 1e-6


def test_always_fallback_and_small_images():
    b = sample_crop_boxes(50, 10, 100, scale=(0.99, 1.0), ratio=(1.0, 1.0))
    assert (b == torch.tensor([0.0, 45.0, 10.0, 10.0])).all()
    b = sample_crop_boxes(200, 1, 1)
    assert (b == torch.tensor([0.0, 0.0, 1.0, 1.0])).all()
    b = sample_crop_boxes(500, 3, 5)
    check_inside(b, 3, 5)


def test_shared_mode_and_reproducibility():
    g1 = torch.Generator().manual_seed(7)
    g2 = torch.Generator().manual_seed(7)
    a = sample_crop_boxes(16, 64, 64, generator=g1)
    b = sample_crop_boxes(16, 64, 64, generator=g2)
    assert torch.equal(a, b)
    assert len({tuple(r) for r in a.tolist()}) > 1  # per image: different boxes
    c = sample_crop_boxes(16, 64, 64, generator=g1)
    assert not torch.equal(a, c)
    s = sample_crop_boxes(16, 64, 64, per_image=False, generator=torch.Generator().manual_seed(3))
    assert s.shape == (16, 4) and (s == s[:1]).all()
    f1, h1 = sample_flip_shift(8, 4, generator=torch.Generator().manual_seed(5))
    f2, h2 = sample_flip_shift(8, 4, generator=torch.Generator().manual_seed(5))
    assert torch.equal(f1, f2) and torch.equal(h1, h2)
    f, h = sample_flip_shift(8, 4, per_image=False)
    assert (f == f[0]).all() and (h == h[:1]).all()


def test_flip_shift_distribution():
    n = 20000
    gen = torch.Generator().manual_seed(0)
    flip, shift = sample_flip_shift(n, (3, 0), generator=gen)
    assert flip.dtype == torch.bool and shift.dtype == torch.int64 and shift.shape == (n, 2)
    assert abs(flip.float().mean().item() - 0.5) < 0.02
    counts = torch.bincount(shift[:, 0], minlength=4).numpy()
    assert counts.shape == (4,)  # inclusive range 0..3, nothing else
    assert stats.chisquare(counts).pvalue > 1e-3
    assert (shift[:, 1] == 0).all()
    _, s = sample_flip_shift(1000, 32, generator=gen)
    assert s.min() == 0 and s.max() == 32
    with pytest.raises(ValueError):
        sample_flip_shift(3, -1)


def test_traceable_without_host_sync():
    # fullgraph tracing fails on .item() or data-dependent Python branches
    torch._dynamo.reset()

    def f(x):
        b = sample_crop_boxes(x.shape[0], 32, 32, device=x.device)
        fl, sh = sample_flip_shift(x.shape[0], 4, device=x.device)
        return b, fl, sh

    b, fl, sh = torch.compile(f, fullgraph=True, backend="eager")(torch.zeros(5))
    check_inside(b, 32, 32)
    assert fl.shape == (5,) and sh.shape == (5, 2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_capture():
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        sample_crop_boxes(4, 64, 64, device="cuda")
        sample_flip_shift(4, 4, device="cuda")
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        b = sample_crop_boxes(4, 64, 64, device="cuda")
        fl, sh = sample_flip_shift(4, 4, device="cuda")
    draws = []
    for _ in range(5):
        g.replay()
        torch.cuda.synchronize()
        check_inside(b.cpu(), 64, 64)
        draws.append(b.cpu().clone())
    assert any(not torch.equal(draws[0], d) for d in draws[1:])  # fresh randoms per replay


def _compiled_boxes_match_eager(device, sizes, seed):
    from srel_fast.kernels import crop_boxes_from_uniforms, draw_crop_uniforms

    torch._dynamo.reset()
    compiled = torch.compile(crop_boxes_from_uniforms, dynamic=False)
    for height, width, scale, ratio in sizes:
        g = torch.Generator(device=device).manual_seed(seed + height)
        for _ in range(2):  # the second call reuses the compiled code
            u = draw_crop_uniforms(4096, g, torch.device(device))
            eager = crop_boxes_from_uniforms(*u, height, width, scale, ratio)
            fused = compiled(*u, height, width, scale, ratio)
            check_inside(eager.cpu(), height, width)
            assert torch.equal(fused, eager)


@pytest.mark.parametrize("seed", [0, 1])
def test_boxes_from_uniforms_is_sample_crop_boxes_in_two_steps(seed):
    """The two steps give sample_crop_boxes' boxes exactly, from the same generator
    state, and a replacement of the arithmetic (as recovery passes a compiled one) is used."""
    from srel_fast.kernels import crop_boxes_from_uniforms, draw_crop_uniforms

    for height, width, scale, ratio in SIZES:
        g1 = torch.Generator().manual_seed(seed)
        g2 = torch.Generator().manual_seed(seed)
        whole = sample_crop_boxes(257, height, width, scale, ratio, generator=g1)
        parts = crop_boxes_from_uniforms(*draw_crop_uniforms(257, g2, torch.device("cpu")), height, width,
                                         scale, ratio)
        assert torch.equal(whole, parts)
        calls = []

        def spy(*args):
            calls.append(args[3:5])
            return crop_boxes_from_uniforms(*args)

        g1.manual_seed(seed)
        assert torch.equal(sample_crop_boxes(257, height, width, scale, ratio, generator=g1,
                                             boxes_from_uniforms=spy), whole)
        assert calls == [(height, width)]


def test_compiled_box_arithmetic_gives_the_same_boxes():
    """torch.compile of the box arithmetic (inductor, float64) keeps every box of fresh draws."""
    _compiled_boxes_match_eager("cpu", SIZES[:2], 3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_box_arithmetic_gives_the_same_boxes_gpu():
    _compiled_boxes_match_eager("cuda", SIZES, 5)
