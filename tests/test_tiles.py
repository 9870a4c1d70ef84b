"""--tiles-per-side k (IDC's multi-formation): each stored image holds k x k images of its
class at 1/k of the size; recovery optimises the tiles, each crop upsampled to the model's
size, and every reader of a synthetic set gets them decoded to k*k full-size images."""
from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch

from srel_fast.augment import draw_crop_params
from srel_fast.data import load_builtin
from srel_fast.errors import UserError
from srel_fast.images import (decode_tiles, load_synthetic, load_tree, pack_tiles, stored_ipc_index, tree_files,
                              unpack_tiles)
from srel_fast.kernels.multicrop_resize import multicrop_resize_reference
from srel_fast.models import load_model
from srel_fast.recover import RealImages, RecoverConfig, Recoverer, first_real_index, formations, run_recover


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


@pytest.mark.parametrize("tiled_images", [None, 2])
def test_tiles_start_at_area_downsampled_real_images_of_the_class(digits_teacher, tmp_path, tiled_images):
    """With lr 0 each stored image of tiles is the class's next k*k real images, area-downsampled
    and packed, and each whole one (mixed formation: srel's rule stores tiles in the first image
    of a class only) the next real image itself; no two start at the same real image.
    load_synthetic gives k*k labelled images per stored image of tiles and one per whole one."""
    out = tmp_path / "t"
    m = run_recover(RecoverConfig(out=str(out), weights=digits_teacher[0], ipc=2, iterations=1, lr=0.0,
                                  device="cpu", progress=False, tiles_per_side=2, seed=4, tiled_images=tiled_images))
    tiled = 1 if tiled_images is None else tiled_images
    assert m["config"]["tiles_per_side"] == 2 and m["config"]["tiled_images"] == tiled
    assert m["recipe"]["overrides"]["tiles_per_side"] == {"value": 2, "recipe": 1}
    assert m["completed_batches"] == 2
    data = load_builtin("digits", "train")
    real = RealImages(data.images, data.labels, 10, seed=4)
    listing, classes = tree_files(str(out))
    images, labels, _ = load_tree(str(out))
    assert images.shape == (20, 1, 8, 8)
    for img, lab, (path, _) in zip(images, labels, listing):
        c, i = int(classes[lab]), stored_ipc_index(path)
        first = first_real_index(i, tiled, 2)
        if i < tiled:
            idx = [real.index(c, first + t) for t in range(4)]
            start = pack_tiles(torch.nn.functional.avg_pool2d(data.images[idx].double() / 255, 2), 2)[0]
        else:
            idx = [real.index(c, first)]
            start = data.images[idx[0]].double() / 255
        assert all(int(data.labels[j]) == c for j in idx)
        assert float((img.double() / 255 - start).abs().max()) <= 1 / 255 + 1e-6
    # the stored images of a class started at distinct real images: 4 per tiled one, 1 per whole
    assert first_real_index(2, tiled, 2) == 4 * tiled + (2 - tiled)
    x, y, norm = load_synthetic(str(out), load_model(digits_teacher[0]), torch.device("cpu"))
    per_stored = torch.tensor([4 if stored_ipc_index(path) < tiled else 1 for path, _ in listing])
    assert x.shape == (int(per_stored.sum()), 1, 8, 8)
    assert torch.bincount(y, minlength=10).tolist() == [4 * tiled + (2 - tiled)] * 10
    # tiles decoded first, each with the label of the stored image it came from, then the whole images
    is_tiled = per_stored == 4
    stored = norm.normalize(images)
    want = torch.cat([decode_tiles(stored[is_tiled], 2), stored[~is_tiled]])
    assert torch.allclose(x, want)
    want_labels = torch.tensor([int(classes[lab]) for lab in labels])
    assert torch.equal(y, torch.cat([want_labels[is_tiled].repeat_interleave(4), want_labels[~is_tiled]]))


