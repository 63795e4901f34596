"""The op's first-use check (common/nt_xent_check.py): it passes and is cached per machine, runs
once under the file lock while other processes wait, covers every code path's width, compares
both gradients in every dtype, and a child that aborts, hangs or is wrong leaves the parent
healthy (auto falls back with a warning naming the cause, ext raises).
"""

from __future__ import annotations

import errno
import fcntl
import socket
import subprocess
import threading
import warnings
from pathlib import Path

import pytest
import torch
from nt_xent_cases import _small_inputs, needs_cuda, needs_ext

from common import nt_xent
from common import nt_xent_check as check
from common import nt_xent_op as op
from common.nt_xent import nt_xent_reference


@needs_ext
def test_self_check_passes_and_is_cached_cpu(monkeypatch, tmp_path):
    monkeypatch.setenv("SSL_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(check, "_SELF_CHECK", {})
    state = torch.random.get_rng_state()
    assert check.self_check("cpu", 128) is None
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is left alone
    assert len(list((tmp_path / "nt_xent_check").glob("*.json"))) == 1  # the verdict, on disk

    def boom(*a, **k):
        raise AssertionError("a cached verdict must not start another check")

    monkeypatch.setattr(check, "_run_child", boom)
    assert check.self_check("cpu", 128) is None  # the in-process memo
    monkeypatch.setattr(check, "_SELF_CHECK", {})  # as a new process on the same machine
    assert check.self_check("cpu", 128) is None
    assert check.self_check("cpu", 4) is None  # d = 4 takes the code path d = 37 checked


def test_check_widths_cover_every_code_path():
    assert check._check_ds(128) == [37, 128] and check._check_ds(5) == [37, 128]
    assert check._check_ds(256) == [37, 128, 256] and check._check_ds(320) == [37, 128, 320]
    assert check._check_ds(64) == [37, 64, 128]


def test_one_process_runs_the_check_the_others_wait(monkeypatch, tmp_path):
    """torchrun's ranks on one node: the file lock lets one run the check; the others wait and
    read its verdict."""
    import threading

    monkeypatch.setenv("SSL_CACHE_DIR", str(tmp_path))
    calls = []

    def slow_child(device, ds, timeout):
        calls.append(ds)
        threading.Event().wait(0.5)  # overlap with the other callers
        return "verdict of the one run", True  # (ran and compared)

    monkeypatch.setattr(check, "_run_child", slow_child)
    out: list = []
    threads = [
        threading.Thread(target=lambda: out.append(check._verdict(torch.device("cpu"), 128)))
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and out == ["verdict of the one run"] * 4


@needs_ext
@pytest.mark.parametrize(
    "hook,cause",
    [
        ("abort", "crashed (SIGABRT)"),
        ("hang", "hung: no verdict within"),
        ("wrong", "loss differs from the fp64 reference"),
    ],
)
def test_first_use_check_failure_keeps_the_parent_healthy(monkeypatch, tmp_path, hook, cause):
    """The child aborts (a kernel fault), hangs or computes a wrong loss: `auto` warns once,
    naming the cause, and uses the reference; `ext` raises; the parent process is untouched and
    the op itself still runs in it."""
    monkeypatch.setenv("SSL_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("SSL_NT_XENT_CHECK_HOOK", hook)
    monkeypatch.setenv("SSL_NT_XENT_CHECK_TIMEOUT", "10")
    monkeypatch.setattr(check, "_SELF_CHECK", {})
    monkeypatch.setattr(nt_xent, "_SELF_CHECK_WARNED", set())
    monkeypatch.setenv("SSL_NT_XENT", "auto")
    rows, cols, pos, self_idx = _small_inputs()
    with pytest.warns(UserWarning, match="self-check") as rec:
        out = nt_xent.nt_xent_rows(rows, cols, pos, self_idx, 0.1)
    assert any(cause in str(w.message) for w in rec), [str(w.message) for w in rec]
    assert torch.equal(out, nt_xent_reference(rows, cols, pos, self_idx, 0.1))
    assert nt_xent.nt_xent_impl_used() == "ref (fallback: self-check failed)"
    monkeypatch.setenv("SSL_NT_XENT", "ext")
    monkeypatch.setattr(check, "_SELF_CHECK", {})  # a new process on the same machine:
    if hook == "wrong":  # a verdict that compared is on disk and stands
        monkeypatch.setattr(check, "_run_child", lambda *a: pytest.fail("verdict not cached"))
    else:  # a crash or a hang is no verdict: nothing on disk, the next process checks again
        assert not list((tmp_path / "nt_xent_check").glob("*.json"))
    with pytest.raises(RuntimeError, match="self-check"):
        nt_xent.nt_xent_rows(rows, cols, pos, self_idx, 0.1)
    # the parent is healthy: the op runs here and agrees with the reference
    torch.testing.assert_close(
        op.nt_xent_fused(rows, cols, pos, self_idx, 0.1),
        nt_xent_reference(rows, cols, pos, self_idx, 0.1),
    )


def _wrong_grad(real):
    # same loss values, gradient w.r.t. rows off by 1e-2 per element
    return lambda r, c, p, s, T, **k: (
        real(r, c, p, s, T, **k) + 1e-2 * (r.sum(1) - r.sum(1).detach())
    )


@needs_ext
def test_check_compares_both_gradients_and_every_dtype(monkeypatch):
    """The comparison itself, in-process (the child runs the same function)."""
    orig = op.nt_xent_fused
    seen = []

    def spy(r, *a, **k):
        seen.append(r.dtype)
        return orig(r, *a, **k)

    monkeypatch.setattr(op, "nt_xent_fused", spy)
    assert check._run_self_check(torch.device("cpu"), 37) is None
    assert seen == [torch.float32, torch.bfloat16, torch.float16]
    assert "loss differs" in check._run_self_check(torch.device("cpu"), 37, hook="wrong")
    monkeypatch.setattr(op, "nt_xent_fused", _wrong_grad(orig))
    assert "grad rows differs" in check._run_self_check(torch.device("cpu"), 37)


@needs_cuda
@pytest.mark.parametrize("d", [64, 128, 256, 320])
def test_cuda_self_check_passes(d):
    assert check.self_check("cuda", d) is None


# ------------------------------------------- a first run that cannot crash or hang on the cache
def _passing_child(calls):
    def child(device, ds, timeout):
        calls.append(ds)
        return None, True

    return child


@pytest.mark.parametrize("where", ["a file", "/proc/sys"])
def test_an_unusable_cache_folder_checks_uncached_with_one_warning(monkeypatch, tmp_path, where):
    """$SSL_CACHE_DIR (or the home it defaults to) under a file, or read-only: the check runs
    without its cache and warns once; nothing raises out of the loss."""
    base = tmp_path / "f" if where == "a file" else Path("/proc/sys/ssl-cache")
    if where == "a file":
        base.write_text("not a folder")
    monkeypatch.setenv("SSL_CACHE_DIR", str(base))
    monkeypatch.setattr(check, "_CACHE_WARNED", False)
    calls = []
    monkeypatch.setattr(check, "_run_child", _passing_child(calls))
    with pytest.warns(UserWarning, match="cannot use its cache.*checking without the cache"):
        assert check._verdict(torch.device("cpu"), 128) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once
        assert check._verdict(torch.device("cpu"), 128) is None
    assert len(calls) == 2  # uncached: each process (here: each call) checks for itself


def test_a_filesystem_without_locks_checks_uncached(monkeypatch, tmp_path):
    monkeypatch.setenv("SSL_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(check, "_CACHE_WARNED", False)

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(check.fcntl, "flock", no_locks)
    calls = []
    monkeypatch.setattr(check, "_run_child", _passing_child(calls))
    with pytest.warns(UserWarning, match="cannot lock its cache: No locks available"):
        assert check._verdict(torch.device("cpu"), 128) is None
    assert calls


def test_a_lock_held_too_long_is_waited_for_a_bounded_time(monkeypatch, tmp_path):
    """A process stuck in the driver holds the lock: the others wait at most the check's
    timeout plus LOCK_WAIT_EXTRA_S, then check on their own (no frozen ranks)."""
    monkeypatch.setenv("SSL_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("SSL_NT_XENT_CHECK_TIMEOUT", "0.2")
    monkeypatch.setattr(check, "LOCK_WAIT_EXTRA_S", 0.3)
    monkeypatch.setattr(check, "_CACHE_WARNED", False)
    calls = []
    monkeypatch.setattr(check, "_run_child", _passing_child(calls))
    check._verdict(torch.device("cpu"), 128)  # creates the lock file
    (lock,) = (tmp_path / "nt_xent_check").glob("*.lock")
    for f in (tmp_path / "nt_xent_check").glob("*.json"):
        f.unlink()  # no verdict yet: a waiter would wait for the holder's
    holder = open(lock, "w")
    fcntl.flock(holder, fcntl.LOCK_EX)
    result: list = []
    waiter = threading.Thread(
        target=lambda: result.append(check._verdict(torch.device("cpu"), 128))
    )
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            waiter.start()
            waiter.join(timeout=60)  # a bound on a hang, not a timing
        assert not waiter.is_alive() and result == [None]
        assert any("held its cache lock" in str(w.message) for w in caught)
    finally:
        holder.close()


def test_the_verdict_key_names_the_host():
    """A cache shared by several nodes (a home on NFS): one node's verdict is not another's."""
    assert check.machine_key("cpu")["host"] == socket.gethostname()


def test_a_hung_child_is_killed_and_reaped_within_a_bound(monkeypatch):
    """The child hangs past the timeout: it is killed, and the wait to reap it is bounded too
    (a process stuck in the driver may not die at once)."""
    monkeypatch.setenv("SSL_NT_XENT_CHECK_HOOK", "hang")
    waits = []
    real = subprocess.Popen.communicate

    def communicate(self, input=None, timeout=None):
        waits.append(timeout)
        return real(self, input, timeout)

    monkeypatch.setattr(subprocess.Popen, "communicate", communicate)
    why, compared = check._run_child(torch.device("cpu"), [37], timeout=3.0)
    assert "hung" in why and not compared
    assert waits[0] == 3.0 and waits[1] is not None  # every wait has a bound
