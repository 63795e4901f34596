"""What every method script's training loop shares: the command line, presets, the data feed,
the lr schedule, logging with img/s and ETA, and clear errors for bad input.

The command-line contract (the same for every method):
  --data PATH      torchvision folder, ImageFolder root or tarball of one (common/data.py)
  --out DIR        run directory: DIR/checkpoint.pt, DIR/log.jsonl
  --preset NAME    tiny (tests, < 1 min on 2 CPU cores) | cpu (~10 min CPU budget) |
                   gpu (the paper's recipe; the default when a GPU is present)
  --epochs --batch-size (global) --lr --backbone --width --seed   override the preset
  --resume [CKPT]  continue DIR/checkpoint.pt (or CKPT); a run directory that already holds a
                   checkpoint is resumed automatically (--fresh starts over)

Exit codes: 0 done; 2 bad config or data (nothing trained), a run folder in use by another
process, or an output that cannot be written (disk full, read-only: the previous checkpoint is
kept); 3 non-finite loss (the last good checkpoint is kept); 75 preempted by SIGTERM/SIGINT (a
checkpoint of the last finished step was written: rerun the same command to continue).
A run folder belongs to one run: OUT/.lock is locked (fcntl.flock) for the run's life.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import json
import math
import os
import shlex
import signal
import socket
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils.data import DistributedSampler

from common import data as data_module
from common import dist as D
from common.data import DEFAULT_DATA, DataError
from common.outputs import WriteError, check_output_dir, os_error_reason

EXIT_CONFIG, EXIT_NONFINITE, EXIT_PREEMPTED = 2, 3, 75
# Config keys that may change when a run is resumed (everything else must match).
RESUMABLE_CHANGES = set(
    "out resume fresh device preset log_every eval_every ckpt_every ckpt_minutes max_steps "
    "keep_last data data_path knn_bank dist_timeout skip_nonfinite limit_test compile".split()
)
LOCK_FILE = ".lock"  # in OUT: flock'ed by the run that owns the folder


# --time-budget: steps BUDGET_WARM+1..BUDGET_PROBE are timed to set the run's step count, which
# is then re-fitted every BUDGET_REFIT of the budget (load on a shared machine changes).
BUDGET_WARM, BUDGET_PROBE, BUDGET_REFIT = 3, 12, 0.05
# The default per-epoch checkpoint is skipped when the last one is younger than this: an epoch
# of CIFAR-10 is 12 steps at batch 4,096 (97 at 512), seconds on 8 GPUs. (--ckpt-every N is
# obeyed as given; --ckpt-minutes bounds the work a crash can lose either way.)
CKPT_MIN_INTERVAL_S = 60.0


def clock() -> float:
    """Seconds on a monotonic clock: what the time budget and the checkpoint cadence read
    (tests replace `common.train.clock` to simulate load)."""
    return time.monotonic()


class ConfigError(ValueError):
    """A bad command-line value, reported before any work starts."""


def base_parser(
    method: str,
    description: str,
    backbones: tuple[str, ...] = ("resnet18", "resnet50"),
    presets: tuple[str, ...] = ("tiny", "cpu", "gpu"),
) -> argparse.ArgumentParser:
    """The flags every method shares. Preset-controlled flags default to None (= take preset)."""
    p = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--data", default=DEFAULT_DATA, help="dataset folder or tarball (default ./data)"
    )
    p.add_argument("--out", default=f"runs/{method}", help="run directory")
    p.add_argument("--preset", choices=presets, help="default: gpu if CUDA else cpu")
    p.add_argument("--epochs", type=int, help="training epochs")
    p.add_argument("--batch-size", type=int, help="global batch size (all ranks together)")
    p.add_argument("--lr", type=float, help="base learning rate (scaled with the global batch)")
    p.add_argument("--weight-decay", type=float, help="weight decay")
    p.add_argument("--warmup-epochs", type=float, help="linear warm-up epochs before cosine decay")
    p.add_argument("--backbone", choices=backbones, help="encoder architecture")
    p.add_argument("--width", type=int, help="ResNet stem width (64 = standard; 8-16 for CPU)")
    p.add_argument("--crop-size", type=int, help="training crop side (default: the image size)")
    p.add_argument(
        "--image-size",
        type=int,
        help="decode every image at SxS px (default: the most common size in the data)",
    )
    p.add_argument("--limit-train", type=int, help="use a fixed random subset of N train images")
    p.add_argument(
        "--limit-test", type=int, help="evaluate on a fixed random subset of N test images"
    )
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--resume", nargs="?", const="auto", help="resume OUT/checkpoint.pt or CKPT")
    p.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda when available")
    p.add_argument("--log-every", type=int, help="print/log a line every N steps")
    p.add_argument(
        "--eval-every", type=int, help="k-NN eval on the test set every N epochs (0: end)"
    )
    p.add_argument("--knn-bank", type=int, help="train images in the k-NN bank (default: all)")
    p.add_argument(
        "--ckpt-every",
        type=int,
        help="checkpoint every N steps (default: every epoch; 0: only by --ckpt-minutes)",
    )
    p.add_argument(
        "--ckpt-minutes",
        type=float,
        default=15.0,
        help="also checkpoint when this many minutes passed since the last one (0: never)",
    )
    p.add_argument("--max-steps", type=int, help="stop (with a checkpoint) after N steps in all")
    p.add_argument(
        "--time-budget",
        type=float,
        help="train for MIN minutes of wall time (replaces --epochs): the step count is set "
        "from the measured step time after the first steps, so the lr schedule ends on time",
    )
    p.add_argument("--keep-last", type=int, default=1, help="also keep the last K step checkpoints")
    p.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint in --out")
    p.add_argument(
        "--skip-nonfinite",
        action="store_true",
        help="skip a step with a non-finite loss (default: stop)",
    )
    p.add_argument(
        "--dist-timeout", type=int, default=600, help="seconds before a collective fails"
    )
    return p


def apply_preset(args: argparse.Namespace, presets: dict[str, dict]) -> argparse.Namespace:
    """Fill every flag left at None from the chosen preset; explicit flags win."""
    if args.preset is None:
        args.preset = "gpu" if torch.cuda.is_available() and args.device != "cpu" else "cpu"
    for k, v in presets[args.preset].items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


SEED_MODULUS = 1 << 63  # torch generators take seeds below 2^64; derived seeds add to them


def check_range(
    args: argparse.Namespace,
    name: str,
    lo: float,
    hi: float = math.inf,
    lo_open: bool = False,
    hi_open: bool = False,
) -> None:
    """Raise ConfigError unless args.<name> (when given, i.e. not None) lies in the range, and
    is a finite number: NaN compares False with everything and would slip through `<` checks.
    (An infinite bound is written open, "[0, inf)": inf itself is refused.)"""
    v = getattr(args, name, None)
    if v is None:
        return
    below = v <= lo if lo_open else v < lo
    above = v >= hi if hi_open else v > hi
    if not math.isfinite(v) or below or above:
        lb = "(" if lo_open or lo == -math.inf else "["
        rb = ")" if hi_open or hi == math.inf else "]"
        raise ConfigError(f"--{name.replace('_', '-')} must be in {lb}{lo}, {hi}{rb}, got {v}")


def check_finite(args: argparse.Namespace) -> None:
    """Every float flag (and every float in a list flag) must be a finite number: a NaN or inf
    would train or evaluate to a silent NaN result. Flags with a range are checked by
    check_range first, which names the range."""
    for k, v in vars(args).items():
        values = v if isinstance(v, (list, tuple)) else [v]
        for x in values:
            if isinstance(x, float) and not math.isfinite(x):
                raise ConfigError(f"--{k.replace('_', '-')} must be a finite number, got {x}")


def check_args(args: argparse.Namespace, world_size: int) -> None:
    """Reject invalid numbers before any work starts (and before any folder or output)."""
    positive = ["epochs", "batch_size", "width", "log_every", "keep_last", "dist_timeout"]
    positive += ["limit_train", "limit_test", "knn_bank", "crop_size", "image_size"]
    for k in positive:
        v = getattr(args, k, None)
        if v is not None and v <= 0:
            raise ConfigError(f"--{k.replace('_', '-')} must be > 0, got {v}")
    for k in ["eval_every", "ckpt_every", "max_steps"]:
        v = getattr(args, k, None)
        if v is not None and v < 0:
            raise ConfigError(f"--{k.replace('_', '-')} must be >= 0, got {v}")
    check_range(args, "lr", 0)
    check_range(args, "weight_decay", 0)
    check_range(args, "warmup_epochs", 0)
    check_range(args, "ckpt_minutes", 0)
    check_range(args, "time_budget", 0, lo_open=True)
    check_range(args, "temperature", 0, lo_open=True)
    check_range(args, "momentum", 0, 1, hi_open=True)
    check_finite(args)  # the float flags of each script's own that have no range check
    # Any integer is a valid seed; reduce it so that every generator seeded from it (with rank,
    # step or epoch added) stays in range. Seeds below 2^63 are unchanged.
    args.seed = args.seed % SEED_MODULUS
    if args.batch_size % world_size:
        raise ConfigError(
            f"--batch-size {args.batch_size} is not divisible by the world size {world_size}"
        )
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda, but no CUDA device is available")


def run_cli(main: Callable[[argparse.Namespace], object], args: argparse.Namespace) -> None:
    """Run main(args) and map failures to one clear line and an exit code (module doc). A run
    that fails before its first checkpoint leaves no run folder behind (release_run_dir)."""
    code = 1  # an unexpected exception: Python's traceback and exit code 1
    try:
        result = main(args)
        code = 0
        if isinstance(result, dict) and result.get("stopped") == "preempted":
            code = EXIT_PREEMPTED
    except (DataError, ConfigError, D.DistInitError, WriteError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        code = EXIT_CONFIG
    except FloatingPointError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        code = EXIT_NONFINITE
    except OSError as e:  # writing the log or reading data: disk full, read-only, I/O error
        if os_error_reason(e) is None:
            raise
        print(f"error: {e.filename or 'writing an output'}: {os_error_reason(e)}", file=sys.stderr)
        code = EXIT_CONFIG
    finally:
        release_run_dir(failed=code not in (0, EXIT_PREEMPTED))
        D.cleanup()
    sys.exit(code)


def one_line(e: BaseException) -> str:
    """An exception's message on one line (a library's multi-line message, folded)."""
    return " ".join(str(e).split())


# --------------------------------------------------------------------------- the run folder
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
    from common.checkpoint import remove_stale_temps

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


def lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    """Linear warm-up from 0 to `peak` over `warmup` steps, then cosine decay to 0."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def step_generator(
    seed: int, rank: int, step: int, device: torch.device | str | None = None
) -> torch.Generator:
    """Augmentation randomness as a pure function of (seed, rank, step): resumes reproduce it
    with no generator state to save, and no two ranks or steps share a stream. `device`: the
    generator's device (default CPU); a CUDA generator draws the parameters on the GPU, with
    no host work or copy per step (its seed is set on the host, no sync)."""
    mixed = (seed * 1_000_003 + rank) * 1_000_000_007 + step
    return torch.Generator(device=device or "cpu").manual_seed(mixed % SEED_MODULUS)


