"""rotnet.py: the rotation labels, the augmentation, and the tiny preset end to end on CPU
(rotation accuracy above chance, the linear probe on an intermediate stage, exact resume)."""

import json

import numpy as np
import pytest
import torch

import rotnet
from common.checkpoint import load_checkpoint
from common.cli import ConfigError, apply_preset
from conftest import probe_vs_untrained
from conftest import quick_probe as probe


def run_rotnet(cifar_tar, out, *extra):
    args = rotnet.get_args_parser().parse_args(
        ["--preset", "tiny", "--data", cifar_tar, "--out", str(out), "--device", "cpu"]
        + ["--limit-test", "1000", *extra]
    )
    return rotnet.main(apply_preset(args, rotnet.PRESETS))


def test_rotations_are_exact_quarter_turns():
    x = torch.randn(3, 2, 5, 5)
    rots, labels = rotnet.rotate_batch(x)
    assert rots.shape == (12, 2, 5, 5) and labels.tolist() == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3
    for k in range(4):
        # numpy's rot90 over (H, W): k quarter turns counter-clockwise, independently computed
        want = torch.from_numpy(np.rot90(x.numpy(), k, axes=(2, 3)).copy())
        assert torch.equal(rots[labels == k], want)
    # Counter-clockwise on a labelled 2x2 image: [[a, b], [c, d]] -> [[b, d], [a, c]].
    img = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 1, 2, 2)
    r, _ = rotnet.rotate_batch(img)
    assert r[1, 0].tolist() == [[2.0, 4.0], [1.0, 3.0]]
    assert r[2, 0].tolist() == [[4.0, 3.0], [2.0, 1.0]]
    assert r[3, 0].tolist() == [[3.0, 1.0], [4.0, 2.0]]
    # Rotations are pixel permutations (nothing interpolated) and four turns are the identity.
    assert torch.equal(rots[labels == 1].flatten(1).sort(1).values, x.flatten(1).sort(1).values)
    assert torch.equal(torch.rot90(rots[labels == 3], 1, dims=(2, 3)), x)
    with pytest.raises(ValueError, match="square"):
        rotnet.rotate_batch(torch.zeros(1, 3, 4, 5))


def test_crop_flip_is_an_exact_padded_crop():
    x = torch.rand(16, 3, 8, 8)
    gen = torch.Generator().manual_seed(0)
    out, p = rotnet.crop_flip(x, 8, 2, gen)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for b in range(16):
        top, left = p["boxes"][b, :2].tolist()
        want = padded[b, :, top : top + 8, left : left + 8]
        want = want.flip(-1) if p["flip"][b] else want
        assert torch.allclose(out[b], want, atol=1e-6), b
    assert 0 < p["flip"].sum() < 16 and len(set(p["boxes"][:, 0].tolist())) > 1


@pytest.fixture(scope="module")
def tiny_run(cifar_tar, tmp_path_factory):
    out = tmp_path_factory.mktemp("rotnet")
    return out, run_rotnet(cifar_tar, out)


def test_tiny_run_beats_chance(tiny_run):
    out, res = tiny_run
    state = load_checkpoint(out / "checkpoint.pt")
    assert state["method"] == "rotnet" and state["step"] == res["steps"] > 0
    assert state["config"]["image_size"] == 32 and state["config"]["stem"] == "cifar"
    assert state["head"]["weight"].shape == (4, state["config"]["width"] * 8)
    lines = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    steps = [x for x in lines if "loss" in x]
    assert {"step", "loss", "lr", "train_top1", "img_per_s"} <= steps[0].keys()
    assert [x for x in lines if "pretext_top1" in x][-1]["pretext_top1"] == res["pretext_top1"]
    assert lines[-1]["result"] == res and 10 < res["knn_top1"] < 100
    print("rotnet tiny", res)
    assert res["pretext_top1"] > 40  # chance is 25%


def test_linear_probe_on_stage_2(tiny_run, monkeypatch):
    out, _ = tiny_run
    res = probe(out, monkeypatch, "--layer", "2")  # RotNet's best features are mid-network
    assert res["method"] == "rotnet" and res["layer"] == 2 and res["num_test"] == 1000
    assert 10 < res["linear_top1"] <= 100 and 10 < res["knn_top1"] <= 100  # above chance (10%)


@pytest.fixture(scope="module")
def learned_run(cifar_tar, tmp_path_factory):
    """Long enough to beat the untrained trunk: 256 steps on 4,096 images. The tiny preset's 64
    steps do not (quick probe, k-NN: stage 2 24.0 trained vs 26.7 untrained, last stage 24.3 vs
    24.1)."""
    out = tmp_path_factory.mktemp("rotnet_learned")
    return out, run_rotnet(cifar_tar, out, "--limit-train", "4096")


# Measured on that run (2026-12-05, 2-core machine shared with four other engineers' jobs), on
# the probe's 1,000 test images (1 point = 10 images, the same for both networks): last stage
# linear 31.8 trained vs 27.8 untrained (+4.0), k-NN 28.1 vs 24.1 (+4.0); stage 2, the paper's
# best block, is not yet ahead at this length (linear +2.1, k-NN -0.5), so the last is tested.
MARGIN = 1.5


@pytest.mark.slow
def test_probe_beats_the_untrained_network(learned_run, monkeypatch):
    """Linear probe and k-NN on the trained trunk beat the same trunk untrained (same stage,
    same input, same probe) by MARGIN points: fails when nothing is learned."""
    trained, rand = probe_vs_untrained(learned_run[0], monkeypatch)
    assert trained["method"] == "rotnet" and trained["num_test"] == 1000
    assert trained["linear_top1"] > rand["linear_top1"] + MARGIN
    assert trained["knn_top1"] > rand["knn_top1"] + MARGIN


def test_resume_continues_exactly(cifar_tar, tmp_path):
    # 256 images: 8 steps per epoch. Both runs stop at step 12 (before the final evaluation):
    # one straight, one stopped at 5 and resumed across the epoch boundary.
    small = ("--limit-train", "256")
    run_rotnet(cifar_tar, tmp_path / "full", *small, "--max-steps", "12")
    run_rotnet(cifar_tar, tmp_path / "part", *small, "--max-steps", "5")
    assert load_checkpoint(tmp_path / "part")["step"] == 5
    run_rotnet(cifar_tar, tmp_path / "part", *small, "--resume", "--max-steps", "12")
    a, b = load_checkpoint(tmp_path / "full"), load_checkpoint(tmp_path / "part")
    assert a["step"] == b["step"] == 12
    for part in ("backbone", "head"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    for i, s in a["optimizer"]["state"].items():  # momentum buffers too
        assert torch.equal(s["momentum_buffer"], b["optimizer"]["state"][i]["momentum_buffer"])


def test_bad_crop_is_a_config_error(cifar_tar, tmp_path):
    with pytest.raises(ConfigError, match="--crop-size 64"):
        run_rotnet(cifar_tar, tmp_path, "--crop-size", "64", "--pad", "4")
