"""Runs that survive failures, end to end (scripts in subprocesses): preemption (SIGTERM) and SIGKILL resume to bit-identical weights, failing
or unreachable ranks end the job within a bound, non-finite losses stop (or skip) cleanly, and
mismatched checkpoints or configs are named."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from common.checkpoint import load_checkpoint
from common.cli import EXIT_CONFIG, EXIT_NONFINITE, EXIT_PREEMPTED
from conftest import ROOT
from dist_utils import free_port

# One thread: CPU kernels then reduce in a fixed order, so runs are bit-reproducible.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def cmd(cifar_tar, out, *extra, fault=None):
    base = ["simclr.py", "--preset", "tiny", "--data", cifar_tar, "--out", str(out)]
    base += ["--device", "cpu", "--epochs", "3", "--knn-bank", "500", "--limit-test", "500", *extra]
    pre = [sys.executable] + (["tests/inject.py", fault] if fault else [])
    return pre + base


def run(args, timeout=300, **kw):
    return subprocess.run(
        args, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout, **kw
    )


def weights(out):
    return load_checkpoint(out)["backbone"]


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def reference(cifar_tar, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    r = run(cmd(cifar_tar, out))
    assert r.returncode == 0, r.stderr[-2000:]
    assert load_checkpoint(out)["step"] == 24
    return weights(out)


def wait_for_step(out, step, proc, timeout=240):
    """Poll log.jsonl until a logged step >= `step` (the tiny preset logs every 4 steps)."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        log = out / "log.jsonl"
        if log.exists() and any(f'"step": {s},' in log.read_text() for s in range(step, 25)):
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    raise TimeoutError("the run never reached the step")


def test_sigterm_checkpoints_exits_75_and_resumes_identically(cifar_tar, tmp_path, reference):
    proc = subprocess.Popen(
        cmd(cifar_tar, tmp_path),
        cwd=ROOT,
        env=ENV,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    wait_for_step(tmp_path, 8, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, err[-2000:]
    stopped_at = load_checkpoint(tmp_path)["step"]
    assert 8 <= stopped_at < 24 and '"stopped": "preempted"' in out
    r = run(cmd(cifar_tar, tmp_path))  # the same command again: auto-resume
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"resumed from {tmp_path / 'checkpoint.pt'} at step {stopped_at}" in r.stdout
    assert '"command": "python simclr.py --preset tiny' in r.stdout  # the result names its run
    assert_same(weights(tmp_path), reference)


def test_sigkill_mid_epoch_resumes_from_the_default_periodic_checkpoint(
    cifar_tar, tmp_path, reference
):
    """No checkpoint flag given: a SIGKILL in the middle of epoch 2 (8 steps an epoch) leaves
    the checkpoint of epoch 1's end, and rerunning the command resumes from it."""
    args = cmd(cifar_tar, tmp_path, "--keep-last", "3")
    proc = subprocess.Popen(
        args, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    wait_for_step(tmp_path, 12, proc)  # logged at step 12: mid-epoch 2 (steps 9-16)
    proc.kill()
    proc.wait()
    state = load_checkpoint(tmp_path)  # loadable whatever the moment
    assert state["step"] in (8, 16)  # epoch boundaries only (16 if the kill came late)
    kept = sorted(p.name for p in tmp_path.glob("checkpoint-*.pt"))
    assert 1 <= len(kept) <= 3 and kept[-1] == f"checkpoint-{state['step']:08d}.pt"
    r = run(args)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"at step {state['step']}" in r.stdout
    assert_same(weights(tmp_path), reference)


def test_timed_checkpoint_is_due_after_ckpt_minutes(cifar_tar, tmp_path):
    """--ckpt-minutes: a checkpoint as soon as that much wall time passed since the last one
    (here 1e-4 min: every step), even with step-based checkpoints off."""
    r = run(
        cmd(
            cifar_tar,
            tmp_path,
            "--ckpt-every",
            "0",
            "--ckpt-minutes",
            "1e-4",
            "--keep-last",
            "30",
            "--epochs",
            "1",
            "--max-steps",
            "5",
        )
    )
    assert r.returncode == 0, r.stderr[-2000:]
    kept = sorted(int(p.stem.split("-")[1]) for p in tmp_path.glob("checkpoint-*.pt"))
    assert kept == [1, 2, 3, 4, 5]


def test_nonfinite_loss_stops_naming_the_step(cifar_tar, tmp_path):
    r = run(cmd(cifar_tar, tmp_path, "--ckpt-every", "2", fault="nan@step3"))
    assert r.returncode == EXIT_NONFINITE
    assert "non-finite loss at step 3" in r.stderr and "Traceback" not in r.stderr
    assert load_checkpoint(tmp_path)["step"] == 2  # the last good checkpoint is kept


def test_skip_nonfinite_skips_the_update(cifar_tar, tmp_path):
    r = run(cmd(cifar_tar, tmp_path, "--skip-nonfinite", "--epochs", "1", fault="nan@step3"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert '"skipped_nonfinite": 1' in r.stdout and "step 3: non-finite loss" in r.stdout


def test_resume_with_another_backbone_names_the_difference(cifar_tar, tmp_path):
    assert run(cmd(cifar_tar, tmp_path, "--max-steps", "2")).returncode == 0
    r = run(cmd(cifar_tar, tmp_path, "--width", "16"))
    assert r.returncode == EXIT_CONFIG
    assert "width: checkpoint 8, now 16" in r.stderr and "Traceback" not in r.stderr
    r = run(cmd(cifar_tar, tmp_path, "--width", "16", "--fresh", "--max-steps", "1"))
    assert r.returncode == 0 and load_checkpoint(tmp_path)["config"]["width"] == 16


def torchrun(cifar_tar, out, fault, timeout=240):
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    args += ["tests/inject.py", fault] + cmd(cifar_tar, out)[1:]
    return run(args, timeout=timeout)


def test_a_failing_rank_ends_the_job(cifar_tar, tmp_path):
    # No hang until the 600 s collective timeout: a job still alive at torchrun()'s 240 s
    # process timeout raises TimeoutExpired (a bound on a hang, not a timing of the run).
    r = torchrun(cifar_tar, tmp_path, "raise@rank1:step2")
    assert r.returncode != 0 and "injected failure on rank 1" in r.stderr


def test_ranks_with_different_configs_refuse_to_start(cifar_tar, tmp_path):
    r = torchrun(cifar_tar, tmp_path, "cfg@rank1")
    assert r.returncode != 0
    assert "rank 1 runs a different config than rank 0: lr=1.0 vs 0.123" in r.stderr
    assert not (tmp_path / "checkpoint.pt").exists()


def test_unreachable_peer_fails_with_a_message(cifar_tar, tmp_path):
    env = {
        **ENV,
        "RANK": "1",
        "LOCAL_RANK": "1",
        "WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
    }
    r = subprocess.run(  # (a rank that never gives up raises TimeoutExpired at 120 s)
        cmd(cifar_tar, tmp_path, "--dist-timeout", "5"),
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == EXIT_CONFIG
    assert "rank 1 could not join the process group at 127.0.0.1" in r.stderr
    assert "Traceback" not in r.stderr