def test_a_mixed_run_shows_one_progress_line_over_both_formations(digits_teacher, tmp_path, capsys, monkeypatch):
    """The tiled and the whole images of a mixed run are counted on one line: batches of both
    formations, images written, and the iterations of each at its own length; a resumed run
    counts what is already there and builds no recoverer for a finished formation."""
    out = tmp_path / "m"
    cfg = RecoverConfig(out=str(out), weights=digits_teacher[0], ipc=3, batch_size=5, class_images=1,
                        iterations=3, tile_iterations=2, device="cpu", progress=True, tiles_per_side=2,
                        tiled_images=1)
    capsys.readouterr()
    m = run_recover(cfg)
    assert m["completed_batches"] == 6
    # the cost is per image the model sees: 4 tiles of each stored image of tiles
    seen = sum(len(e["classes"]) * e["iterations_done"] * (4 if e["ipc_index"] == 0 else 1) for e in m["batches"])
    assert seen == 2 * 5 * 2 * 4 + 4 * 5 * 3
    assert m["ms_per_image_iteration"] == pytest.approx(1000 * m["seconds_total"] / seen)
    err = capsys.readouterr().err
    assert "(0 of 6 batches done)" in err
    for k in range(1, 7):
        assert f"({k} of 6 batches done, {5 * k} images written, about " in err
    assert "16/16" in err   # 2 batches of tiles x 2 iterations + 4 of whole images x 3
    os.remove(tree_files(str(out))[0][-1][0])   # the last image listed: a whole one (ipc 2)
    built = []
    original = Recoverer.__init__

    def counting(self, *args, **kwargs):
        built.append(args[4].iterations)   # the formation's config: its length tells which
        original(self, *args, **kwargs)
    monkeypatch.setattr(Recoverer, "__init__", counting)
    assert run_recover(cfg)["completed_batches"] == 6
    err = capsys.readouterr().err
    assert built == [3]
    assert "(5 of 6 batches done)" in err and "(6 of 6 batches done, 30 images written, about " in err


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
    # a tiled tree written before --tiled-images existed held tiles in every stored image, recovered
    # `iterations`: it is read so, and resumes under the flags that say so
    tiled = tmp_path / "old_tiles"
    cfg = RecoverConfig(out=str(tiled), weights=digits_teacher[0], ipc=2, iterations=2, device="cpu",
                        progress=False, tiles_per_side=2, tiled_images=2)
    run_recover(cfg)
    path = tiled / "recover_config.json"
    record = json.loads(path.read_text())
    assert record["config"]["tile_iterations"] == 2
    del record["config"]["tiled_images"], record["config"]["tile_iterations"]
    path.write_text(json.dumps(record))
    assert run_recover(cfg)["completed_batches"] == 2
    x, y, _ = load_synthetic(str(tiled), None, torch.device("cpu"))
    assert x.shape == (80, 1, 8, 8) and torch.bincount(y).tolist() == [8] * 10


def test_tiles_per_side_is_validated(digits_teacher, tmp_path):
    with pytest.raises(UserError, match="--tiles-per-side must be >= 1"):
        run_recover(RecoverConfig(out=str(tmp_path / "z"), weights=digits_teacher[0], ipc=1, device="cpu",
                                  progress=False, tiles_per_side=0))
    with pytest.raises(UserError, match="must divide the image size 8"):
        run_recover(RecoverConfig(out=str(tmp_path / "three"), weights=digits_teacher[0], ipc=1, device="cpu",
                                  progress=False, tiles_per_side=3))