class BatchFeed:
    """Per-rank batches of uint8 images [b, H, W, 3] on the device, by epoch and step.

    Small datasets (CIFAR: 150 MB) move to the GPU once; indexing replaces a DataLoader. The
    shuffle is DistributedSampler's (seeded, `set_epoch`), so every rank sees a disjoint shard.
    """

    def __init__(self, images: torch.Tensor, global_batch: int, device: torch.device, seed: int):
        ws, rank = D.get_world_size(), D.get_rank()
        self.local_batch = global_batch // ws
        self.steps_per_epoch = len(images) // global_batch
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"--batch-size {global_batch} is larger than the training set ({len(images)})"
            )
        on_device = device.type == "cuda" and images.numel() < (4 << 30)
        self.images = images.to(device) if on_device else images
        self.pin = device.type == "cuda" and not on_device
        self.device = device
        self.sampler = DistributedSampler(
            range(len(images)), num_replicas=ws, rank=rank, shuffle=True, seed=seed, drop_last=True
        )

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[torch.Tensor]:
        self.sampler.set_epoch(epoch)
        order = torch.tensor(list(self.sampler))  # [len / world] this rank's shuffle (CPU)
        if self.images.is_cuda:  # one asynchronous copy per epoch, none per step
            order = order.pin_memory().to(self.images.device, non_blocking=True)
        for i in range(start_step, self.steps_per_epoch):
            idx = order[i * self.local_batch : (i + 1) * self.local_batch]
            x = self.images[idx]
            if self.pin:
                x = x.pin_memory()
            yield x.to(self.device, non_blocking=True)


