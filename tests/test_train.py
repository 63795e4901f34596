"""common/train.py: TrainRun's checkpoint cadence (on an injected clock), the logger's line and
its derived metrics, and compile_model's fallback. (Resume and preemption end to end:
test_failures.py; the time budget: test_schedule.py; one host sync per step: test_host_sync.py.)"""

import json

import pytest
import torch

import simclr
from common import train
from common.cli import apply_preset
from common.train import Logger, compile_model
from conftest import bookkeeping_run


# ------------------------------------------------ checkpoint cadence, on an injected clock
def _cadence(tmp_path, monkeypatch, steps_per_epoch, step_s, steps, *argv):
    """Clock times of the checkpoints a TrainRun writes over `steps` steps of `step_s` s each
    (a 1-parameter model: the loop's bookkeeping only; common.train.clock is the fake)."""
    t = [0.0]
    monkeypatch.setattr(train, "clock", lambda: t[0])
    saved = []
    monkeypatch.setattr(train.TrainRun, "_write_checkpoint", lambda self: saved.append(t[0]))
    args = simclr.get_args_parser().parse_args(["--out", str(tmp_path), *argv])
    args = apply_preset(args, simclr.PRESETS)
    args.device, args.epochs, args.log_every = "cpu", 10**6, 10**9
    run = bookkeeping_run(args, tmp_path, steps_per_epoch)
    for _ in range(steps):
        t[0] += step_s
        run.step_done(torch.tensor(1.0))
    return saved


def test_short_epochs_checkpoint_at_most_once_a_minute(tmp_path, monkeypatch):
    """8 GPUs at batch 512: a CIFAR epoch is 12 steps, ~1 s. The default per-epoch
    checkpoint must not run every second: at most one a minute, and never more than
    --ckpt-minutes (default 15) apart."""
    saved = _cadence(tmp_path, monkeypatch, 12, 0.125, 16_000)  # 2000 s, 1333 epochs of 1.5 s
    assert saved[0] == 1.5  # the first epoch's end
    gaps = [b - a for a, b in zip(saved, saved[1:])]
    assert min(gaps) >= 60 and max(gaps) <= 61.5  # once a minute: at the first epoch end after
    assert len(saved) == pytest.approx(2000 / 60, abs=2)


def test_long_epochs_checkpoint_every_ckpt_minutes(tmp_path, monkeypatch):
    """An epoch longer than --ckpt-minutes: the timed checkpoints bound what a crash loses."""
    saved = _cadence(tmp_path, monkeypatch, 10_000, 1.0, 2000, "--ckpt-minutes", "2")
    gaps = [b - a for a, b in zip([0.0, *saved], saved)]
    assert len(saved) == 16 and all(g == 120 for g in gaps)


def test_explicit_ckpt_every_is_obeyed(tmp_path, monkeypatch):
    saved = _cadence(tmp_path, monkeypatch, 12, 0.125, 100, "--ckpt-every", "10")
    assert saved == [1.25 * k for k in range(1, 11)]  # asked for, so not rate-limited


# --------------------------------------------------------------------------------- the logger
def test_a_log_line_has_loss_lr_img_per_s_eta_and_the_derived_metrics(tmp_path, capsys):
    """Every `every` steps (and on the last) one printed line and one JSON record, with the
    metrics derived from the line's own values (SimCLR's InfoNCE bound uses this hook)."""
    log = Logger(
        tmp_path, total_steps=10, every=4, derived_metrics=lambda m: {"half": m["loss"] / 2}
    )
    for step in range(1, 11):
        log.step(step, epoch=0, images_per_step=32, loss=float(step), lr=0.1)
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [4, 8, 10]
    for r in records:
        assert r["half"] == r["loss"] / 2 and r["lr"] == 0.1
        assert r["img_per_s"] > 0 and r["eta_s"] >= 0
    assert records[-1]["eta_s"] == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and lines[0].startswith("step 4/10 epoch 0 loss 4 lr 0.1 half 2 img/s")
    assert " eta 00:00:00" in lines[-1]


def test_derived_metrics_do_not_change_the_metrics_passed_in(tmp_path):
    metrics = {"loss": 1.0}
    Logger(tmp_path, 1, 1, derived_metrics=lambda m: {"x": 2.0}).step(1, 0, 8, **metrics)
    assert metrics == {"loss": 1.0}
    assert json.loads((tmp_path / "log.jsonl").read_text())["x"] == 2.0


# ------------------------------------------------------------------------------ compile_model
def test_compile_falls_back_to_eager_with_one_warning(monkeypatch):
    def broken_compile(model):
        def fn(*a, **k):
            raise RuntimeError("no C compiler")

        return fn

    monkeypatch.setattr(torch, "compile", broken_compile)
    model = torch.nn.Linear(3, 2)
    fwd = compile_model(model, True)
    x = torch.randn(4, 3)
    with pytest.warns(UserWarning, match="torch.compile failed .*no C compiler.*eagerly"):
        y = fwd(x)
    assert torch.equal(y, model(x))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        assert torch.equal(fwd(x), model(x))
    assert compile_model(model, False) is model
