"""--tiles-per-side k (IDC's multi-formation): each stored image holds k x k images of its
class at 1/k of the size; recovery optimises the tiles, each crop upsampled to the model's
size, and every reader of a synthetic set gets them decoded to k*k full-size images."""
from __future__ import annotations

import json

import pytest
import torch

from srel_fast.augment import draw_crop_params
from srel_fast.data import load_builtin
from srel_fast.errors import UserError
from srel_fast.images import decode_tiles, load_synthetic, load_tree, pack_tiles, unpack_tiles
from srel_fast.kernels.multicrop_resize import multicrop_resize_reference
from srel_fast.models import load_model
from srel_fast.recover import RealImages, RecoverConfig, run_recover


@pytest.mark.parametrize("n,k,c,h,w", [(2, 2, 1, 3, 3), (3, 3, 3, 2, 4), (1, 1, 2, 5, 5), (2, 4, 1, 2, 2)])
def test_pack_places_tile_t_at_row_t_div_k_column_t_mod_k(n, k, c, h, w):
    g = torch.Generator().manual_seed(n * 100 + k)
    tiles = torch.randn(n * k * k, c, h, w, generator=g, dtype=torch.float64)
    packed = pack_tiles(tiles, k)
    assert packed.shape == (n, c, k * h, k * w)
    for i in range(n):
        for t in range(k * k):
            r, col = divmod(t, k)
            assert torch.equal(packed[i, :, r * h:(r + 1) * h, col * w:(col + 1) * w], tiles[i * k * k + t])
    assert torch.equal(unpack_tiles(packed, k), tiles)


def test_pack_and_unpack_refuse_what_does_not_divide():
    with pytest.raises(ValueError, match="do not fill"):
        pack_tiles(torch.zeros(5, 1, 2, 2), 2)
    with pytest.raises(ValueError, match="do not split"):
        unpack_tiles(torch.zeros(1, 1, 9, 8), 2)