class Logger:
    """Rank 0 prints a line every `every` steps and appends JSON records to OUT/log.jsonl."""

    def __init__(self, out: Path, total_steps: int, every: int, start_step: int = 0):
        self.path = out / "log.jsonl"
        self.total, self.every = total_steps, every
        self.t0, self.s0 = time.time(), start_step
        self.t_last, self.s_last = self.t0, start_step

    def write(self, record: dict) -> None:
        if D.is_main():
            try:
                with open(self.path, "a") as f:
                    f.write(json.dumps(record) + "\n")
            except OSError as e:  # disk full, read-only: one line, exit code 2 (run_cli)
                raise WriteError(f"cannot write {self.path}: {os_error_reason(e)}") from None

    def step(self, step: int, epoch: int, images_per_step: int, **metrics: float) -> None:
        """Call after step `step` (1-based count of finished steps)."""
        if step % self.every and step != self.total:
            return
        now = time.time()
        ips = (step - self.s_last) * images_per_step / max(now - self.t_last, 1e-9)
        rate = (step - self.s0) / max(now - self.t0, 1e-9)
        eta = (self.total - step) / max(rate, 1e-9)
        self.t_last, self.s_last = now, step
        rec = {"step": step, "epoch": epoch, **metrics, "img_per_s": ips, "eta_s": eta}
        self.write(rec)
        if D.is_main():
            vals = " ".join(
                f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()
            )
            print(
                f"step {step}/{self.total} epoch {epoch} {vals} img/s {ips:.0f} "
                f"eta {time.strftime('%H:%M:%S', time.gmtime(eta))}",
                flush=True,
            )


