"""common/rundir.py: one run per folder (the flock'ed OUT/.lock), what a run that failed before
its first checkpoint leaves behind (nothing it made), which checkpoint a run resumes, and which
config changes a resume accepts. (Two processes on one OUT, end to end: test_bad_inputs.py;
a resume with another backbone, end to end: test_failures.py.)"""

import argparse
import fcntl
import os

import pytest

from common import rundir
from common.cli import ConfigError


@pytest.fixture(autouse=True)
def _release():
    yield
    rundir.release_run_dir(failed=False)


def test_a_locked_folder_is_refused_naming_its_holder(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / rundir.LOCK_FILE).write_text("pid 4242 on nodeA\n")
    fd = os.open(out / rundir.LOCK_FILE, os.O_RDWR)  # another open file: another holder
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        with pytest.raises(ConfigError, match=r"in use by another run \(pid 4242 on nodeA\)"):
            rundir.lock_run_dir(out)
    finally:
        os.close(fd)
    rundir.lock_run_dir(out)  # released: taken over, and the holder line is ours now
    assert rundir.holds(out)
    assert (out / rundir.LOCK_FILE).read_text().startswith(f"pid {os.getpid()} on ")


def test_a_failed_run_removes_only_what_it_made(tmp_path):
    out = tmp_path / "a" / "b"
    rundir.lock_run_dir(out)
    (out / "log.jsonl").write_text("{}\n")
    rundir.release_run_dir(failed=True)
    assert not (tmp_path / "a").exists() and not rundir.holds(out)
    # a folder that holds a checkpoint (or was there before) stays
    out.mkdir(parents=True)
    (out / "checkpoint.pt").write_bytes(b"x")
    rundir.lock_run_dir(out)
    rundir.release_run_dir(failed=True)
    assert (out / "checkpoint.pt").exists()


def _args(**kw):
    return argparse.Namespace(**{"resume": None, "fresh": False, **kw})


def test_which_checkpoint_a_run_resumes(tmp_path):
    ckpt = tmp_path / "checkpoint.pt"
    assert rundir.resume_path(_args(), tmp_path) is None  # nothing there: a fresh run
    with pytest.raises(ConfigError, match="--resume: no checkpoint at"):
        rundir.resume_path(_args(resume="auto"), tmp_path)
    ckpt.write_bytes(b"x")
    assert rundir.resume_path(_args(), tmp_path) == ckpt  # a rerun continues by itself
    assert rundir.resume_path(_args(fresh=True), tmp_path) is None
    other = tmp_path / "other.pt"
    with pytest.raises(ConfigError, match="no checkpoint at .*other.pt"):
        rundir.resume_path(_args(resume=str(other)), tmp_path)
    other.write_bytes(b"x")
    assert rundir.resume_path(_args(resume=str(other)), tmp_path) == other


def test_a_resume_accepts_only_the_resumable_changes(tmp_path):
    saved = {"method": "simclr", "config": {"width": 8, "out": "a", "log_every": 4}}
    now = argparse.Namespace(width=8, out="b", log_every=50)  # where and how often: fine
    rundir.check_resumable(saved, now, "simclr", tmp_path / "c.pt")
    with pytest.raises(ConfigError, match="a simclr checkpoint, not mae"):
        rundir.check_resumable(saved, now, "mae", tmp_path / "c.pt")
    now.width = 16
    with pytest.raises(ConfigError, match="width: checkpoint 8, now 16"):
        rundir.check_resumable(saved, now, "simclr", tmp_path / "c.pt")


def test_an_unloadable_checkpoint_stops_before_any_data(tmp_path):
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="cannot resume: .*--fresh"):
        rundir.check_resume(_args(), tmp_path)
