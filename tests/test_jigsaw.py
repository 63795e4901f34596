"""jigsaw.py: the permutation set (greedy max-min Hamming distance, cached), the puzzles and
their labels, and the tiny preset end to end on CPU (puzzle accuracy above chance, the linear
probe, exact resume)."""

import argparse
import itertools
import json
import math

import numpy as np
import pytest
import torch

import jigsaw
from common.checkpoint import load_checkpoint
from common.cli import ConfigError, apply_preset
from conftest import _top1, probe_vs_untrained
from conftest import quick_probe as probe


def run_jigsaw(cifar_tar, out, *extra):
    args = jigsaw.get_args_parser().parse_args(
        ["--preset", "tiny", "--data", cifar_tar, "--out", str(out), "--device", "cpu"]
        + ["--limit-test", "1000", *extra]
    )
    return jigsaw.main(apply_preset(args, jigsaw.PRESETS))


@pytest.fixture(scope="module")
def perms100():
    return jigsaw.hamming_set(100, seed=0)


def test_permutation_set_is_valid_and_max_min(perms100):
    perms, d_min = perms100
    assert perms.shape == (100, 9)
    assert (np.sort(perms, 1) == np.arange(9)).all()  # every row a permutation of 0..8
    assert len({tuple(p) for p in perms}) == 100  # all distinct
    # The set's minimum pairwise Hamming distance, recomputed independently, is the one the
    # algorithm reports, and it is what greedy max-min gives for 100 (the paper: avg ~8).
    dist = (perms[:, None, :] != perms[None, :, :]).sum(-1)
    off = dist[~np.eye(100, dtype=bool)]
    assert off.min() == d_min == 6
    assert 7.9 < off.mean() < 8.3
    # Deterministic, and greedy: the first k of a set are the set of size k.
    again, _ = jigsaw.hamming_set(12, seed=0)
    assert (again == perms[:12]).all()
    assert not (jigsaw.hamming_set(3, seed=1)[0] == perms[:3]).all()  # the seed matters


def test_each_added_permutation_maximises_the_minimum_distance(perms100):
    """Independently of the implementation: for every step k, no permutation of 0..8 outside
    the first k is farther (in minimum Hamming distance) from them than the k-th one chosen."""
    perms, _ = perms100
    cands = np.array(list(itertools.permutations(range(9))), dtype=np.int8)  # [9!, 9]
    nearest = np.full(len(cands), 99)
    index = {tuple(p): i for i, p in enumerate(cands.tolist())}
    chosen = []
    for k, p in enumerate(perms):
        if k > 0:
            best = np.delete(nearest, chosen).max()
            assert nearest[index[tuple(p)]] == best, k
        chosen.append(index[tuple(p)])
        nearest = np.minimum(nearest, (cands != p).sum(1))


def test_permutations_are_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("SSL_CACHE_DIR", str(tmp_path))
    a = jigsaw.load_perms(20, seed=0)
    files = list((tmp_path / "jigsaw").glob("*.npy"))
    assert len(files) == 1 and np.array_equal(np.load(files[0]), a.numpy())
    np.save(files[0], np.load(files[0])[::-1].copy())  # a cached file is read, not recomputed
    assert torch.equal(jigsaw.load_perms(20, seed=0), a.flip(0))
    assert torch.equal(a, torch.from_numpy(jigsaw.hamming_set(20, seed=0)[0]))


def coordinate_images(n, size):
    """uint8 [n, S, S, 3] whose red channel is 8 * row and green 8 * column: a tile's mean
    colour says where it was cut (bilinear upsampling keeps a linear ramp linear)."""
    ramp = torch.arange(size) * 8
    img = torch.stack([ramp[:, None].expand(size, size), ramp[None, :].expand(size, size)], -1)
    img = torch.cat([img, torch.zeros(size, size, 1, dtype=img.dtype)], -1)
    return img.to(torch.uint8).expand(n, size, size, 3).contiguous()


