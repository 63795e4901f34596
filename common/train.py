"""The training loop's bookkeeping that every method script shares, so that each script keeps
only its method: the data feed, logging with img/s and ETA, placing and compiling the model,
and `TrainRun` (resume, the step and epoch counters, periodic and final checkpoints,
signals, the stop on a non-finite loss, the one host sync per step).

Owns: what happens between a script's `setup_run` and its result line. The command line and
exit codes are common/cli.py's, the run folder and resume checks common/rundir.py's, the lr
schedule and the time budget common/schedule.py's.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn

from common import checkpoint, dist, rundir
from common import data as data_module
from common.cli import ConfigError, check_args
from common.data import DataError
from common.feed import BatchFeed
from common.outputs import WriteError, check_output_dir, os_error_reason
from common.schedule import BUDGET_REFIT, LrSchedule

# The default per-epoch checkpoint is skipped when the last one is younger than this: an epoch
# of CIFAR-10 is 12 steps at batch 4,096 (97 at 512), seconds on 8 GPUs. (--ckpt-every N is
# obeyed as given; --ckpt-minutes bounds the work a crash can lose either way.)
CKPT_MIN_INTERVAL_S = 60.0


def clock() -> float:
    """Seconds on a monotonic clock: what the time budget and the checkpoint cadence read
    (tests replace `common.train.clock` to simulate load)."""
    return time.monotonic()


def setup_run(args: argparse.Namespace) -> tuple[torch.device, Path]:
    """Validate args, initialise distributed, seed; returns (device, out_dir).

    OUT is not created here: TrainRun creates it and prints the config once the script has
    loaded its data and checked its own flags, so that a run stopped by bad input (exit 2)
    leaves no empty run folder and prints nothing but its error."""
    check_args(args, int(os.environ.get("WORLD_SIZE", "1")))  # before any work
    out = Path(args.out)
    check_output_dir(out, "--out")  # a file, under a file, read-only: before any data is read
    device = dist.init_distributed(args.device, timeout_s=getattr(args, "dist_timeout", 600))
    rundir.check_same_config(args)
    data_module.requested_image_size = getattr(args, "image_size", None)
    # Where the data is, whatever the folder a probe later runs from (--data may be relative).
    args.data_path = os.path.abspath(args.data)
    if dist.get_rank() == 0:
        rundir.lock_run_dir(out)  # OUT/.lock for the run's life; a second process stops here
    rundir.check_resume(args, out)  # a checkpoint that cannot be resumed stops before any data
    torch.manual_seed(args.seed + dist.get_rank())
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return device, out


class Logger:
    """Rank 0 prints a line every `every` steps and appends JSON records to OUT/log.jsonl.
    `derived_metrics(metrics) -> dict`: more values computed from a line's own (host floats,
    so no extra sync), e.g. SimCLR's InfoNCE bound from its loss."""

    def __init__(
        self,
        out: Path,
        total_steps: int,
        every: int,
        start_step: int = 0,
        derived_metrics: Callable[[dict[str, float]], dict[str, float]] | None = None,
    ):
        self.path = out / "log.jsonl"
        self.total, self.every = total_steps, every
        self.derived_metrics = derived_metrics
        self.t0, self.s0 = time.time(), start_step
        self.t_last, self.s_last = self.t0, start_step

    def write(self, record: dict) -> None:
        if dist.is_main():
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
        if self.derived_metrics is not None:
            metrics = {**metrics, **self.derived_metrics(metrics)}
        rec = {"step": step, "epoch": epoch, **metrics, "img_per_s": ips, "eta_s": eta}
        self.write(rec)
        if dist.is_main():
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
    model = dist.convert_global_bn(model, device).to(device)
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

    `derived_metrics`: see Logger.
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
        derived_metrics: Callable[[dict[str, float]], dict[str, float]] | None = None,
    ):
        self.args, self.out, self.method = args, out, method
        self.backbone, self.head, self.optimizer = backbone, head, optimizer
        self.steps_per_epoch = steps_per_epoch
        # Periodic checkpoints by default: every epoch but at most one per CKPT_MIN_INTERVAL_S,
        # and at least every --ckpt-minutes of wall time, so that a crash (OOM, NCCL timeout,
        # SIGKILL) loses little and short epochs do not spend the run writing checkpoints.
        self.ckpt_every = steps_per_epoch if args.ckpt_every is None else args.ckpt_every
        self._ckpt_rate_limited = args.ckpt_every is None
        # lr schedule: warm-up + cosine; with --time-budget its length is fitted to the budget
        self.schedule = LrSchedule(
            peak_lr,
            warmup=round(args.warmup_epochs * steps_per_epoch),
            total=args.epochs * steps_per_epoch,
            budget_min=getattr(args, "time_budget", None),
        )
        self.step = 0
        self.stopped: str | None = None
        self.skipped = 0
        self._flags: dict | None = None  # this step's synced flags (see _sync)
        ckpt = rundir.resume_path(args, out)
        if ckpt is not None:
            self._load(ckpt)
        if dist.get_world_size() > 1:  # every rank must resume the same checkpoint
            steps = [None] * dist.get_world_size()
            torch.distributed.all_gather_object(steps, self.step)
            if len(set(steps)) > 1:
                raise ConfigError(
                    f"ranks resume from different steps {steps}: is --out {out} on a "
                    "filesystem that every node sees?"
                )
        # All flags are checked and the data loaded: only now create OUT and print the config.
        if dist.is_main():
            try:  # mean/std of the train split (cached by now); export.py reads them
                self.preprocess = checkpoint.data_preprocess(vars(args))
            except (DataError, OSError):  # data not on disk (in-memory tests): none stored
                self.preprocess = None
            out.mkdir(parents=True, exist_ok=True)
            cfg = json.dumps(vars(args))
            print(f"config: {cfg} world_size {dist.get_world_size()}", flush=True)
        dist.barrier()
        self._signal: int | None = None
        self._install_signal_handlers()
        self.log = Logger(out, self.total, args.log_every, self.step, derived_metrics)
        self.t0 = self.t_last_step = self._t_saved = clock()
        self._saved_step = self.step if ckpt is not None else -1
        self._saved_periodic = False  # the first per-epoch checkpoint is never rate-limited

    @property
    def epoch(self) -> int:
        return self.step // self.steps_per_epoch

    @property
    def total(self) -> int:
        """Steps in the whole run (with --time-budget: as last fitted)."""
        return self.schedule.total

    @property
    def budgeted(self) -> bool:
        return self.schedule.budgeted

    def _load(self, path: Path) -> None:
        state = rundir.resume_state(path)  # (loaded once, by setup_run's check_resume)
        rundir.check_resumable(state, self.args, self.method, path)
        self.schedule.load_state_dict(state["scheduler"], state["step"])
        self.backbone.load_state_dict(state["backbone"])
        if self.head is not None:
            self.head.load_state_dict(state["head"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = state["step"]
        if dist.get_rank() == 0:  # augmentation streams derive from (seed, rank, step); these
            checkpoint.set_rng_state(state["rng"])
        if dist.is_main():
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
                print(
                    f"rank {dist.get_rank()}: received {name}: stopping after this step", flush=True
                )

        self._old_handlers = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}

    def _sync(self, loss: torch.Tensor, metrics: dict[str, torch.Tensor] | None = None) -> dict:
        """This step's one host sync: whether the loss is finite, whether a stop signal arrived,
        the clock's decisions (a timed checkpoint is due, a per-epoch one is allowed, the time
        budget is due for a re-fit) and the loss averaged over ranks, all in one all-reduce
        (SUM) and one device-to-host copy; every rank then takes the same branch. The clock
        decisions are rank 0's alone (the others add 0), so that no two clocks disagree."""
        timed = [0.0, 0.0, 0.0]
        if dist.is_main():
            now = clock()
            since = now - self._t_saved
            m = self.args.ckpt_minutes
            timed = [
                float(m > 0 and since >= 60 * m),
                float(not self._saved_periodic or since >= CKPT_MIN_INTERVAL_S),
                float(self.schedule.refit_due(now)),
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
        if dist.get_world_size() > 1:
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.SUM)
        # The sync: one device-to-host copy (what .tolist() does on a GPU tensor, made explicit)
        nonfinite, signal_, due_, periodic_ok, refit, loss_sum, *values = flags.cpu().tolist()
        return {
            "metrics": {k: v / dist.get_world_size() for k, v in zip(names, values)},
            "nonfinite": nonfinite > 0,
            "signal": signal_ > 0,
            "ckpt_due": due_ > 0,
            "periodic_ok": periodic_ok > 0,
            "refit": refit > 0,
            "loss": loss_sum / dist.get_world_size(),
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
        if dist.is_main():
            print(
                f"step {self.step}: non-finite loss, update skipped ({self.skipped} so far)",
                flush=True,
            )
        self.step += 1
        return True

    def set_lr(self, optimizer: torch.optim.Optimizer) -> float:
        """Set this step's lr (times a group's `lr_scale`, e.g. layer-wise decay); return it."""
        lr = self.schedule.lr(self.step)
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

    def _settle_budget(self, refit: bool) -> None:
        """--time-budget: time the first steps, fit the step count, re-fit it when rank 0's
        clock said so (common/schedule.py); every rank takes rank 0's count."""
        per_step = self.schedule.observe(
            self.step, clock(), self.t0, refit, agree=dist.broadcast_object
        )
        self.log.total = self.total
        if dist.is_main() and per_step is not None:
            print(
                f"time budget {self.args.time_budget:g} min: {per_step:.3f} s/step, "
                f"{self.total} steps ({self.total / self.steps_per_epoch:.2f} epochs); "
                f"re-fitted every {BUDGET_REFIT * self.args.time_budget:.2g} min",
                flush=True,
            )

    def save(self) -> None:
        """OUT/checkpoint.pt (atomic), plus OUT/checkpoint-STEP.pt for the last --keep-last > 1."""
        self._saved_step, self._t_saved = self.step, clock()
        if dist.is_main():
            self._write_checkpoint()
        # Every rank calls save() at the same step. No rank goes on (or exits, letting torchrun
        # or srun tear the job down) before rank 0's checkpoint is on disk.
        dist.barrier()

    def _write_checkpoint(self) -> None:
        path = self.out / "checkpoint.pt"
        checkpoint.save_checkpoint(  # (a module attribute: tests record the saves)
            path,
            method=self.method,
            backbone=self.backbone,
            head=self.head,
            optimizer=self.optimizer,
            scheduler=self.schedule.state_dict(),
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
        if dist.is_main():
            print(json.dumps(result), flush=True)
        if rundir.holds(self.out):
            rundir.release_run_dir(failed=False)
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
