"""The NT-Xent op's first-use check: before the op (common/nt_xent_op.py) is used on a device,
`self_check(device, d)` compares it with an fp64 reference (common.nt_xent.nt_xent_rows calls
it). This module owns the check itself, the child process it runs in and its timeout, the
verdict's per-machine cache, its file lock and its key (machine_key).

Kernels that have never run on a user's hardware must not silently train on a wrong gradient,
and must not take the run down either. The check runs in a child process with a timeout
(SSL_NT_XENT_CHECK_TIMEOUT, default 60 s, CUDA start-up included), so an illegal memory access,
an abort or a hang kills the child, not the training process, whose CUDA context stays usable.
It covers fp32, bf16 and fp16 at d = 128, at d = 37 (not a multiple of 8: the scalar loads) and
at the caller's d when its code path differs, on R = 400, C = 450 with the CUDA column split
forced to 2: every block of both backward passes streams 3-4 tiles (cross-tile max rescaling,
multi-tile accumulation, staging-buffer reuse) and both dimensions end in a partial tile. The
verdict is cached per machine (host name, device name, driver and CUDA versions, torch version,
the path in use, a hash of the built extension) in $SSL_CACHE_DIR/nt_xent_check/ (default
~/.cache/ssl-reference), so it costs a few seconds once per machine, not per process or rank;
concurrent processes (torchrun's ranks on a node) take a file lock, so one runs the check and
the others wait for its verdict, at most the check's timeout plus LOCK_WAIT_EXTRA_S. Only a
verdict the child reached by comparing is cached: a crash or a hang may be the machine's passing
trouble and is checked again by the next process. A cache that cannot be used (an unwritable
or unset home, no file locks, a lock held too long) makes the check run uncached, with one
warning: it never stops a run. Delete that directory (or set SSL_NT_XENT_RECHECK=1) to check
again. Test hooks: SSL_NT_XENT_CHECK_HOOK=abort|hang|wrong, read by the child only.

It imports the op module only, not common.nt_xent (the check has its own fp64 reference below),
so there is no import cycle.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import torch

from common import nt_xent_op as op

ROOT = Path(__file__).resolve().parents[1]

# (loss: max abs error / max(1, max |ref|), gradients: max abs error / max |ref|) per dtype. Loose
# against rounding (the tests hold the op to 1e-5 / 1.5e-2), tight against a wrong kernel.
_CHECK_TOL = {
    torch.float32: (1e-4, 1e-3),
    torch.bfloat16: (1e-3, 4e-2),
    torch.float16: (1e-3, 4e-2),
}
# R != C, 6 / 7 full 64-wide CUDA tiles plus a tail in each dimension; with 2 forced column
# splits every block of the forward and of both backward passes streams 3 or 4 tiles.
_CHECK_R, _CHECK_C, _CHECK_SPLITS = 400, 450, 2
_CHECK_DS = (128, 37)  # the training width (16-byte vector loads) and a d not a multiple of 8
CHECK_TIMEOUT_S = 60.0
# A process waiting for another's verdict waits at most the check's timeout plus this (the
# holder's start-up and the kill of a hung child), then checks on its own, uncached.
LOCK_WAIT_EXTRA_S = 60.0
KILL_WAIT_S = 10.0  # after SIGKILL, how long to wait for the child to be reaped
# in-process memo: verdict key -> None (passed) or why not
_SELF_CHECK: dict[str, str | None] = {}
_VERDICT_PREFIX = "NTX_CHECK_VERDICT "


def _reference64(
    rows: torch.Tensor, cols: torch.Tensor, pos: torch.Tensor, self_idx: torch.Tensor, T: float
) -> torch.Tensor:
    """Per-row NT-Xent in fp64, written independently of common.nt_xent (no import cycle)."""
    r = rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12)
    c = cols / cols.norm(dim=1, keepdim=True).clamp_min(1e-12)
    logits = r @ c.t() / T  # [R, C]
    i = torch.arange(len(rows))
    logits = logits.index_put((i, self_idx), torch.tensor(float("-inf"), dtype=logits.dtype))
    return torch.logsumexp(logits, 1) - logits[i, pos]


def _run_self_check(device: torch.device, d: int, hook: str = "") -> str | None:
    """The check itself (run in the child process): None, or what differs."""
    g = torch.Generator().manual_seed(1234)
    R, C, T = _CHECK_R, _CHECK_C, 0.1
    rows = torch.randn(R, d, generator=g, dtype=torch.float64)
    rows = rows * (0.5 + 2 * torch.rand(R, 1, generator=g, dtype=torch.float64))
    cols = torch.randn(C, d, generator=g, dtype=torch.float64)
    cols = cols * (0.5 + 2 * torch.rand(C, 1, generator=g, dtype=torch.float64))
    perm = torch.randperm(C, generator=g)
    pos, self_idx = perm[:R], perm[C - R :].flip(0)  # random, distinct per row
    self_idx = torch.where(self_idx == pos, (pos + 1) % C, self_idx)
    cols[pos] = rows + 0.5 * cols[pos]  # correlated positives: non-uniform softmax rows
    weight = torch.rand(R, generator=g, dtype=torch.float64) + 0.5
    if device.type == "cuda":  # (the CPU kernels have no column split)
        torch.ops.ssl_ops.set_splits(_CHECK_SPLITS)
    for dtype, (loss_tol, grad_tol) in _CHECK_TOL.items():
        r = rows.to(device, dtype).requires_grad_()
        c = cols.to(device, dtype).requires_grad_()
        try:
            # the tiled path in 64-column chunks: 8 chunks, the last a 2-column tail
            loss = op.nt_xent_fused(r, c, pos.to(device), self_idx.to(device), T, chunk=64)
            (loss * weight.to(device, loss.dtype)).sum().backward()
            got = (loss.detach().cpu().double(), r.grad.cpu().double(), c.grad.cpu().double())
        except RuntimeError as e:
            return f"{dtype}, d={d}: the op raised {type(e).__name__}: {e}"
        if hook == "abort":  # test hook: a kernel fault that kills the process
            os.abort()
        if hook == "hang":  # test hook: a kernel that never finishes
            time.sleep(3600)
        if hook == "wrong":  # test hook: a wrong loss
            got = (got[0] * 1.001, got[1], got[2])
        r64 = r.detach().cpu().double().requires_grad_()
        c64 = c.detach().cpu().double().requires_grad_()
        (_reference64(r64, c64, pos, self_idx, T) * weight).sum().backward()
        want = (_reference64(r64, c64, pos, self_idx, T).detach(), r64.grad, c64.grad)
        for name, a, b, tol in zip(
            ("loss", "grad rows", "grad cols"), got, want, (loss_tol, grad_tol, grad_tol)
        ):
            denom = max(1.0, b.abs().max().item()) if name == "loss" else b.abs().max().item()
            err = (a - b).abs().max().item() / max(denom, 1e-30)
            if not err <= tol:  # also catches NaN
                return (
                    f"{dtype}, d={d}: {name} differs from the fp64 reference by {err:.2e} (> {tol})"
                )
    return None


def _child_main(argv: list[str]) -> int:
    """Entry point of the check's child process: argv = [device, d...]; prints the verdict."""
    device = torch.device(argv[0])
    hook = os.environ.get("SSL_NT_XENT_CHECK_HOOK", "")
    why = None
    for d in (int(x) for x in argv[1:]):
        with torch.autocast(device.type, enabled=False):
            why = _run_self_check(device, d, hook)
        if why is not None:
            break
    print(_VERDICT_PREFIX + json.dumps({"why": why}), flush=True)
    return 0