@pytest.mark.parametrize("k,size", [(2, 8), (2, 28), (3, 12), (4, 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_decode_is_the_crop_resize_recovery_optimised(k, size, dtype):
    """Decoding a tile gives the image the model saw in recovery for a crop of the whole tile
    (the multi-crop resize's float64 reference), so training sees what was optimised."""
    g = torch.Generator().manual_seed(k * size)
    stored = torch.rand(3, 2, size, size, generator=g, dtype=dtype)
    tiles = unpack_tiles(stored, k)
    t = size // k
    boxes = torch.tensor([[0, 0, t, t]] * tiles.shape[0], dtype=torch.float64)
    want = multicrop_resize_reference(tiles.double(), boxes, (size, size))
    got = decode_tiles(stored, k)
    assert got.shape == (3 * k * k, 2, size, size)
    torch.testing.assert_close(got.double(), want, atol=1e-6 if dtype == torch.float32 else 1e-12, rtol=0)


def test_decode_with_one_tile_is_the_identity():
    x = torch.rand(2, 1, 8, 8)
    assert decode_tiles(x, 1) is x


@pytest.mark.parametrize("out", [(28, 28), (16, 24)])
def test_symmetric_roll_is_taken_modulo_the_output_size(out):
    """A crop of a 14-pixel tile is rolled after it is resized to the output size: a roll of -1
    is size - 1 of the output, not of the tile."""
    g = torch.Generator().manual_seed(0)
    p = draw_crop_params(200, 14, 14, g, per_image=True, jitter=3, jitter_range="symmetric", out_size=out)
    assert int(p.shift[:, 0].max()) >= out[0] - 3 and int(p.shift[:, 1].max()) >= out[1] - 3
    assert bool((p.shift[:, 0] < out[0]).all() and (p.shift[:, 1] < out[1]).all())
    assert float(p.boxes[:, 2:].max()) <= 14


def test_tiles_start_at_area_downsampled_real_images_of_the_class(digits_teacher, tmp_path):
    """With lr 0 the stored images are the class's real images k*k*i .. k*k*i + k*k - 1,
    area-downsampled and packed; load_synthetic gives k*k labelled images per stored one."""
    out = tmp_path / "t"
    m = run_recover(RecoverConfig(out=str(out), weights=digits_teacher[0], ipc=2, iterations=1, lr=0.0,
                                  device="cpu", progress=False, tiles_per_side=2, seed=4))
    assert m["config"]["tiles_per_side"] == 2
    assert m["recipe"]["overrides"]["tiles_per_side"] == {"value": 2, "recipe": 1}
    data = load_builtin("digits", "train")
    real = RealImages(data.images, data.labels, 10, seed=4)
    images, labels, classes = load_tree(str(out))
    assert images.shape == (20, 1, 8, 8)
    for img, lab in zip(images, labels):
        c = int(classes[lab])
        starts = []
        for i in range(2):
            idx = [real.index(c, 4 * i + t) for t in range(4)]
            assert all(int(data.labels[j]) == c for j in idx)
            small = torch.nn.functional.avg_pool2d(data.images[idx].double() / 255, 2)
            starts.append(pack_tiles(small, 2)[0])
        assert min(float((img.double() / 255 - s).abs().max()) for s in starts) <= 1 / 255 + 1e-6
    x, y, _ = load_synthetic(str(out), load_model(digits_teacher[0]), torch.device("cpu"))
    assert x.shape == (80, 1, 8, 8)
    per_class = torch.bincount(y, minlength=10)
    assert per_class.tolist() == [8] * 10
    # each decoded image carries the label of the stored image it came from
    assert torch.equal(y, torch.tensor([int(classes[lab]) for lab in labels]).repeat_interleave(4))


def test_tiled_recovery_lowers_its_loss_and_resumes_old_configs(digits_teacher, tmp_path):
    out = tmp_path / "r"
    m = run_recover(RecoverConfig(out=str(out), weights=digits_teacher[0], ipc=1, iterations=20, device="cpu",
                                  progress=False, tiles_per_side=2, class_images=1))
    m0 = run_recover(RecoverConfig(out=str(tmp_path / "r0"), weights=digits_teacher[0], ipc=1, iterations=1,
                                   lr=0.0, device="cpu", progress=False, tiles_per_side=2, class_images=1))
    assert m["completed_batches"] == 1
    assert m["batches"][0]["loss"] < m0["batches"][0]["loss"]
    # a tree written before --tiles-per-side existed (no such field) resumes as one tile per image
    plain = tmp_path / "old"
    run_recover(RecoverConfig(out=str(plain), weights=digits_teacher[0], ipc=1, iterations=2, device="cpu",
                              progress=False))
    path = plain / "recover_config.json"
    record = json.loads(path.read_text())
    del record["config"]["tiles_per_side"]
    path.write_text(json.dumps(record))
    again = run_recover(RecoverConfig(out=str(plain), weights=digits_teacher[0], ipc=1, iterations=2, device="cpu",
                                      progress=False))
    assert again["completed_batches"] == 1
    x, y, _ = load_synthetic(str(plain), None, torch.device("cpu"))
    assert x.shape == (10, 1, 8, 8)


def test_tiles_per_side_is_validated(digits_teacher, tmp_path):
    with pytest.raises(UserError, match="--tiles-per-side must be >= 1"):
        run_recover(RecoverConfig(out=str(tmp_path / "z"), weights=digits_teacher[0], ipc=1, device="cpu",
                                  progress=False, tiles_per_side=0))
    with pytest.raises(UserError, match="must divide the image size 8"):
        run_recover(RecoverConfig(out=str(tmp_path / "three"), weights=digits_teacher[0], ipc=1, device="cpu",
                                  progress=False, tiles_per_side=3))


@pytest.mark.parametrize("ipc,size,real,want", [(1, 28, True, 2), (1, 32, True, 2), (1, 29, True, 1), (2, 28, True, 1),
                                               (10, 28, True, 1), (1, 8, True, 1), (1, 28, False, 1),
                                               (1, 224, True, 1)])
def test_srel_tiles_at_ipc_1_on_small_images_with_real_data(ipc, size, real, want):
    cfg = RecoverConfig(out="", ipc=ipc).resolved(size, real_data=real)
    assert cfg.tiles_per_side == want
    # tiles get the longer recovery: 3,000 iterations at IPC 1 (whole images 1,000), 1,000 above (else 100)
    small = size < 128 and real
    assert cfg.iterations == ({(True, True): 3000, (True, False): 1000, (False, True): 1000,
                               (False, False): 100}[(ipc == 1, want > 1)] if small else 1000)
    asked = RecoverConfig(out="", ipc=ipc, tiles_per_side=2).resolved(size, real_data=real)
    assert asked.iterations == ((3000 if ipc == 1 else 1000) if small else 1000)
    assert RecoverConfig(out="", ipc=ipc, iterations=7).resolved(size, real_data=real).iterations == 7
    # an explicit value wins over the rule, as does a paper recipe's
    assert RecoverConfig(out="", ipc=ipc, tiles_per_side=3).resolved(size, real_data=real).tiles_per_side == 3
    assert RecoverConfig(out="", ipc=ipc, recipe="sre2l-tiny").resolved(size, real_data=real).tiles_per_side == 1
