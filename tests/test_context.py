"""context.py: the patch grid and its labels (an image whose pixels encode their coordinates),
the chromatic-aberration removal, the siamese pairing, and the script end to end on CPU: the
tiny preset beats chance, writes a checkpoint linear_probe.py evaluates, and resumes exactly."""

import argparse
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

import context
import linear_probe
from common.checkpoint import load_checkpoint
from common.cli import apply_preset
from conftest import ROOT, _top1, probe_vs_untrained

GRID = argparse.Namespace(canvas=96, crop_size=16, gap=8, jitter=3, chroma="project")


def coordinate_images(n: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two grey float batches [n, 3, size, size]: pixel (y, x) holds y, or x. Grey, so the
    green-magenta projection leaves them unchanged; bilinear sampling of a ramp is exact, so a
    patch's mean value is its centre's coordinate."""
    r = torch.arange(size, dtype=torch.float32)
    ys = r.view(1, 1, size, 1).expand(n, 3, size, size).contiguous()
    return ys, ys.transpose(2, 3).contiguous()


def patch_centres(args, n=256, size=32, seed=0) -> torch.Tensor:
    """[n, 9, 2] (y, x) centre of every patch make_patches cuts, in source pixels."""
    zero, one = torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1)
    ys, xs = coordinate_images(n, size)
    cy = context.make_patches(ys, args, zero, one, torch.Generator().manual_seed(seed))
    cx = context.make_patches(xs, args, zero, one, torch.Generator().manual_seed(seed))
    return torch.stack([cy.mean((2, 3, 4)), cx.mean((2, 3, 4))], 2)


def test_neighbour_sits_where_its_label_says():
    args = GRID
    c = patch_centres(args)
    scale = args.canvas / 32
    step, jit = (args.crop_size + args.gap) / scale, args.jitter / scale
    labels = context.pair_labels(len(c), "cpu").view(-1, 8)  # what the model is trained on
    for k in range(8):
        assert (labels[:, k] == k).all()
        d = c[:, k + 1] - c[:, 0]  # [n, 2] neighbour minus centre, in source pixels
        dy, dx = context.NEIGHBOURS[k]
        for axis, want in ((0, dy), (1, dx)):
            if want == 0:  # same row/column: only the two jitters apart
                assert d[:, axis].abs().max() <= 2 * jit + 0.35
            else:  # one grid step in the label's direction, give or take the jitters
                assert (torch.sign(d[:, axis]) == want).all(), (k, axis)
                assert d[:, axis].abs().min() >= step - 2 * jit - 0.35
                assert d[:, axis].abs().max() <= step + 2 * jit + 0.35
    # the gap: a neighbour never overlaps its centre (patch side P/scale source pixels)
    gap_px = (c[:, 1:] - c[:, :1]).abs().amax(2) - args.crop_size / scale  # [n, 8]
    assert gap_px.min() >= (args.gap - 2 * args.jitter) / scale - 0.35


def test_default_grid_is_what_grid_says():
    args = argparse.Namespace(image_size=32, canvas=None, crop_size=None, gap=None, jitter=None)
    context.set_geometry(args)
    # jitter: the paper's 7 px per 96 px patch (7%), at least one canvas pixel
    assert (args.canvas, args.crop_size, args.gap, args.jitter) == (96, 16, 8, 1)
    own = argparse.Namespace(image_size=32, canvas=None, crop_size=20, gap=None, jitter=None)
    context.set_geometry(own)  # a patch side of the user's: the paper's half-patch gap
    assert (own.canvas, own.crop_size, own.gap, own.jitter) == (96, 20, 10, 1)
    big = argparse.Namespace(image_size=224, canvas=None, crop_size=None, gap=None, jitter=None)
    context.set_geometry(big)
    assert (big.canvas, big.crop_size, big.gap, big.jitter) == (224, 47, 23, 3)  # 7/96 of 47


@pytest.mark.parametrize("grid, leaks", [(GRID, False), ((96, 20, 10, 3), True)])
def test_jpeg_block_phase_says_nothing_about_the_label(grid, leaks):
    # JPEG's 8x8 blocks: a neighbour's offset from its centre modulo 8 source px is visible in
    # the pixels. With the default grid its distribution is the same for every label; with the
    # old 20/10 grid (10 px apart) it told the direction (caught here, so the test can fail).
    canvas, p, gap, jit = (
        (grid.canvas, grid.crop_size, grid.gap, grid.jitter) if not leaks else grid
    )
    boxes = context.sample_grid(20000, 32, canvas, p, gap, jit, torch.Generator().manual_seed(0))
    corner = boxes[..., :2] * canvas / 32  # [n, 9, 2] in canvas px (integers)
    phase = torch.round(corner[:, 1:] - corner[:, :1]).long() * 32 // canvas % 8  # [n, 8, 2]
    hists = [
        torch.bincount(phase[:, k].flatten(), minlength=8) / (2 * len(phase)) for k in range(8)
    ]
    spread = max((h - hists[0]).abs().max().item() for h in hists)
    assert (spread > 0.2) == leaks, spread


def test_grid_fits_the_image_and_uses_the_jitter():
    for size, canvas, p, gap, jit in [
        (32, 96, 20, 10, 3),
        (224, 224, 47, 23, 7),
        (32, 64, 14, 7, 2),
    ]:
        boxes = context.sample_grid(
            4000, size, canvas, p, gap, jit, torch.Generator().manual_seed(1)
        )
        top, left, h, w = boxes.unbind(2)
        assert boxes.shape == (4000, 9, 4)
        assert top.min() >= 0 and left.min() >= 0
        assert (top + h).max() <= size + 1e-4 and (left + w).max() <= size + 1e-4
        assert torch.allclose(h, torch.full_like(h, p * size / canvas))
        # every patch jitters on its own: centre-to-neighbour offsets vary over the whole range
        off = torch.round((top[:, 2] - top[:, 0]) * canvas / size) + p + gap  # label 1: above
        assert off.min() == -2 * jit and off.max() == 2 * jit


def test_projection_removes_green_magenta_only():
    x = torch.rand(4, 3, 5, 5)
    y = context.project_green_magenta(x)
    b = torch.tensor([-1.0, 2.0, -1.0]).view(1, 3, 1, 1)
    assert (y * b).sum(1).abs().max() < 1e-5  # no component left along B
    grey = x[:, :1].expand(-1, 3, -1, -1)
    assert torch.allclose(context.project_green_magenta(grey), grey, atol=1e-6)
    assert torch.allclose(context.project_green_magenta(y), y, atol=1e-6)  # a projection


def test_colour_dropping_keeps_one_channel():
    x = torch.randn(64, 3, 8, 8)
    y = context.drop_colours(x, torch.Generator().manual_seed(0))
    kept = (y == x).flatten(2).all(2)  # [64, 3]
    assert (kept.sum(1) == 1).all()  # exactly one channel survives per patch
    assert len(set(kept.float().argmax(1).tolist())) == 3  # which one is random
    noise = y[~kept]  # [128, 8, 8]: the dropped ones are small noise (1/100 of the std)
    assert 0 < noise.std() < 0.05 and abs(noise.mean()) < 0.01


def test_siamese_pairs_centre_with_each_neighbour_in_label_order():
    class MeanFeatures(nn.Module):  # "features" = a patch's mean value per channel
        feat_dim = 3

        def forward(self, x):
            return x.mean((2, 3))

    model = context.ContextNet(MeanFeatures())
    seen = {}
    model.head.register_forward_hook(lambda m, inp, out: seen.update(fc=inp[0], fn=inp[1]))
    patches = torch.arange(2 * 9, dtype=torch.float32).view(2, 9, 1, 1, 1).expand(2, 9, 3, 4, 4)
    logits = model(patches)
    assert logits.shape == (16, 8)
    # pair i * 8 + k: image i's centre (patch 0) and its neighbour k (patch k + 1), label k
    assert seen["fc"][:, 0].tolist() == [0.0] * 8 + [9.0] * 8
    assert seen["fn"][:, 0].tolist() == [float(i * 9 + k + 1) for i in range(2) for k in range(8)]
    assert context.pair_labels(2, "cpu").tolist() == list(range(8)) * 2


# ----------------------------------------------------------------------------- end to end
def run_context(cifar_tar, out, *extra):
    args = context.get_args_parser().parse_args(
        ["--preset", "tiny", "--data", cifar_tar, "--out", str(out), "--device", "cpu", *extra]
    )
    return context.main(apply_preset(args, context.PRESETS))


@pytest.fixture(scope="module")
def tiny_run(cifar_tar, tmp_path_factory):
    out = tmp_path_factory.mktemp("context_tiny")
    return out, run_context(cifar_tar, out)


def test_tiny_run_beats_chance_and_writes_checkpoint(tiny_run):
    out, res = tiny_run
    print(res)
    assert res["pretext_top1"] > 15.5  # chance is 12.5%; 16,000 test pairs: +-0.3%
    assert 10 < res["knn_top1"] <= 100
    state = load_checkpoint(out)
    assert state["method"] == "context" and state["step"] == res["steps"]
    cfg = state["config"]
    assert (cfg["canvas"], cfg["crop_size"], cfg["gap"], cfg["jitter"]) == (96, 16, 8, 1)
    assert cfg["stem"] == "cifar" and cfg["image_size"] == 32 and cfg["input"] == "rgb_project"
    lines = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert lines[-1]["result"] == res and any("train_top1" in x for x in lines)


def test_linear_probe_evaluates_the_checkpoint(tiny_run):
    out, _ = tiny_run
    probe = ["--limit-train", "2000", "--epochs", "5", "--lrs", "0.1", "--wds", "0"]
    res = linear_probe.main(linear_probe.get_args_parser().parse_args([str(out), *probe]))
    assert res["method"] == "context" and 10 < res["linear_top1"] <= 100


@pytest.fixture(scope="module")
def nette_run(nette_tar, tmp_path_factory):
    """Context prediction where it learns features: Imagenette on a 96 px canvas (20 px
    patches), 3 epochs of its 9,469 train images. At 32 px the pair task stays below the
    untrained trunk (docs/findings.md), so a CIFAR-10 run cannot show a margin."""
    out = tmp_path_factory.mktemp("context_nette")
    argv = ["--preset", "cpu", "--epochs", "3", "--canvas", "96", "--data", nette_tar]
    argv += ["--out", str(out), "--device", "cpu", "--pretext-test", "1000"]
    # The end-of-run k-NN runs at the native 224 px (the CIFAR stem keeps full resolution):
    # a small bank and test set keep it to about a minute.
    argv += ["--knn-bank", "500", "--limit-test", "500"]
    context.main(apply_preset(context.get_args_parser().parse_args(argv), context.PRESETS))
    return out


# The probe: 6,000 train and 3,000 test images (with 2,000 and 1,000 the same run probed at
# 38.1 / 30.3 on CI and 43.1 / 32.9 here, linear / k-NN), against the mean of three untrained networks (seeds 0,
# 1, 2: linear 39.9 / 41.6 / 38.7, k-NN 31.9 / 31.3 / 27.9; a random trunk's quality depends
# on its seed). Measured 2026-12-05 on the 2-core machine, three pre-training seeds of this
# run: linear 48.9 / 49.8 / 48.7 against 40.1 (+8.6 at least), k-NN 35.9 / 37.7 / 36.1 against
# 30.4 (+5.5 at least). An untrained trunk in the trained one's place fails both.
MARGIN_LINEAR, MARGIN_KNN = 4.0, 2.5


@pytest.mark.slow
def test_probe_beats_the_untrained_network(nette_run, monkeypatch):
    """Probed at the canvas' scale (224 px -> 96 px), as it trained, with the green-magenta
    projection it trained on, the trunk beats the same network untrained (same input, same
    probe) by the margins: fails when nothing is learned."""
    trained, rand = probe_vs_untrained(
        nette_run,
        monkeypatch,
        "--upsample",
        "0.4286",
        untrained_seeds=(0, 1, 2),
        num_train=6000,
        num_test=3000,
    )
    assert trained["method"] == "context" and trained["num_test"] == 3000
    why = f"trained {_top1(trained)} vs untrained {_top1(rand)} (linear, k-NN)"
    assert trained["linear_top1"] > rand["linear_top1"] + MARGIN_LINEAR, why
    assert trained["knn_top1"] > rand["knn_top1"] + MARGIN_KNN, why


def test_resume_continues_exactly(cifar_tar, tmp_path):
    short = ["--limit-train", "256", "--knn-bank", "256", "--pretext-test", "100", "--epochs", "2"]
    run_context(cifar_tar, tmp_path / "full", *short)
    run_context(cifar_tar, tmp_path / "part", *short, "--max-steps", "13")
    assert load_checkpoint(tmp_path / "part")["step"] == 13
    res = run_context(cifar_tar, tmp_path / "part", *short, "--resume")
    assert res["steps"] == 32
    a = load_checkpoint(tmp_path / "full")
    b = load_checkpoint(tmp_path / "part")
    for part in ("backbone", "head"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)


@pytest.mark.parametrize(
    "argv,msg",
    [
        (["--crop-size", "30"], "do not fit a canvas of 96"),
        (["--gap", "-1"], "do not fit"),
        (["--pretext-test", "0"], "--pretext-test must be > 0"),
    ],
)
def test_bad_grid_stops_with_one_clear_message(cifar_tar, tmp_path, argv, msg):
    cmd = [sys.executable, "context.py", "--preset", "tiny", "--data", cifar_tar]
    cmd += ["--out", str(tmp_path), "--device", "cpu", *argv]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and msg in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "checkpoint.pt").exists()


# ------------------------------------------------------ shortcuts: noise images, one patch
def noise_folder(root, ramp: float):
    """An ImageFolder of 32x32 uniform-noise JPEGs, plus a top-to-bottom brightness ramp of
    `ramp` grey levels: without it no content says where a patch sat, only low-level artefacts
    could (JPEG block phase, image borders, resampling); with it one patch tells its row."""
    from PIL import Image

    gen = np.random.default_rng(0)
    ramp_px = np.linspace(-ramp / 2, ramp / 2, 32).reshape(32, 1, 1)
    for split, n in (("train", 384), ("test", 125)):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                noise = gen.uniform(64, 192, (32, 32, 3)) + ramp_px
                img = Image.fromarray(noise.clip(0, 255).astype(np.uint8))
                img.save(root / split / c / f"{i}.jpg", quality=75)
    return str(root)


@pytest.mark.parametrize(
    "ramp, extra, leaks",
    [
        (0, [], False),  # the pair: no JPEG phase or border shortcut on the default grid
        (0, ["--neighbour-only"], False),  # one patch alone: its place in the image does not show
        (120, ["--neighbour-only"], True),  # control: a ramp tells one patch its row
    ],
)
def test_position_cannot_be_read_without_content(tmp_path, ramp, extra, leaks):
    """Neighbour-only ablation on noise: the default pipeline stays at chance with both patches
    and with the neighbour alone; the control (a brightness ramp, content that does tell a
    patch's row) shows this training budget finds a cue when one exists."""
    data = noise_folder(tmp_path / "data", ramp)
    short = ["--limit-train", "768", "--knn-bank", "256", "--pretext-test", "250", "--epochs", "4"]
    res = run_context(data, tmp_path / "run", *short, *extra)
    print(ramp, extra, res["pretext_top1"])
    # 2,000 test pairs: chance 12.5% +- 0.74% (one std); a row cue alone gives up to 3/8
    assert (res["pretext_top1"] > 20.0) if leaks else (res["pretext_top1"] < 15.5)