def _d_class(d: int) -> tuple[bool, int]:
    """What selects the kernels' code path for width d: 16-byte vector loads (d a multiple of 8)
    and the backward accumulator (registers for d <= 64 / 128 / 256 by dtype, else global)."""
    return d % 8 == 0, sum(d > lim for lim in (64, 128, 256))


def _check_ds(d: int) -> list[int]:
    """The widths the check runs: 128 and 37, plus d when its code path is not among theirs."""
    ds = set(_CHECK_DS)
    if _d_class(d) not in {_d_class(x) for x in ds}:
        ds.add(max(int(d), 1))
    return sorted(ds)


def _file_sha(path: str | None) -> str:
    if not path or not os.path.exists(path):
        return "none"
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


_EXT_SHA: str | None = None


def machine_key(device: torch.device | str) -> dict[str, str]:
    """What the check's verdict depends on: device name, driver and CUDA versions, torch, and the
    built extension's hash (a rebuilt or updated library is checked again)."""
    global _EXT_SHA
    dev = torch.device(device)
    if _EXT_SHA is None:
        _EXT_SHA = _file_sha(op._EXT_FILE)
    key = {"device": dev.type, "torch": torch.__version__, "ext": _EXT_SHA}
    key["host"] = socket.gethostname()  # a shared cache: one node's verdict is not another's
    key["path"] = op.path_for(dev)  # the check runs the implementation this process will use
    if dev.type == "cuda":
        idx = dev.index if dev.index is not None else torch.cuda.current_device()
        key["name"] = torch.cuda.get_device_name(idx)
        key["cuda"] = str(torch.version.cuda)
        try:
            key["driver"] = Path("/proc/driver/nvidia/version").read_text().splitlines()[0]
        except (OSError, IndexError):
            key["driver"] = "unknown"
    else:
        key["name"] = platform.processor() or platform.machine()
    hook = os.environ.get("SSL_NT_XENT_CHECK_HOOK", "")
    if hook:  # a test's deliberately broken verdict never stands for the real one
        key["hook"] = hook
    return key


def _cache_dir() -> Path:
    base = os.environ.get("SSL_CACHE_DIR", str(Path.home() / ".cache" / "ssl-reference"))
    return Path(base) / "nt_xent_check"


