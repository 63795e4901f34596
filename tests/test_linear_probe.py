"""linear_probe.py and common/eval.py without a trained model: weighted k-NN against a
brute-force reference, unlabelled images (label < 0) left out of banks and splits, and every bad
flag or checkpoint refused with exit code 2 and one line `error: ...` before any work."""

import argparse
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

import linear_probe
from common.data import ImageSet
from common.eval import extract_features, knn_predict
from conftest import ROOT


def knn_reference(bank, labels, queries, num_classes, k, t):
    """Weighted k-NN written out per query in numpy: cosine similarity, the k most similar bank
    rows vote for their class with weight exp(sim / t)."""
    bank = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    out = []
    for q in queries / np.linalg.norm(queries, axis=1, keepdims=True):
        sim = bank @ q
        top = np.argsort(-sim)[:k]
        votes = np.zeros(num_classes)
        for i in top:
            votes[labels[i]] += math.exp(sim[i] / t)
        out.append(int(votes.argmax()))
    return np.array(out)


def test_knn_ignores_unlabelled_bank_entries():
    g = torch.Generator().manual_seed(0)
    bank = torch.randn(300, 16, generator=g)
    labels = torch.randint(0, 5, (300,), generator=g)
    labels[torch.randperm(300, generator=g)[:120]] = -1  # 120 unlabelled rows, scattered
    queries = torch.randn(50, 16, generator=g)
    keep = (labels >= 0).numpy()
    for k in (1, 20, 180, 500):  # 500: more neighbours than labelled rows (180)
        got = knn_predict(bank, labels, queries, 5, k=k, temperature=0.1, chunk=16)
        want = knn_reference(bank.numpy()[keep], labels.numpy()[keep], queries.numpy(), 5, k, 0.1)
        assert np.array_equal(got.numpy(), want), k
    with pytest.raises(ValueError, match="no labelled sample"):
        knn_predict(bank, torch.full((300,), -1), queries, 5)
    with pytest.raises(ValueError, match="k >= 1"):
        knn_predict(bank, labels, queries, 5, k=0)


class MeanColour(torch.nn.Module):
    """A stand-in backbone: the mean of each input channel, [B, 3, H, W] -> [B, 3]."""

    def forward(self, x):
        return x.mean((2, 3))


def test_extract_features_skips_unlabelled_images():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (30, 8, 8, 3), dtype=torch.uint8, generator=g)
    labels = torch.arange(30) % 3
    labels[::4] = -1
    data = ImageSet(images, labels, ["a", "b", "c"], (0.5,) * 3, (0.25,) * 3, "toy")
    keep = labels >= 0
    only = ImageSet(images[keep], labels[keep], data.classes, data.mean, data.std, "toy")
    cpu = torch.device("cpu")
    f, y = extract_features(MeanColour(), data, cpu, batch_size=7)
    f_ref, y_ref = extract_features(MeanColour(), only, cpu, batch_size=7)
    assert torch.equal(y, labels[keep]) and torch.equal(f, f_ref) and len(f) == keep.sum()
    f_all, y_all = extract_features(MeanColour(), data, cpu, labelled_only=False)
    assert len(f_all) == 30 and torch.equal(y_all, labels) and torch.equal(f_all[keep], f)


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if linear_probe reads a checkpoint or data: validation must come first."""

    def refuse(*a, **kw):
        raise AssertionError("work started before the flags were validated")

    monkeypatch.setattr(linear_probe, "load_checkpoint", refuse)
    monkeypatch.setattr(linear_probe, "load_split", refuse)


BAD_FLAGS = [
    (["--batch-size", "0"], "--batch-size must be > 0"),
    (["--limit-train", "0"], "--limit-train must be > 0"),
    (["--epochs", "0"], "--epochs must be > 0"),
    (["--knn-k", "0"], "--knn-k must be > 0"),
    (["--knn-k", "-5"], "--knn-k must be > 0"),
    (["--knn-t", "0"], "--knn-t must be in (0"),
    (["--knn-t", "-0.1"], "--knn-t must be in (0"),
    (["--knn-t", "nan"], "--knn-t must be in (0"),
    (["--lrs", "0.1", "-1"], "--lrs needs one or more finite values > 0"),
    (["--lrs", "0"], "--lrs needs one or more finite values > 0"),
    (["--lrs", "inf"], "--lrs needs one or more finite values > 0"),
    (["--wds", "0", "-0.0001"], "--wds needs one or more finite values >= 0"),
    (["--upsample", "0"], "--upsample must be in (0"),
    (["--upsample", "-2"], "--upsample must be in (0"),
    pytest.param(
        ["--device", "cuda"],
        "no CUDA device",
        marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present"),
    ),
]


@pytest.mark.parametrize("flags,msg", BAD_FLAGS)
def test_bad_flags_exit_2_before_any_work(flags, msg, no_work, capsys):
    assert linear_probe.cli(["runs/unused", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and msg in err and err.count("\n") == 1, err


def test_empty_sweeps_are_refused(no_work):
    # argparse itself refuses `--lrs` with no value; main() called in-process must too.
    args = vars(linear_probe.get_args_parser().parse_args(["runs/unused"]))
    for name in ("lrs", "wds"):
        with pytest.raises(ValueError, match=f"--{name} needs one or more"):
            linear_probe.main(argparse.Namespace(**{**args, name: []}))


def test_a_text_file_is_not_a_checkpoint(tmp_path, capsys):
    text = tmp_path / "notes.txt"
    text.write_text("epoch 1 loss 2.3\n")
    assert linear_probe.cli([str(text)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {text} is not a checkpoint: not a file written by torch.save " + (
        "(17 bytes, starting b'epoch 1 loss 2.3\\n')\n"
    )
    # The script itself: exit code 2, the same single line, no traceback.
    out = subprocess.run(
        [sys.executable, "linear_probe.py", str(text), "--no-save"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2 and out.stderr == err and "Traceback" not in out.stderr
