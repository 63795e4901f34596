"""common/schedule.py: the warm-up + cosine curve, and --time-budget (the step count set from the
measured step time, re-fitted under changing load) with the `fast` preset: the run ends on
time, its schedule ends at lr 0 on the last step, and resuming stays bit-exact. Time is an
injected clock (common.train.clock, or `now` given to LrSchedule): no test here depends on how
loaded the machine is."""

import math

import pytest
import torch

import simclr
from common import train
from common.checkpoint import load_checkpoint
from common.cli import apply_preset
from common.schedule import BUDGET_PROBE, BUDGET_WARM, LrSchedule, lr_at
from common.train import TrainRun
from conftest import bookkeeping_run


# ------------------------------------------------------------------------------ the curve
def test_lr_at_is_linear_warmup_then_half_cosine_to_zero():
    peak, warmup, total = 2.0, 10, 110
    assert [lr_at(s, total, warmup, peak) for s in (0, 4, 9)] == [0.2, 1.0, 2.0]
    for s in range(warmup, total + 5):  # the cosine, independently written
        t = min(1.0, (s - warmup) / (total - warmup))
        assert lr_at(s, total, warmup, peak) == pytest.approx(
            peak * (1 + math.cos(math.pi * t)) / 2
        )
    assert lr_at(total, total, warmup, peak) == 0.0
    assert lr_at(0, 5, 0, 1.0) == 1.0  # no warm-up: the peak at once


def test_an_unbudgeted_schedule_is_lr_at_and_saves_what_resumes_it():
    sched = LrSchedule(0.5, warmup=3, total=40)
    assert [sched.lr(s) for s in range(45)] == [lr_at(s, 40, 3, 0.5) for s in range(45)]
    assert sched.state_dict() == {"kind": "warmup_cosine", "peak_lr": 0.5, "warmup": 3, "total": 40}
    assert not sched.refit_due(1e9)
    assert sched.observe(20, now=5.0, t0=0.0, refit=True) is None  # nothing to fit
    assert sched.total == 40


def test_a_budget_is_fitted_from_the_timed_steps():
    """1 s per step after the first steps, a 10-minute budget: about 600 steps, fitted at
    BUDGET_PROBE from the steps timed since BUDGET_WARM; every rank takes `agree`'s count."""
    sched = LrSchedule(1.0, warmup=4, total=10**6, budget_min=10.0)
    agreed = []

    def agree(total):  # rank 0's count, as a broadcast would hand it to every rank
        agreed.append(total)
        return total

    for step in range(1, BUDGET_PROBE + 1):  # step k finished at time k (training began at 0)
        per_step = sched.observe(step, now=float(step), t0=0.0, refit=False, agree=agree)
    assert per_step == pytest.approx(1.0) and sched.fitted
    assert sched.total == agreed[-1] == BUDGET_PROBE + int((600 - BUDGET_PROBE) / 1.0)
    assert BUDGET_WARM < BUDGET_PROBE
    state = sched.state_dict()
    resumed = LrSchedule(1.0, warmup=4, total=10**6, budget_min=10.0)
    resumed.load_state_dict(state, step=BUDGET_PROBE)
    assert resumed.total == sched.total and resumed.fitted_on_resume
    assert [resumed.lr(s) for s in range(sched.total)] == [sched.lr(s) for s in range(sched.total)]
    assert sched.lr(sched.total - 1) == 0.0


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
    """A --time-budget TrainRun (conftest.bookkeeping_run)."""
    args = simclr.get_args_parser().parse_args(["--preset", "tiny", "--out", str(tmp_path)])
    args = apply_preset(args, simclr.PRESETS)
    args.device, args.time_budget, args.log_every = "cpu", budget_min, 10**9
    args.epochs, args.warmup_epochs = 1000, 2
    vars(args).update(over)
    return bookkeeping_run(args, tmp_path, steps_per_epoch=8)


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
    settled = [run.schedule.lr(s) for s in range(200, run.total)]
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