def _timeout_s() -> float:
    return float(os.environ.get("SSL_NT_XENT_CHECK_TIMEOUT", CHECK_TIMEOUT_S))


def _run_child(device: torch.device, ds: list[int], timeout: float) -> tuple[str | None, bool]:
    """Runs the check in a fresh process: (None, or why the op must not be used; whether the
    child ran and compared, i.e. reported a verdict). A crash or a hang is no comparison: it may
    be the machine's passing trouble, so it is not cached. The child has its own session, so a
    hang is ended by killing its whole process group; the reaping wait is bounded too."""
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); "
        "from common.nt_xent_check import _child_main; sys.exit(_child_main(sys.argv[2:]))"
    )
    cmd = [sys.executable, "-c", code, str(ROOT), str(device), *map(str, ds)]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):  # (stuck in the driver: let it be)
            proc.communicate(timeout=KILL_WAIT_S)
        return f"the check process hung: no verdict within {timeout:g} s", False
    for line in reversed(out.splitlines()):
        if line.startswith(_VERDICT_PREFIX):
            return json.loads(line[len(_VERDICT_PREFIX) :])["why"], True
    if proc.returncode < 0:
        with contextlib.suppress(ValueError):
            cause = signal.Signals(-proc.returncode).name
            return f"the check process crashed ({cause}): {_last_line(err)}", False
    return f"the check process failed (exit code {proc.returncode}): {_last_line(err)}", False


def _last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][-300:] if lines else "no output"


def _verdict(device: torch.device, d: int) -> str | None:
    """The cached verdict for this machine and d, or the check's (run once, under a file lock:
    concurrent processes wait for the first one's verdict instead of running their own). The
    cache may fail in any way (an unwritable or unset home, a filesystem without locks, a lock
    held too long): the check then runs uncached, with one warning, and training goes on."""
    ds = _check_ds(d)
    key = {**machine_key(device), "ds": ds}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    timeout = _timeout_s()
    try:
        cache = _cache_dir()
        cache.mkdir(parents=True, exist_ok=True)
        lock = open(cache / f"{digest}.lock", "w")  # (closing it, below, unlocks)
    except OSError as e:
        return _uncached(device, ds, timeout, f"cannot use its cache: {_why(e)}")
    with lock:
        try:
            locked = _lock_within(lock, timeout + LOCK_WAIT_EXTRA_S)
        except OSError as e:  # (no flock on this filesystem)
            return _uncached(device, ds, timeout, f"cannot lock its cache: {_why(e)}")
        if not locked:
            why = f"another process held its cache lock for over {timeout + LOCK_WAIT_EXTRA_S:g} s"
            return _uncached(device, ds, timeout, why)
        path = cache / f"{digest}.json"
        if path.exists() and os.environ.get("SSL_NT_XENT_RECHECK", "0") != "1":
            with contextlib.suppress(OSError, ValueError, KeyError):
                return json.loads(path.read_text())["why"]
        why, compared = _run_child(device, ds, timeout)
        if compared:  # only a verdict that ran and compared stands for the machine
            tmp = path.with_suffix(f".tmp{os.getpid()}.{threading.get_ident()}")
            try:
                tmp.write_text(json.dumps({"why": why, "key": key, "time": time.time()}))
                os.replace(tmp, path)
            except OSError as e:
                _warn_cache(f"cannot write its cache: {_why(e)}")
        return why


def _lock_within(lock, seconds: float) -> bool:
    """flock(lock), polling, for at most `seconds`: True once held (released when it is closed)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)


def _why(e: OSError) -> str:
    return f"{e.filename or ''}: {e.strerror or e}".lstrip(": ")


_CACHE_WARNED = False


def _warn_cache(why: str) -> None:
    global _CACHE_WARNED
    if not _CACHE_WARNED:
        _CACHE_WARNED = True
        warnings.warn(f"NT-Xent first-use check: {why}; checking without the cache", stacklevel=4)


def _uncached(device: torch.device, ds: list[int], timeout: float, why: str) -> str | None:
    _warn_cache(why)
    return _run_child(device, ds, timeout)[0]


def _device_key(device: torch.device | str) -> str:
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return str(dev)


def self_check(device: torch.device | str, d: int = 128) -> str | None:
    """None when the op matches the fp64 reference (loss and both gradients, fp32, bf16 and
    fp16) on `device`'s kind of hardware, else why not (a mismatch, or the check process crashed
    or hung). Cached per machine on disk and per process in memory; skipped (None) while
    torch.compile traces, where the eager call before it has run it."""
    key = f"{_device_key(device)}/d={_check_ds(d)}"
    if key in _SELF_CHECK:
        return _SELF_CHECK[key]
    if torch.compiler.is_compiling():
        return None
    why = _verdict(torch.device(_device_key(device)), d)
    _SELF_CHECK[key] = why
    return why
