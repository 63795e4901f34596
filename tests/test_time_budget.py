"""--time-budget (the step count set from the measured step time, re-fitted under changing
load) and the `fast` preset: the run ends on time, its schedule ends at lr 0 on the last step,
and resuming stays bit-exact. Time is an injected clock (common.train.clock): no test here
depends on how loaded the machine is."""

import math

import pytest
import torch

import simclr
from common import train
from common.checkpoint import load_checkpoint
from common.train import BUDGET_PROBE, TrainRun, apply_preset


def run(cifar_tar, out, *extra, preset="tiny"):
    argv = ["--preset", preset, "--data", cifar_tar, "--out", str(out), "--device", "cpu"]
    argv += ["--limit-test", "500", "--knn-bank", "500", *extra]
    return simclr.main(apply_preset(simclr.get_args_parser().parse_args(argv), simclr.PRESETS))


class FakeClock:
    """common.train.clock: stands still inside a step, advances by the step time between."""

    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def budget_run(tmp_path, budget_min, resume=False, **over) -> TrainRun:
    """A TrainRun on a 1-parameter model (no data, no network): the loop's bookkeeping only."""
    args = simclr.get_args_parser().parse_args(["--preset", "tiny", "--out", str(tmp_path)])
    args = apply_preset(args, simclr.PRESETS)
    args.device, args.time_budget, args.log_every = "cpu", budget_min, 10**9
    args.epochs, args.warmup_epochs = 1000, 2
    vars(args).update(over)
    w = torch.nn.Parameter(torch.ones(1))
    opt = torch.optim.SGD([w], lr=0.1)
    return TrainRun(
        args,
        tmp_path,
        "simclr",
        backbone=torch.nn.Linear(1, 1),
        head=None,
        optimizer=opt,
        steps_per_epoch=8,
        peak_lr=1.0,
    )


def drive(run: TrainRun, clock: FakeClock, step_time, max_steps=10**6) -> list[float]:
    """Run the loop: each step takes step_time(clock seconds so far) on the fake clock."""
    opt, lrs = run.optimizer, []
    while run.step < run.total and not run.stopped and len(lrs) < max_steps:
        lrs.append(run.set_lr(opt))
        clock.t += step_time(clock.t - run.t0)
        run.step_done(torch.tensor(1.0))
    return lrs


@pytest.mark.parametrize("slow,fast", [(2.0, 0.25), (0.25, 1.0)])
def test_budget_ends_on_time_when_the_load_changes(tmp_path, monkeypatch, slow, fast):
    """The first third of the budget runs at `slow` s/step, the rest at `fast` s/step (load
    going away, or arriving): the run still ends within 5% of the budget, and the cosine,
    re-fitted on the way, is continuous and ends at lr 0 on the last step."""
    clock = FakeClock()
    monkeypatch.setattr(train, "clock", clock)
    budget_s = 600.0
    run = budget_run(tmp_path, budget_s / 60)
    lrs = drive(run, clock, lambda t: slow if t < budget_s / 3 else fast)
    run.finish()
    assert clock.t - run.t0 == pytest.approx(budget_s, rel=0.05)
    # a budget settled once (at the first phase's speed) would have run budget/slow steps
    assert abs(run.step - budget_s / slow) > 0.4 * budget_s / slow
    assert run.step == run.total == len(lrs) == load_checkpoint(tmp_path)["step"]
    assert lrs[-1] == 0.0 and max(lrs) == pytest.approx(1.0, rel=1e-6)
    # warm-up then a monotone decay: no jump up at a re-fit
    peak = lrs.index(max(lrs))
    decay = lrs[peak:]
    assert all(b <= a + 1e-12 for a, b in zip(decay, decay[1:]))
    # and no jump down: the largest drop is that of a cosine over the steps at hand
    biggest = max(a - b for a, b in zip(decay, decay[1:]))
    assert biggest < 4 * math.pi / len(decay)


def test_a_budget_spent_during_the_probe_ends_the_run(tmp_path, monkeypatch):
    """A budget shorter than the timed probe steps: the run ends right after them instead of
    each re-fit adding the one more step the schedule's lr 0 lands on (that ran forever)."""
    clock = FakeClock()
    monkeypatch.setattr(train, "clock", clock)
    run = budget_run(tmp_path, 0.001)  # 0.06 s of budget, 1 s per step
    lrs = drive(run, clock, lambda t: 1.0, max_steps=1000)
    assert run.step == run.total <= BUDGET_PROBE + 2 and len(lrs) < 1000
    assert lrs[-1] == 0.0 or run.step == BUDGET_PROBE + 1


def test_a_resumed_budget_run_keeps_what_it_settled(tmp_path, monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(train, "clock", clock)
    run = budget_run(tmp_path, 10.0, max_steps=200)
    drive(run, clock, lambda t: 1.0)
    assert run.stopped == "max_steps" and run.step == 200
    settled = [run.lr_at_step(s) for s in range(200, run.total)]
    run.finish()
    sched = load_checkpoint(tmp_path)["scheduler"]
    assert sched["fitted"] and sched["total"] == pytest.approx(600, abs=2)
    # Resumed under 4x the load: the same schedule, step for step, no re-timing.
    again = budget_run(tmp_path, 10.0, max_steps=sched["total"] + 10)
    assert again.step == 200 and again.total == sched["total"]
    rest = drive(again, clock, lambda t: 4.0)
    assert rest == settled and rest[-1] == 0.0 and again.total == sched["total"]


def test_a_real_budget_run_ends_with_its_schedule(cifar_tar, tmp_path):
    """simclr.py end to end with --time-budget (wall time, so only the schedule is checked)."""
    res = run(cifar_tar, tmp_path, "--time-budget", "0.1", "--warmup-epochs", "1")
    state = load_checkpoint(tmp_path)
    sched = state["scheduler"]
    assert state["step"] == res["steps"] == sched["total"] > BUDGET_PROBE
    assert sched["fitted"] and res["epochs"] == round(res["steps"] / (1024 // 128), 2)


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