def place_model(model: nn.Module, device: torch.device) -> nn.Module:
    """The model as every script trains it: BatchNorm synchronised across ranks (GlobalBatchNorm
    on gloo, SyncBatchNorm on GPUs; common/dist.py), on the device, channels_last on CUDA."""
    model = D.convert_global_bn(model, device).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model


def compile_model(model: nn.Module, enabled: bool) -> Callable[..., object]:
    """`torch.compile(model)` when enabled, else the model. Compilation happens at the first
    call; if it fails there (no compiler, an unsupported op, a Triton error) this warns once
    and runs the model eagerly from then on. Errors after a first successful call are the
    model's own and are raised."""
    if not enabled:
        return model
    try:
        fast = torch.compile(model)
    except Exception as e:  # (torch.compile itself refused: e.g. an unsupported Python)
        warnings.warn(f"torch.compile unavailable ({e}); running eagerly", stacklevel=2)
        return model
    state = {"fn": fast, "proven": False}

    def call(*args, **kwargs):
        if state["proven"] or state["fn"] is model:
            return state["fn"](*args, **kwargs)
        try:
            out = state["fn"](*args, **kwargs)
        except Exception as e:
            warnings.warn(
                f"torch.compile failed ({type(e).__name__}: {str(e)[:300]}); running eagerly",
                stacklevel=2,
            )
            state["fn"] = model
            return model(*args, **kwargs)
        state["proven"] = True
        return out

    return call