@pytest.mark.parametrize("canvas", [30, 64])  # native tiles (exact crops) and upsampled x2
def test_puzzle_tiles_follow_their_label(canvas, perms100):
    perms = torch.from_numpy(perms100[0])
    size = 30 if canvas == 30 else 32
    crop = canvas // 3 * 3
    cell = crop // 3
    args = argparse.Namespace(gray_p=0.0, canvas=canvas, crop_size=crop, tile=cell * 64 // 75)
    n = 64
    tiles, labels = jigsaw.cut_puzzles(
        coordinate_images(n, size), perms, args, torch.Generator().manual_seed(0)
    )
    assert tiles.shape == (n, 9, 3, args.tile, args.tile) and labels.shape == (n,)
    assert len(set(labels.tolist())) > 30  # labels cover the set
    # Where each tile came from, in canvas pixels: source row/col = 255 * mean / 8, then
    # canvas = (source + 0.5) * scale - 0.5; the tile's centre says which cell it is in.
    scale = canvas / size
    centre = (tiles[:, :, :2].mean((-2, -1)) * 255 / 8 + 0.5) * scale - 0.5  # [n, 9, (y, x)]
    rc = torch.div(centre, cell, rounding_mode="floor").long()  # origin < jitter room
    found = rc[..., 0] * 3 + rc[..., 1]  # [n, 9]: the cell each input position holds
    sets = {tuple(p) for p in perms.tolist()}
    for b in range(n):
        assert tuple(found[b].tolist()) in sets  # every sampled permutation is in the set
        assert torch.equal(found[b], perms[labels[b]]), b  # and it is the label's
    # Gaps and jitter: one grid origin per puzzle, each tile inside its own cell, so that
    # neighbouring tiles never touch or overlap; the gaps vary from 0 to 2 * (cell - tile).
    t = args.tile
    corners = jigsaw.tile_corners(500, canvas, cell, t, torch.Generator().manual_seed(1))
    assert (corners >= 0).all() and (corners + t <= canvas).all()
    off = corners - torch.tensor([(r, c) for r in range(3) for c in range(3)]) * cell
    assert (off.max(1).values - off.min(1).values <= cell - t).all()
    g = corners.view(500, 3, 3, 2)
    gaps = (
        torch.cat(
            [
                (g[:, :, 1:, 1] - g[:, :, :-1, 1]).flatten(),
                (g[:, 1:, :, 0] - g[:, :-1, :, 0]).flatten(),
            ]
        )
        - t
    )
    assert gaps.min() == 0 and gaps.max() == 2 * (cell - t)


def test_tiles_are_normalised_each_on_its_own():
    tiles = torch.rand(4, 9, 3, 8, 8) * (0.2 + torch.rand(4, 9, 3, 1, 1)) + torch.rand(
        4, 9, 3, 1, 1
    )
    out = jigsaw.normalize_tiles(tiles)
    assert torch.allclose(out.mean((-2, -1)), torch.zeros(4, 9, 3), atol=1e-5)
    assert torch.allclose(out.std((-2, -1)), torch.ones(4, 9, 3), atol=1e-4)
    flat = jigsaw.normalize_tiles(torch.full((1, 1, 3, 8, 8), 0.5))
    assert torch.equal(flat, torch.zeros_like(flat))  # a flat tile stays finite (zeros)


@pytest.fixture(scope="module")
def tiny_run(cifar_tar, tmp_path_factory):
    out = tmp_path_factory.mktemp("jigsaw")
    return out, run_jigsaw(cifar_tar, out)


def test_tiny_run_beats_chance(tiny_run):
    out, res = tiny_run
    state = load_checkpoint(out / "checkpoint.pt")
    cfg = state["config"]
    assert state["method"] == "jigsaw" and state["step"] == res["steps"] > 0
    assert cfg["image_size"] == 32 and cfg["stem"] == "cifar"
    assert state["head"]["fc8.weight"].shape[0] == cfg["num_perms"]
    lines = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    steps = [x for x in lines if "loss" in x]
    assert {"step", "loss", "lr", "train_top1", "img_per_s"} <= steps[0].keys()
    assert steps[-1]["loss"] < math.log(cfg["num_perms"])  # below the uniform guess
    assert [x for x in lines if "pretext_top1" in x][-1]["pretext_top1"] == res["pretext_top1"]
    assert lines[-1]["result"] == res and 10 < res["knn_top1"] < 100
    print("jigsaw tiny", res)
    assert res["pretext_top1"] > 2 * 100 / cfg["num_perms"]  # twice chance (tiny: P = 10)


def test_linear_probe_evaluates_the_checkpoint(tiny_run, monkeypatch):
    out, _ = tiny_run
    res = probe(out, monkeypatch, "--layer", "3")
    assert res["method"] == "jigsaw" and res["layer"] == 3 and res["num_test"] == 1000
    assert 10 < res["linear_top1"] <= 100 and 10 < res["knn_top1"] <= 100  # above chance (10%)


@pytest.fixture(scope="module")
def learned_run(nette_tar, tmp_path_factory):
    """Jigsaw where it learns features within a test: Imagenette at 96 px (32 px cells, 27 px
    tiles, the ImageNet stem), the `cpu` preset's puzzles (P = 100) for 5 epochs of its 9,469
    train images, ~5 minutes on one core. On CIFAR-10's 6 px tiles even the whole `cpu` preset
    (550k puzzles, ~12 minutes on 2 cores) does not clear a margin on this probe (measured
    2026-12-05, linear at block 3: 35.7 trained vs 34.0 untrained)."""
    out = tmp_path_factory.mktemp("jigsaw_learned")
    argv = ["--preset", "cpu", "--data", nette_tar, "--image-size", "96", "--epochs", "5"]
    argv += ["--out", str(out), "--device", "cpu", "--knn-bank", "500", "--limit-test", "500"]
    jigsaw.main(apply_preset(jigsaw.get_args_parser().parse_args(argv), jigsaw.PRESETS))
    return out


# Measured on that run (2026-12-05, 2-core machine, one core), on the probe's 1,000 test
# images: last stage linear 32.1 trained vs 27.9 untrained (+4.2), k-NN 28.3 vs 23.7 (+4.6);
# block 3 linear 37.4 vs 33.3 (+4.1), k-NN 27.9 vs 25.5 (+2.4). An untrained trunk of another
# seed in the trained one's place: linear 31.1 (+3.2: this probe's linear spread on Imagenette is
# wide), k-NN 24.9 (+1.2): the test fails on k-NN, so both are asserted.
MARGIN = 2.0


@pytest.mark.slow
def test_probe_beats_the_untrained_network(learned_run, monkeypatch):
    """Linear probe and k-NN on the trained trunk beat the same trunk untrained (same stage,
    same 96 px input, same probe) by MARGIN points: fails when nothing is learned."""
    trained, rand = probe_vs_untrained(learned_run, monkeypatch)
    assert trained["method"] == "jigsaw" and trained["num_test"] == 1000
    why = f"trained {_top1(trained)} vs untrained {_top1(rand)} (linear, k-NN)"
    assert trained["linear_top1"] > rand["linear_top1"] + MARGIN, why
    assert trained["knn_top1"] > rand["knn_top1"] + MARGIN, why


def test_resume_continues_exactly(cifar_tar, tmp_path):
    # 256 images: 8 steps per epoch. Both runs stop at step 12 (before the final evaluation):
    # one straight, one stopped at 5 and resumed across the epoch boundary.
    small = ("--limit-train", "256")
    run_jigsaw(cifar_tar, tmp_path / "full", *small, "--max-steps", "12")
    run_jigsaw(cifar_tar, tmp_path / "part", *small, "--max-steps", "5")
    assert load_checkpoint(tmp_path / "part")["step"] == 5
    run_jigsaw(cifar_tar, tmp_path / "part", *small, "--resume", "--max-steps", "12")
    a, b = load_checkpoint(tmp_path / "full"), load_checkpoint(tmp_path / "part")
    assert a["step"] == b["step"] == 12
    for part in ("backbone", "head"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    for i, s in a["optimizer"]["state"].items():  # momentum buffers too
        assert torch.equal(s["momentum_buffer"], b["optimizer"]["state"][i]["momentum_buffer"])


def test_tiles_must_fit_their_cells(cifar_tar, tmp_path):
    with pytest.raises(ConfigError, match="tiles of 30 px"):
        run_jigsaw(cifar_tar, tmp_path, "--tile", "30")


def test_default_geometry():
    for up, want in ((1, (32, 24, 6)), (2, (64, 48, 13))):
        args = argparse.Namespace(image_size=32, upsample=up, crop_size=None, tile=None)
        jigsaw.set_geometry(args)
        assert (args.canvas, args.crop_size, args.tile) == want
    big = argparse.Namespace(image_size=224, upsample=2, crop_size=None, tile=None)
    jigsaw.set_geometry(big)
    assert (big.canvas, big.crop_size, big.tile) == (224, 222, 63)  # the paper's 75/64


@pytest.mark.parametrize("crop, tile, leaks", [(None, None, False), (30, 8, True)])
def test_jpeg_block_phase_says_nothing_about_the_cell(crop, tile, leaks):
    # A tile's corner modulo JPEG's 8 px block is visible in its pixels. With the default
    # geometry its distribution is the same for all 9 cells; with the old 10 px cells it told
    # the cell (caught here, so the test can fail).
    args = argparse.Namespace(image_size=32, upsample=1, crop_size=crop, tile=tile)
    jigsaw.set_geometry(args)
    gen = torch.Generator().manual_seed(0)
    corners = jigsaw.tile_corners(20000, args.canvas, args.crop_size // 3, args.tile, gen)
    phase = corners % 8  # [n, 9, 2], canvas = source pixels here
    hists = [
        torch.bincount(phase[:, c].flatten(), minlength=8) / (2 * len(phase)) for c in range(9)
    ]
    spread = max((h - hists[0]).abs().max().item() for h in hists)
    assert (spread > 0.2) == leaks, spread
