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