def decay_groups(model: nn.Module) -> list[dict]:
    """SGD parameter groups: weight decay on weights, none on biases and BN (the 1-D tensors)."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    rest = [p for p in model.parameters() if p.ndim <= 1]
    return [{"params": decay}, {"params": rest, "weight_decay": 0.0}]


class TrainRun:
    """The bookkeeping every method's training loop shares, so that each script keeps only its
    method: resume, the lr schedule, the step/epoch counters, logging, periodic and final
    checkpoints, `--max-steps`, and a stop on a non-finite loss. Used as

        run = TrainRun(args, out, "simclr", backbone=..., head=..., optimizer=opt,
                       steps_per_epoch=feed.steps_per_epoch, peak_lr=peak_lr)
        for images in run.batches(feed, evaluate):
            lr = run.set_lr(opt)
            loss = ...; loss.backward(); opt.step()
            run.step_done(loss, lr=lr)
        return run.finish(knn_top1=evaluate(args.epochs))
    """

    def __init__(
        self,
        args: argparse.Namespace,
        out: Path,
        method: str,
        *,
        backbone: torch.nn.Module,
        head: torch.nn.Module | None,
        optimizer: torch.optim.Optimizer,
        steps_per_epoch: int,
        peak_lr: float,
    ):
        self.args, self.out, self.method = args, out, method
        self.backbone, self.head, self.optimizer = backbone, head, optimizer
        self.steps_per_epoch = steps_per_epoch
        # Periodic checkpoints by default: every epoch but at most one per CKPT_MIN_INTERVAL_S,
        # and at least every --ckpt-minutes of wall time, so that a crash (OOM, NCCL timeout,
        # SIGKILL) loses little and short epochs do not spend the run writing checkpoints.
        self.ckpt_every = steps_per_epoch if args.ckpt_every is None else args.ckpt_every
        self._ckpt_rate_limited = args.ckpt_every is None
        self.total = args.epochs * steps_per_epoch
        self.warmup = round(args.warmup_epochs * steps_per_epoch)
        # --time-budget: `total` is provisional until BUDGET_PROBE steps have been timed; the
        # warm-up (which does not depend on `total`) should cover them.
        self.budgeted = getattr(args, "time_budget", None) is not None
        self._t_probe: float | None = None
        # The budget's cosine is anchored at the last re-fit: from step `_anchor` (progress
        # `_anchor_t`) it runs to progress 1 on the last step, so lr stays continuous when the
        # step count changes and is exactly 0 on the final step. `_fitted`: a step count was
        # settled (a resumed run keeps it and does not re-time itself).
        self._anchor, self._anchor_t, self._fitted = self.warmup, 0.0, False
        self._t_fit = self._fit_step = None
        self._fitted_on_resume = False
        self.peak_lr = peak_lr
        self.step = 0
        self.stopped: str | None = None
        self.skipped = 0
        self._flags: dict | None = None  # this step's synced flags (see _sync)
        ckpt = resume_path(args, out)
        if ckpt is not None:
            self._load(ckpt)
        if D.get_world_size() > 1:  # every rank must resume the same checkpoint
            steps = [None] * D.get_world_size()
            torch.distributed.all_gather_object(steps, self.step)
            if len(set(steps)) > 1:
                raise ConfigError(
                    f"ranks resume from different steps {steps}: is --out {out} on a "
                    "filesystem that every node sees?"
                )
        # All flags are checked and the data loaded: only now create OUT and print the config.
        if D.is_main():
            from common.checkpoint import data_preprocess  # saved with every checkpoint

            try:  # mean/std of the train split (cached by now); export.py reads them
                self.preprocess = data_preprocess(vars(args))
            except (DataError, OSError):  # data not on disk (in-memory tests): none stored
                self.preprocess = None
            out.mkdir(parents=True, exist_ok=True)
            cfg = json.dumps(vars(args))
            print(f"config: {cfg} world_size {D.get_world_size()}", flush=True)
        D.barrier()
        self._signal: int | None = None
        self._install_signal_handlers()
        self.log = Logger(out, self.total, args.log_every, start_step=self.step)
        self.t0 = self.t_last_step = self._t_saved = clock()
        self._saved_step = self.step if ckpt is not None else -1
        self._saved_periodic = False  # the first per-epoch checkpoint is never rate-limited

    @property
    def epoch(self) -> int:
        return self.step // self.steps_per_epoch

    @property
    def schedule(self) -> dict:
        sched = {
            "kind": "warmup_cosine",
            "peak_lr": self.peak_lr,
            "warmup": self.warmup,
            "total": self.total,
        }
        if self.budgeted:
            sched.update(anchor=self._anchor, anchor_t=self._anchor_t, fitted=self._fitted)
        return sched

    def lr_at_step(self, step: int) -> float:
        """This run's lr at `step`: lr_at's warm-up and cosine; with --time-budget the cosine
        is re-anchored at each re-fit and reaches 0 exactly on the last step."""
        if not self.budgeted or step < self.warmup:
            return lr_at(step, self.total, self.warmup, self.peak_lr)
        return self.peak_lr * 0.5 * (1 + math.cos(math.pi * self._progress(step)))

    def _progress(self, step: int) -> float:
        """Cosine progress in [0, 1] of a budgeted run at `step` (1 on step total - 1)."""
        a, ta = self._anchor, self._anchor_t
        if step <= a:
            return ta
        return min(1.0, ta + (1 - ta) * (step - a) / max(1, self.total - 1 - a))

    def _load(self, path: Path) -> None:
        from common.checkpoint import load_checkpoint

        state = _preloaded[1] if _preloaded and _preloaded[0] == path else load_checkpoint(path)
        if state["method"] != self.method:
            raise ConfigError(f"--resume {path}: a {state['method']} checkpoint, not {self.method}")
        now = vars(self.args)
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
        sched = state["scheduler"]
        if self.budgeted and (sched.get("fitted") or state["step"] >= BUDGET_PROBE):
            self.total = sched["total"]  # the step count and schedule it settled on
            self._anchor = sched.get("anchor", self.warmup)
            self._anchor_t = sched.get("anchor_t", 0.0)
            self._fitted = self._fitted_on_resume = True
        self.backbone.load_state_dict(state["backbone"])
        if self.head is not None:
            self.head.load_state_dict(state["head"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = state["step"]
        if D.get_rank() == 0:  # augmentation streams derive from (seed, rank, step); these
            from common.checkpoint import set_rng_state  # cover any other use of the globals

            set_rng_state(state["rng"])
        if D.is_main():
            print(f"resumed from {path} at step {self.step}", flush=True)

    def _install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT (how SLURM and others preempt) ask for a stop after the current step;
        a second SIGINT interrupts at once."""
        self._old_handlers = {}
        if threading.current_thread() is not threading.main_thread():
            return

        def handler(signum, frame):
            if self._signal is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self._signal = signum
            if os.environ.get("LOCAL_RANK", "0") == "0":  # one line per node that got it
                name = signal.Signals(signum).name
                print(f"rank {D.get_rank()}: received {name}: stopping after this step", flush=True)

        self._old_handlers = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}

    def _sync(self, loss: torch.Tensor, metrics: dict[str, torch.Tensor] | None = None) -> dict:
        """This step's one host sync: whether the loss is finite, whether a stop signal arrived,
        the clock's decisions (a timed checkpoint is due, a per-epoch one is allowed, the time
        budget is due for a re-fit) and the loss averaged over ranks, all in one all-reduce
        (SUM) and one device-to-host copy; every rank then takes the same branch. The clock
        decisions are rank 0's alone (the others add 0), so that no two clocks disagree."""
        timed = [0.0, 0.0, 0.0]
        if D.is_main():
            now = clock()
            since = now - self._t_saved
            m = self.args.ckpt_minutes
            timed = [
                float(m > 0 and since >= 60 * m),
                float(not self._saved_periodic or since >= CKPT_MIN_INTERVAL_S),
                float(self._refit_due(now)),
            ]
        loss = loss.detach().float()
        host = torch.tensor([float(self._signal is not None), *timed])  # [4] (CPU)
        # One copy of the host flags (pinned: an async copy, no sync of its own) next to the
        # two device values; nothing here reads the device until .tolist().
        if loss.device.type == "cuda":
            host = host.pin_memory()
        flags = torch.cat(
            [(~torch.isfinite(loss).all()).float()[None], host.to(loss.device, non_blocking=True)]
        )
        names = list(metrics or {})  # device scalars to log, averaged over ranks like the loss
        extra = [metrics[k].detach().float().reshape(1) for k in names]
        flags = torch.cat([flags, loss.mean()[None], *extra])  # [6 + len(metrics)]
        if D.get_world_size() > 1:
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.SUM)
        # The sync: one device-to-host copy (what .tolist() does on a GPU tensor, made explicit)
        nonfinite, signal_, due_, periodic_ok, refit, loss_sum, *values = flags.cpu().tolist()
        return {
            "metrics": {k: v / D.get_world_size() for k, v in zip(names, values)},
            "nonfinite": nonfinite > 0,
            "signal": signal_ > 0,
            "ckpt_due": due_ > 0,
            "periodic_ok": periodic_ok > 0,
            "refit": refit > 0,
            "loss": loss_sum / D.get_world_size(),
        }

    def nonfinite(self, loss: torch.Tensor, **metrics: torch.Tensor) -> bool:
        """Call before backward. False for a finite loss. Otherwise stops the run (exit code 3,
        the last checkpoint untouched) or, with --skip-nonfinite, counts the step as skipped
        and returns True: the caller then `continue`s without an update. `metrics`: device
        scalars to log with this step (read in the same sync, averaged over ranks)."""
        self._flags = self._sync(loss, metrics)
        if not self._flags["nonfinite"]:
            return False
        self._flags = None
        if not self.args.skip_nonfinite:
            kept = (
                f"the last good checkpoint is {self.out / 'checkpoint.pt'}"
                if self._saved_step >= 0
                else "before the first checkpoint, so nothing was saved (try a lower --lr)"
            )
            raise FloatingPointError(
                f"non-finite loss at step {self.step} (epoch {self.epoch}); stopped, {kept} "
                "(--skip-nonfinite skips such steps)"
            )
        self.skipped += 1
        self.log.write({"step": self.step, "skipped_nonfinite": self.skipped})
        if D.is_main():
            print(
                f"step {self.step}: non-finite loss, update skipped ({self.skipped} so far)",
                flush=True,
            )
        self.step += 1
        return True

    def set_lr(self, optimizer: torch.optim.Optimizer) -> float:
        """Set this step's lr (times a group's `lr_scale`, e.g. layer-wise decay); return it."""
        lr = self.lr_at_step(self.step)
        for g in optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        return lr

    def batches(self, feed: BatchFeed, evaluate: Callable[[int], object] | None = None):
        """This rank's batches from the current step to the end (or a stop); after every
        `--eval-every`-th full epoch but the last, calls evaluate(number of finished epochs)
        (the last epoch's evaluation is the script's final one)."""
        every = self.args.eval_every
        while self.step < self.total and not self.stopped:
            for x in feed.epoch(self.epoch, start_step=self.step % self.steps_per_epoch):
                yield x
                if self.stopped:
                    return
                if self.step >= self.total:  # a --time-budget run may end mid-epoch
                    break
            if evaluate and every and self.epoch % every == 0 and self.step < self.total:
                evaluate(self.epoch)
        if not self.stopped and self._saved_step != self.step:
            self.save()  # the final weights are safe before the script's final evaluation
        if self.budgeted and not self.stopped:
            # The scripts' final evaluation is evaluate(args.epochs): name the epochs trained
            # (4.5), not the preset's count the budget replaced (100). The checkpoint is saved.
            self.args.epochs = round(self.step / self.steps_per_epoch, 2)

    def step_done(self, loss: torch.Tensor, **metrics: float) -> None:
        """Count the finished step; log, checkpoint or stop when due. Uses the flags synced by
        nonfinite() (called by the script before its update), so a step costs one host sync."""
        flags = self._flags
        if flags is None:  # the script did not call nonfinite() before its update
            if self.nonfinite(loss):
                return  # skipped (--skip-nonfinite): counted, nothing else to do
            flags = self._flags
        self._flags = None
        self.step += 1
        self.t_last_step = clock()
        if self.budgeted:
            self._settle_budget(flags["refit"])
        if self.step % self.args.log_every == 0 or self.step == self.total:
            epoch = (self.step - 1) // self.steps_per_epoch  # the epoch this step belonged to
            metrics = {**flags["metrics"], **metrics}
            self.log.step(self.step, epoch, self.args.batch_size, loss=flags["loss"], **metrics)
        periodic = self.ckpt_every and self.step % self.ckpt_every == 0
        if periodic and self._ckpt_rate_limited:
            periodic = flags["periodic_ok"]
        if (periodic or flags["ckpt_due"]) and self.step < self.total:
            self._saved_periodic = self._saved_periodic or bool(periodic)
            self.save()  # (the last step's checkpoint is written by batches())
        if self.args.max_steps and self.step >= self.args.max_steps and self.step < self.total:
            self.stopped = "max_steps"
        elif flags["signal"] and self.step < self.total:
            self.stopped = "preempted"
        if self.stopped and self._saved_step != self.step:
            self.save()

    def _refit_due(self, now: float) -> bool:
        """(Rank 0) --time-budget: BUDGET_REFIT of the budget passed since the last fit."""
        if not self.budgeted or self._t_fit is None or self._fitted_on_resume:
            return False
        return now - self._t_fit >= BUDGET_REFIT * 60 * self.args.time_budget

    def _settle_budget(self, refit: bool) -> None:
        """--time-budget: after BUDGET_PROBE steps (timing the last ones, past the first steps'
        allocations, cudnn autotuning or compilation), set `total` so that training ends when
        the budget, counted from the start of training, is spent; then, every BUDGET_REFIT of
        the budget, re-time the steps since the last fit and re-fit the steps left, keeping
        the cosine continuous and ending at lr 0 on the last step. Rank 0 decides for all."""
        if self._fitted_on_resume:
            return  # a resumed run keeps what it settled (its first session's clock is gone)
        if self._t_probe is None and BUDGET_WARM <= self.step < BUDGET_PROBE:
            self._t_probe, self._probe_from = clock(), self.step  # (or where a run resumed)
        first = self.step == BUDGET_PROBE and self._t_probe is not None
        if not (first or (refit and self._t_fit is not None)):
            return
        now = clock()
        t_from, s_from = (
            (self._t_probe, self._probe_from) if first else (self._t_fit, self._fit_step)
        )
        per_step = (now - t_from) / max(1, self.step - s_from)
        left = 60 * self.args.time_budget - (now - self.t0)
        # At least one more step: the step the schedule's lr 0 lands on; but once the budget is
        # spent a re-fit never moves the end further out (else every re-fit adds that step).
        steps_left = int(left / max(per_step, 1e-9))
        total = self.step + max(1, steps_left)
        if not first and steps_left < 1:
            total = min(total, self.total)
        progress = self._progress(self.step) if self.step >= self.warmup else None
        total = D.broadcast_object(total)
        if progress is not None:  # re-anchor: step `self.step` keeps the lr it would have had
            self._anchor, self._anchor_t = self.step, progress
        self.total = self.log.total = total
        self._t_fit, self._fit_step, self._fitted = now, self.step, True
        if D.is_main() and first:
            print(
                f"time budget {self.args.time_budget:g} min: {per_step:.3f} s/step, "
                f"{self.total} steps ({self.total / self.steps_per_epoch:.2f} epochs); "
                f"re-fitted every {BUDGET_REFIT * self.args.time_budget:.2g} min",
                flush=True,
            )

    def save(self) -> None:
        """OUT/checkpoint.pt (atomic), plus OUT/checkpoint-STEP.pt for the last --keep-last > 1."""
        self._saved_step, self._t_saved = self.step, clock()
        if D.is_main():
            self._write_checkpoint()
        # Every rank calls save() at the same step. No rank goes on (or exits, letting torchrun
        # or srun tear the job down) before rank 0's checkpoint is on disk.
        D.barrier()

    def _write_checkpoint(self) -> None:
        from common.checkpoint import save_checkpoint

        path = self.out / "checkpoint.pt"
        save_checkpoint(
            path,
            method=self.method,
            backbone=self.backbone,
            head=self.head,
            optimizer=self.optimizer,
            scheduler=self.schedule,
            step=self.step,
            epoch=self.epoch,
            config=vars(self.args),
            extra={"preprocess": self.preprocess},
        )
        if self.args.keep_last > 1:  # a hard link: no second write, and atomic
            kept = self.out / f"checkpoint-{self.step:08d}.pt"
            try:
                kept.unlink(missing_ok=True)
                os.link(path, kept)
                for old in sorted(self.out.glob("checkpoint-*.pt"))[: -self.args.keep_last]:
                    old.unlink()
            except OSError as e:
                raise WriteError(f"cannot write {kept}: {os_error_reason(e)}") from None

    def finish(self, **results: float | str) -> dict:
        """Final checkpoint (unless stopped early, which already saved) and the result line."""
        for sig, old in self._old_handlers.items():  # hand signals back (in-process callers)
            signal.signal(sig, old)
        if not self.stopped and self._saved_step != self.step:
            self.save()
        seconds = clock() - self.t0
        images = (self.step - self.log.s0) * self.args.batch_size  # trained this session
        n_params = sum(
            p.numel() for m in (self.backbone, self.head) if m is not None for p in m.parameters()
        )
        result = {
            "command": launch_command(self.method),
            "method": self.method,
            "epochs": round(self.step / self.steps_per_epoch, 2)
            if self.budgeted
            else self.args.epochs,
            "steps": self.step,
            **results,
            # Efficiency (this process; the images/s of the whole job, all ranks together)
            "train_minutes": round((self.t_last_step - self.t0) / 60, 2),  # to the last step
            "total_minutes": round(seconds / 60, 2),  # with the final evaluation
            "img_per_s": round(images / max(self.t_last_step - self.t0, 1e-9), 1),  # training
            "peak_mem_gib": round(peak_memory_gib(), 3),
            "params_m": round(n_params / 1e6, 3),
        }
        if self.stopped:
            result["stopped"] = self.stopped
        if self.skipped:
            result["skipped_nonfinite"] = self.skipped
        self.log.write({"result": result})
        if D.is_main():
            print(json.dumps(result), flush=True)
        if _run_dir is not None and _run_dir["out"] == self.out:
            release_run_dir(failed=False)
        return result


