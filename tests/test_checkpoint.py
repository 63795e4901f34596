import os
import pickle
import random

import numpy as np
import pytest
import torch

from common import checkpoint as ck
from common.backbones import build_backbone


def _save(path, model, step=3):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()
    ck.save_checkpoint(
        path,
        method="simclr",
        backbone=model,
        head=torch.nn.Linear(2, 2),
        optimizer=opt,
        scheduler={"kind": "warmup_cosine"},
        step=step,
        epoch=1,
        config={"backbone": "resnet18"},
    )
    return opt


def test_roundtrip_with_weights_only(tmp_path):
    model = build_backbone("resnet18", "cifar", 8)
    opt = _save(tmp_path / "checkpoint.pt", model)
    state = ck.load_checkpoint(tmp_path)  # a run directory works too
    assert state["method"] == "simclr" and state["step"] == 3 and state["epoch"] == 1
    fresh = build_backbone("resnet18", "cifar", 8)
    fresh.load_state_dict(state["backbone"])
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(a, b)
    opt2 = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
    opt2.load_state_dict(state["optimizer"])
    assert opt2.state_dict()["state"].keys() == opt.state_dict()["state"].keys()
    assert [f.name for f in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temp file left


def test_rng_state_roundtrip():
    s = ck.rng_state()
    a = (torch.rand(3), np.random.rand(3), random.random())
    ck.set_rng_state(s)
    b = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


def test_failed_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    model = build_backbone("resnet18", "cifar", 8)
    _save(tmp_path / "checkpoint.pt", model, step=1)

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        _save(tmp_path / "checkpoint.pt", model, step=2)
    monkeypatch.undo()
    assert ck.load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 1
    assert [f.name for f in tmp_path.iterdir()] == ["checkpoint.pt"]


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['EVIL_MARKER']}",))


def test_malicious_pickle_does_not_run(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("EVIL_MARKER", str(marker))
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"format": 1, "payload": _Evil()}, f)
    torch.save({"format": 1, "payload": _Evil()}, tmp_path / "evil2.pt")
    for p in (path, tmp_path / "evil2.pt"):
        with pytest.raises(ValueError, match="not a loadable checkpoint"):
            ck.load_checkpoint(p)
    assert not marker.exists()


# ------------------------------------------------ checkpoint cadence, on an injected clock
def _cadence(tmp_path, monkeypatch, steps_per_epoch, step_s, steps, *argv):
    """Clock times of the checkpoints a TrainRun writes over `steps` steps of `step_s` s each
    (a 1-parameter model: the loop's bookkeeping only; common.train.clock is the fake)."""
    import simclr
    from common import train

    t = [0.0]
    monkeypatch.setattr(train, "clock", lambda: t[0])
    saved = []
    monkeypatch.setattr(train.TrainRun, "_write_checkpoint", lambda self: saved.append(t[0]))
    args = simclr.get_args_parser().parse_args(["--out", str(tmp_path), *argv])
    args = train.apply_preset(args, simclr.PRESETS)
    args.device, args.epochs, args.log_every = "cpu", 10**6, 10**9
    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)
    run = train.TrainRun(
        args,
        tmp_path,
        "simclr",
        backbone=torch.nn.Linear(1, 1),
        head=None,
        optimizer=opt,
        steps_per_epoch=steps_per_epoch,
        peak_lr=1.0,
    )
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