@pytest.mark.parametrize("ipc,size,real,want", [
    # (tiles per side, stored images of tiles per class, their iterations, the whole images' iterations)
    (1, 28, True, (2, 1, 3000, 3000)),   # small images with real data, IPC 1: the one image in tiles
    (1, 32, True, (2, 1, 3000, 3000)),
    (2, 28, True, (2, 1, 3000, 1000)),   # IPC 2: one image of tiles, one whole (mixed formation)
    (3, 28, True, (2, 1, 3000, 100)),    # IPC 3: one image of tiles, two whole ones
    (4, 28, True, (1, 0, 100, 100)),     # above IPC 3: whole images
    (10, 28, True, (1, 0, 100, 100)),
    (1, 29, True, (1, 0, 1000, 1000)),   # an odd size: no tiles; one whole image recovers longer
    (1, 8, True, (1, 0, 1000, 1000)),    # too small for tiles
    (2, 8, True, (1, 0, 100, 100)),
    (1, 28, False, (1, 0, 1000, 1000)),  # no real data: SRe2L's objective from noise
    (1, 224, True, (1, 0, 1000, 1000)),  # large images: the paper's objective
])
def test_srel_tiles_rule_on_small_images_with_real_data(ipc, size, real, want):
    cfg = RecoverConfig(out="", ipc=ipc).resolved(size, real_data=real)
    assert (cfg.tiles_per_side, cfg.tiled_images, cfg.tile_iterations, cfg.iterations) == want
    # tiles asked for: on small images with real data in the first stored image of a class only,
    # recovered 3,000 iterations, the whole ones 1,000 when one is left, else 100; elsewhere in every
    # stored image, with the iterations' length
    small = size < 128 and real
    asked = RecoverConfig(out="", ipc=ipc, tiles_per_side=2).resolved(size, real_data=real)
    whole = {0: 3000, 1: 1000}.get(ipc - 1, 100)
    assert (asked.tiled_images, asked.tile_iterations, asked.iterations) == ((1, 3000, whole) if small
                                                                            else (ipc, 1000, 1000))
    every = RecoverConfig(out="", ipc=ipc, tiles_per_side=2, tiled_images=ipc).resolved(size, real_data=real)
    assert every.tile_iterations == every.iterations == (1000 if ipc > 1 or not small else 3000)
    # an explicit length is every image's; explicit values win over the rule, as do a paper recipe's
    given = RecoverConfig(out="", ipc=ipc, iterations=7, tiles_per_side=2).resolved(size, real_data=real)
    assert (given.iterations, given.tile_iterations) == (7, 7)
    assert RecoverConfig(out="", ipc=ipc, tile_iterations=9, tiles_per_side=2).resolved(
        size, real_data=real).tile_iterations == 9
    assert RecoverConfig(out="", ipc=ipc, tiles_per_side=3).resolved(size, real_data=real).tiles_per_side == 3
    tiny = RecoverConfig(out="", ipc=ipc, recipe="sre2l-tiny").resolved(size, real_data=real)
    assert (tiny.tiles_per_side, tiny.tiled_images) == (1, 0)


def test_formations_split_the_run_and_the_real_starts():
    """run_recover runs the stored images of tiles and the whole ones as two formations, each
    over its part of --ipc-start .. --ipc-end and with its own length; a range inside one
    formation gives one."""
    cfg = RecoverConfig(out="", ipc=5, tiles_per_side=2, tiled_images=2).resolved(28, real_data=True)
    assert [(f.ipc_start, f.ipc_end, f.iterations) for f in formations(cfg)] == [(0, 2, 1000), (2, 5, 100)]
    part = dataclasses.replace(cfg, ipc_start=1, ipc_end=3)
    assert [(f.ipc_start, f.ipc_end) for f in formations(part)] == [(1, 2), (2, 3)]
    assert [(f.ipc_start, f.ipc_end) for f in formations(dataclasses.replace(cfg, ipc_start=3))] == [(3, 5)]
    plain = RecoverConfig(out="", ipc=4).resolved(28, real_data=True)
    assert [(f.ipc_start, f.ipc_end, f.iterations) for f in formations(plain)] == [(0, 4, 100)]
    # real start images: 4 per stored image of 2 x 2 tiles, then one per whole image
    assert [first_real_index(i, 2, 2) for i in range(5)] == [0, 4, 8, 9, 10]
    assert [first_real_index(i, 0, 2) for i in range(3)] == [0, 1, 2]
    assert [first_real_index(i, 3, 3) for i in range(4)] == [0, 9, 18, 27]


def test_tiled_images_is_validated(digits_teacher, tmp_path):
    def run(**kw):
        run_recover(RecoverConfig(out=str(tmp_path / "v"), weights=digits_teacher[0], ipc=2, iterations=1,
                                  device="cpu", progress=False, **kw))
    with pytest.raises(UserError, match="--tiled-images must be between 0 and --ipc 2"):
        run(tiles_per_side=2, tiled_images=3)
    with pytest.raises(UserError, match="needs --tiles-per-side 2 or more"):
        run(tiles_per_side=1, tiled_images=1)
    with pytest.raises(UserError, match="stores no tiles"):
        run(tiles_per_side=2, tiled_images=0)
    with pytest.raises(UserError, match="--tile-iterations must be positive"):
        run(tiles_per_side=2, tile_iterations=0)