def launch_command(method: str) -> str | None:
    """The command line that ran this method's script (`torchrun` keeps the script as argv[0]),
    or None when main() was called in-process (tests, notebooks): argv is then someone else's."""
    if Path(sys.argv[0]).name != f"{method}.py":
        return None
    return shlex.join(["python", *sys.argv])


def peak_memory_gib() -> float:
    """Peak memory of this process: CUDA max allocated on a GPU, else the peak RSS."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def setup_run(args: argparse.Namespace) -> tuple[torch.device, Path]:
    """Validate args, initialise distributed, seed; returns (device, out_dir).

    OUT is not created here: TrainRun creates it and prints the config once the script has
    loaded its data and checked its own flags, so that a run stopped by bad input (exit 2)
    leaves no empty run folder and prints nothing but its error."""
    check_args(args, int(os.environ.get("WORLD_SIZE", "1")))  # before any work
    out = Path(args.out)
    check_output_dir(out, "--out")  # a file, under a file, read-only: before any data is read
    device = D.init_distributed(args.device, timeout_s=getattr(args, "dist_timeout", 600))
    check_same_config(args)
    data_module.requested_image_size = getattr(args, "image_size", None)
    # Where the data is, whatever the folder a probe later runs from (--data may be relative).
    args.data_path = os.path.abspath(args.data)
    if D.get_rank() == 0:
        lock_run_dir(out)  # OUT/.lock for the run's life; a second process stops here
    check_resume(args, out)  # a checkpoint that cannot be resumed stops before any data
    torch.manual_seed(args.seed + D.get_rank())
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return device, out


def check_resume(args: argparse.Namespace, out: Path) -> None:
    """Load the checkpoint the run would resume (weights_only) before any data is read: a
    truncated, foreign or malicious file stops here with ConfigError naming it."""
    global _preloaded
    from common.checkpoint import load_checkpoint

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
    if D.get_world_size() == 1:
        return
    mine = {k: v for k, v in vars(args).items() if k != "device"}
    configs = [None] * D.get_world_size()
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
