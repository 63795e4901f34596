"""The run folder: one run per folder, and what a resume must satisfy before any data is read.

Owns: OUT/.lock (fcntl.flock'ed for the run's life: a second process on the same OUT stops
with exit 2 naming the holder), removing what a run that failed before its first checkpoint
made, which checkpoint a run resumes (--resume [CKPT], or OUT/checkpoint.pt by itself unless
--fresh), and the checks that checkpoint must pass: it loads (weights_only), it is this
method's, and its config differs only in the flags a resume may change (RESUMABLE_CHANGES).
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import os
import socket
import sys
from pathlib import Path

import torch

from common import dist
from common.checkpoint import load_checkpoint, remove_stale_temps
from common.cli import ConfigError, one_line
from common.outputs import WriteError, os_error_reason

# Config keys that may change when a run is resumed (everything else must match).
RESUMABLE_CHANGES = set(
    "out resume fresh device preset log_every eval_every ckpt_every ckpt_minutes max_steps "
    "keep_last data data_path knn_bank dist_timeout skip_nonfinite limit_test compile".split()
)
LOCK_FILE = ".lock"  # in OUT: flock'ed by the run that owns the folder

# The folder this process runs in: the lock's file descriptor, and the folders it created (to
# remove them when the run fails before its first checkpoint). One run per process at a time.
_run_dir: dict | None = None
_preloaded: tuple[Path, dict] | None = None  # the resume checkpoint setup_run checked


def lock_run_dir(out: Path) -> None:
    """Create OUT (and its parents) and take its lock for the life of this process's run.

    OUT/.lock is flock'ed (advisory, exclusive, released by the kernel when the process ends,
    even by SIGKILL, so a stale lock is simply taken over) and holds the owner's pid and host.
    A second process on the same OUT stops with ConfigError naming the holder. Temp files of a
    save that was killed (.ckpt-*.tmp) are removed once the lock is held."""
    global _run_dir
    release_run_dir(failed=False)  # an earlier run in this process (tests, notebooks)
    made, p = [], out.absolute()
    while not p.exists():
        made.append(p)
        p = p.parent
    new_lock = not (out / LOCK_FILE).exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise WriteError(
            f"--out {out}: cannot create the run folder: {os_error_reason(e)}"
        ) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            # A filesystem without locks (some network mounts): run, but say so.
            print(f"warning: cannot lock {out / LOCK_FILE} ({e.strerror}): running without the "
                  "run-folder lock", file=sys.stderr, flush=True)  # fmt: skip
        else:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "pid unknown"
            os.close(fd)
            raise ConfigError(
                f"--out {out} is in use by another run ({holder}); wait for it to end, stop "
                "it, or use another --out"
            ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    _run_dir = {"out": out, "fd": fd, "made": made, "new_lock": new_lock}
    if n := remove_stale_temps(out):
        print(f"removed {n} temp file(s) of an interrupted checkpoint save in {out}", flush=True)


def release_run_dir(failed: bool) -> None:
    """Unlock this process's run folder. When the run `failed`, remove what it made and no
    one needs: the lock file it created, and, when no checkpoint was written, the folder
    (and parents) it created with its log; a folder holding anything else is kept."""
    global _run_dir, _preloaded
    _preloaded = None
    if _run_dir is None:
        return
    run, _run_dir = _run_dir, None
    out = run["out"]
    try:
        if failed and run["new_lock"]:
            (out / LOCK_FILE).unlink(missing_ok=True)
        if failed and run["made"] and not (out / "checkpoint.pt").exists():
            (out / "log.jsonl").unlink(missing_ok=True)
            for d in run["made"]:  # innermost first; stops at one that holds anything
                d.rmdir()
    except OSError:
        pass
    finally:
        os.close(run["fd"])  # releases the flock


def check_resume(args: argparse.Namespace, out: Path) -> None:
    """Load the checkpoint the run would resume (weights_only) before any data is read: a
    truncated, foreign or malicious file stops here with ConfigError naming it."""
    global _preloaded
    _preloaded = None
    path = resume_path(args, out)
    if path is None:
        return
    try:
        _preloaded = (path, load_checkpoint(path))
    except (ValueError, FileNotFoundError) as e:
        way = "pass another --resume" if path != out / "checkpoint.pt" else "move it away"
        raise ConfigError(f"cannot resume: {one_line(e)}. {way.capitalize()}, or pass --fresh "
                          "to start over") from None  # fmt: skip


def check_same_config(args: argparse.Namespace) -> None:
    """Every rank must run the same config (a stale copy of a script or a differing flag on one
    node would otherwise train something nobody asked for). All ranks raise alike."""
    if dist.get_world_size() == 1:
        return
    mine = {k: v for k, v in vars(args).items() if k != "device"}
    configs = [None] * dist.get_world_size()
    torch.distributed.all_gather_object(configs, mine)
    for rank, cfg in enumerate(configs):
        diff = sorted(k for k in set(cfg) | set(configs[0]) if cfg.get(k) != configs[0].get(k))
        if diff:
            detail = ", ".join(f"{k}={configs[0].get(k)!r} vs {cfg.get(k)!r}" for k in diff)
            raise ConfigError(f"rank {rank} runs a different config than rank 0: {detail}")


def resume_path(args: argparse.Namespace, out: Path) -> Path | None:
    """The checkpoint to resume: --resume [CKPT], or OUT/checkpoint.pt when it exists (a rerun
    of a preempted job continues by itself) unless --fresh."""
    if args.resume and args.resume != "auto":
        path = Path(args.resume)
        if not path.exists():
            raise ConfigError(f"--resume: no checkpoint at {path}")
        return path
    path = out / "checkpoint.pt"
    if getattr(args, "fresh", False):
        return None
    if path.exists():
        return path
    if args.resume:
        raise ConfigError(f"--resume: no checkpoint at {path}")
    return None


def holds(out: Path) -> bool:
    """Whether this process holds OUT's lock (it ran lock_run_dir(OUT) and has not released)."""
    return _run_dir is not None and _run_dir["out"] == out


def resume_state(path: Path) -> dict:
    """The checkpoint at `path`, as check_resume already loaded it (no second read) or loaded now."""
    if _preloaded and _preloaded[0] == path:
        return _preloaded[1]
    return load_checkpoint(path)


def check_resumable(state: dict, args: argparse.Namespace, method: str, path: Path) -> None:
    """A checkpoint resumes only into the same method with the same config, save the flags in
    RESUMABLE_CHANGES (where to write, how often to log or save, ...): ConfigError otherwise."""
    if state["method"] != method:
        raise ConfigError(f"--resume {path}: a {state['method']} checkpoint, not {method}")
    now = vars(args)
    diff = [
        f"{k}: checkpoint {state['config'].get(k)!r}, now {now.get(k)!r}"
        for k in sorted(set(state["config"]) | set(now))
        if k not in RESUMABLE_CHANGES and state["config"].get(k) != now.get(k)
    ]
    if diff:
        raise ConfigError(
            f"cannot resume {path}: its config differs ({'; '.join(diff)}). "
            "Use the same flags, another --out, or --fresh to start over"
        )
