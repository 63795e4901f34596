"""SimCLR's pretext performance (how often the positive is the top match among the 2N - 1) and the
InfoNCE bound log(2N - 1) - L in its log lines."""

import copy
import json
import math

import pytest
import torch

import simclr
from common.checkpoint import load_checkpoint
from common.cli import apply_preset

# A 16-step run (the tiny preset) found the positive among the 2N - 1 = 255 for 3.0% of the
# test anchors, the untrained network 1.25% (chance 0.39%); a point is 38 of the 3,840 anchors.
MARGIN = 0.75


def brute_force_hits(z1: torch.Tensor, z2: torch.Tensor) -> int:
    """An independent reference: Python loops over the anchors and candidates (cosine)."""
    rows = [v.tolist() for v in torch.cat([z1, z2])]
    n = len(z1)

    def cos(a, b):
        dot = sum(x * y for x, y in zip(a, b))
        return dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))

    hits = 0
    for i, a in enumerate(rows):
        scores = [(cos(a, b), j) for j, b in enumerate(rows) if j != i]
        best = max(scores)[1]
        hits += best == (i + n) % (2 * n)
    return hits


def test_positive_hits_matches_a_brute_force_reference():
    g = torch.Generator().manual_seed(0)
    seen = set()
    for n, d in ((1, 3), (2, 4), (7, 5), (24, 8), (40, 16)):
        z1 = torch.randn(n, d, generator=g)
        z2 = torch.randn(n, d, generator=g)
        z2[: n // 2] = z1[: n // 2] + 0.5 * torch.randn(n // 2, d, generator=g)  # some close
        got = simclr.positive_hits(z1, z2)
        assert got == brute_force_hits(z1, z2), (n, d)
        # Cosine: the scale of each embedding does not matter.
        assert simclr.positive_hits(3 * z1, z2 * torch.rand(n, 1, generator=g) + 0) == got
        seen.add(0 < got < 2 * n)
    assert True in seen  # the cases were not all trivial (all or none found)
    assert simclr.positive_hits(*torch.randn(2, 1, 4)) == 2  # n = 1: the only candidate
    z = torch.randn(10, 6, generator=g)
    assert simclr.positive_hits(z, z.clone()) == 20  # identical views: all found


@pytest.mark.slow  # its own tiny SimCLR run (~1 min); .ci/run runs it
def test_tiny_run_logs_the_bound_and_beats_untrained_on_the_pretext(
    cifar_tar, tmp_path, monkeypatch
):
    """The result line carries pretext_top1; the trained network finds the positive clearly
    more often than the same architecture untrained, on the same views; every log line's
    infonce_bound is log(2N - 1) - loss / 2 (the loss is loss_a + loss_b)."""
    seen = {}
    real = simclr.pretext_top1

    def spy(model, images, aug, batch, device, seed):
        seen.update(model=model, call=(images, aug, batch, device, seed))
        return real(model, images, aug, batch, device, seed)

    monkeypatch.setattr(simclr, "pretext_top1", spy)
    args = simclr.get_args_parser().parse_args(
        ["--preset", "tiny", "--data", cifar_tar, "--out", str(tmp_path), "--device", "cpu"]
        + ["--limit-test", "2000"]
    )
    res = simclr.main(apply_preset(args, simclr.PRESETS))
    untrained = copy.deepcopy(seen["model"])
    torch.manual_seed(0)
    for m in untrained.modules():  # default init, BN running statistics reset too
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    rand = real(untrained, *seen["call"])
    print("simclr tiny pretext_top1", res["pretext_top1"], "untrained", rand)
    assert res["pretext_top1"] > rand + MARGIN
    assert real(seen["model"], *seen["call"]) == res["pretext_top1"]  # the same views again
    n = load_checkpoint(tmp_path)["config"]["batch_size"]
    assert 100 / (2 * n - 1) < res["pretext_top1"] <= 100
    lines = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert lines[-1]["result"]["pretext_top1"] == res["pretext_top1"]
    steps = [x for x in lines if "loss" in x]
    assert len(steps) >= 2
    for x in steps:
        assert math.isclose(x["infonce_bound"], math.log(2 * n - 1) - x["loss"] / 2)
    assert steps[-1]["infonce_bound"] > steps[0]["infonce_bound"]  # it learns
