"""--time-budget (the step count set from the measured step time) and the `fast` preset: the run
ends on time, its schedule ends where the budget does, and resuming stays bit-exact."""

import pytest
import torch

import simclr
from common.checkpoint import load_checkpoint
from common.train import BUDGET_PROBE, apply_preset, lr_at


def run(cifar_tar, out, *extra, preset="tiny"):
    argv = ["--preset", preset, "--data", cifar_tar, "--out", str(out), "--device", "cpu"]
    argv += ["--limit-test", "500", "--knn-bank", "500", *extra]
    return simclr.main(apply_preset(simclr.get_args_parser().parse_args(argv), simclr.PRESETS))


def test_budget_ends_on_time_with_the_schedule(cifar_tar, tmp_path):
    budget_min = 0.4
    res = run(cifar_tar, tmp_path, "--time-budget", str(budget_min), "--warmup-epochs", "2")
    assert res["train_minutes"] == pytest.approx(budget_min, rel=0.1)
    state = load_checkpoint(tmp_path)
    sched = state["scheduler"]
    # The cosine schedule was set for exactly the steps that ran: it ends at lr 0.
    assert state["step"] == res["steps"] == sched["total"] > BUDGET_PROBE
    assert lr_at(sched["total"] - 1, sched["total"], sched["warmup"], sched["peak_lr"]) < (
        0.01 * sched["peak_lr"]
    )
    assert res["epochs"] == round(res["steps"] / (1024 // 128), 2)  # fractional epochs


def test_a_budget_run_resumes_with_the_step_count_it_settled_on(cifar_tar, tmp_path):
    res = run(cifar_tar, tmp_path, "--time-budget", "5", "--max-steps", str(BUDGET_PROBE + 2))
    assert res["stopped"] == "max_steps"
    settled = load_checkpoint(tmp_path)["scheduler"]["total"]
    assert settled > BUDGET_PROBE + 2  # 5 minutes of tiny steps
    # Resumed under other load, it must not re-time itself: same schedule, same end.
    res = run(cifar_tar, tmp_path, "--time-budget", "5", "--max-steps", str(BUDGET_PROBE + 4))
    assert load_checkpoint(tmp_path)["scheduler"]["total"] == settled


def test_fast_preset_resumes_bit_exactly(cifar_tar, tmp_path):
    small = ["--width", "8", "--limit-train", "1024", "--batch-size", "128", "--epochs", "2"]
    small += ["--crop-size", "24"]
    run(cifar_tar, tmp_path / "full", *small, preset="fast")
    run(cifar_tar, tmp_path / "part", *small, "--max-steps", "5", preset="fast")
    run(cifar_tar, tmp_path / "part", *small, preset="fast")
    a = load_checkpoint(tmp_path / "full")
    b = load_checkpoint(tmp_path / "part")
    assert a["config"]["preset"] == "fast" and a["step"] == b["step"] == 16
    for k in a["backbone"]:
        assert torch.equal(a["backbone"][k], b["backbone"][k]), k
