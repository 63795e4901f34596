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

Exit codes: 0 done; 2 bad config or data (nothing trained); 3 non-finite loss (the last good
checkpoint is kept); 75 preempted by SIGTERM/SIGINT (a checkpoint of the last finished step was
written: rerun the same command to continue).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils.data import DistributedSampler

from common import dist as D
from common.data import DEFAULT_DATA, DataError

EXIT_CONFIG, EXIT_NONFINITE, EXIT_PREEMPTED = 2, 3, 75
# Config keys that may change when a run is resumed (everything else must match).
RESUMABLE_CHANGES = set(
    "out resume fresh device preset log_every eval_every ckpt_every max_steps keep_last data "
    "knn_bank dist_timeout skip_nonfinite limit_test".split()
)


class ConfigError(ValueError):
    """A bad command-line value, reported before any work starts."""


def base_parser(
    method: str, description: str, backbones: tuple[str, ...] = ("resnet18", "resnet50")
) -> argparse.ArgumentParser:
    """The flags every method shares. Preset-controlled flags default to None (= take preset)."""
    p = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--data", default=DEFAULT_DATA, help="dataset folder or tarball (default ./data)"
    )
    p.add_argument("--out", default=f"runs/{method}", help="run directory")
    p.add_argument("--preset", choices=["tiny", "cpu", "gpu"], help="default: gpu if CUDA else cpu")
    p.add_argument("--epochs", type=int, help="training epochs")
    p.add_argument("--batch-size", type=int, help="global batch size (all ranks together)")
    p.add_argument("--lr", type=float, help="base learning rate (scaled with the global batch)")
    p.add_argument("--weight-decay", type=float, help="weight decay")
    p.add_argument("--warmup-epochs", type=float, help="linear warm-up epochs before cosine decay")
    p.add_argument("--backbone", choices=backbones, help="encoder architecture")
    p.add_argument("--width", type=int, help="ResNet stem width (64 = standard; 8-16 for CPU)")
    p.add_argument("--crop-size", type=int, help="training crop side (default: the image size)")
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
    p.add_argument("--ckpt-every", type=int, default=0, help="also checkpoint every N steps")
    p.add_argument("--max-steps", type=int, help="stop (with a checkpoint) after N steps in all")
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


def check_args(args: argparse.Namespace, world_size: int) -> None:
    """Reject invalid numbers before any work starts."""
    positive = ["epochs", "batch_size", "width", "log_every", "keep_last", "dist_timeout"]
    positive += ["limit_train", "limit_test", "knn_bank"]
    for k in positive:
        v = getattr(args, k, None)
        if v is not None and v <= 0:
            raise ConfigError(f"--{k.replace('_', '-')} must be > 0, got {v}")
    for k in ["lr", "weight_decay", "warmup_epochs", "eval_every", "ckpt_every", "max_steps"]:
        v = getattr(args, k, None)
        if v is not None and v < 0:
            raise ConfigError(f"--{k.replace('_', '-')} must be >= 0, got {v}")
    if getattr(args, "temperature", 1.0) <= 0:
        raise ConfigError(f"--temperature must be > 0, got {args.temperature}")
    if args.batch_size % world_size:
        raise ConfigError(
            f"--batch-size {args.batch_size} is not divisible by the world size {world_size}"
        )
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda, but no CUDA device is available")


def run_cli(main: Callable[[argparse.Namespace], object], args: argparse.Namespace) -> None:
    """Run main(args) and map failures to one clear line and an exit code (module doc)."""
    code = 0
    try:
        result = main(args)
        if isinstance(result, dict) and result.get("stopped") == "preempted":
            code = EXIT_PREEMPTED
    except (DataError, ConfigError, D.DistInitError) as e:
        print(f"error: {e}", file=sys.stderr)
        code = EXIT_CONFIG
    except FloatingPointError as e:
        print(f"error: {e}", file=sys.stderr)
        code = EXIT_NONFINITE
    finally:
        D.cleanup()
    sys.exit(code)


def lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    """Linear warm-up from 0 to `peak` over `warmup` steps, then cosine decay to 0."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def step_generator(seed: int, rank: int, step: int) -> torch.Generator:
    """Augmentation randomness as a pure function of (seed, rank, step): resumes reproduce it
    with no generator state to save, and no two ranks or steps share a stream."""
    return torch.Generator().manual_seed((seed * 1_000_003 + rank) * 1_000_000_007 + step)


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
        order = torch.tensor(list(self.sampler))
        for i in range(start_step, self.steps_per_epoch):
            idx = order[i * self.local_batch : (i + 1) * self.local_batch]
            x = self.images[idx.to(self.images.device)]
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
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")

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
        self.total = args.epochs * steps_per_epoch
        self.warmup = round(args.warmup_epochs * steps_per_epoch)
        self.peak_lr = peak_lr
        self.step = 0
        self.stopped: str | None = None
        self.skipped = 0
        self._checked = False
        ckpt = resume_path(args, out)
        if ckpt is not None:
            self._load(ckpt)
        self._signal: int | None = None
        self._install_signal_handlers()
        self.log = Logger(out, self.total, args.log_every, start_step=self.step)
        self.t0 = self.t_last_step = time.time()

    @property
    def epoch(self) -> int:
        return self.step // self.steps_per_epoch

    @property
    def schedule(self) -> dict:
        return {
            "kind": "warmup_cosine",
            "peak_lr": self.peak_lr,
            "warmup": self.warmup,
            "total": self.total,
        }

    def _load(self, path: Path) -> None:
        from common.checkpoint import load_checkpoint

        state = load_checkpoint(path)
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
            if D.is_main():
                print(
                    f"received {signal.Signals(signum).name}: stopping after this step", flush=True
                )

        self._old_handlers = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}

    def _any_rank(self, flag: bool) -> bool:
        """True if `flag` is true on any rank (all ranks must take the same branch)."""
        if D.get_world_size() == 1:
            return flag
        dev = (
            torch.device("cuda", torch.cuda.current_device())
            if torch.cuda.is_initialized()
            else "cpu"
        )
        t = torch.tensor([float(flag)], device=dev)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return bool(t.item())

    def nonfinite(self, loss: torch.Tensor) -> bool:
        """Call before backward. False for a finite loss. Otherwise stops the run (exit code 3,
        the last checkpoint untouched) or, with --skip-nonfinite, counts the step as skipped
        and returns True: the caller then `continue`s without an update."""
        self._checked = True
        if not self._any_rank(not bool(torch.isfinite(loss.detach()).all())):
            return False
        if not self.args.skip_nonfinite:
            raise FloatingPointError(
                f"non-finite loss at step {self.step} (epoch {self.epoch}); stopped, the last "
                f"good checkpoint is {self.out / 'checkpoint.pt'} (--skip-nonfinite skips such steps)"
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
        lr = lr_at(self.step, self.total, self.warmup, self.peak_lr)
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
            if evaluate and every and self.epoch % every == 0 and self.step < self.total:
                evaluate(self.epoch)

    def step_done(self, loss: torch.Tensor, **metrics: float) -> None:
        """Count the finished step; log, checkpoint or stop when due."""
        if not self._checked:  # the script did not call nonfinite() before its update
            self.nonfinite(loss)
        self._checked = False
        self.step += 1
        self.t_last_step = time.time()
        if self.step % self.args.log_every == 0 or self.step == self.total:
            loss_mean = D.all_reduce_mean(loss.detach().float()).item()
            epoch = (self.step - 1) // self.steps_per_epoch  # the epoch this step belonged to
            self.log.step(self.step, epoch, self.args.batch_size, loss=loss_mean, **metrics)
        if self.args.ckpt_every and self.step % self.args.ckpt_every == 0:
            self.save()
        if self.args.max_steps and self.step >= self.args.max_steps and self.step < self.total:
            self.save()
            self.stopped = "max_steps"
        elif self._any_rank(self._signal is not None) and self.step < self.total:
            self.save()
            self.stopped = "preempted"

    def save(self) -> None:
        """OUT/checkpoint.pt (atomic), plus OUT/checkpoint-STEP.pt for the last --keep-last > 1."""
        from common.checkpoint import save_checkpoint

        if not D.is_main():
            return
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
        )
        if self.args.keep_last > 1:  # a hard link: no second write, and atomic
            kept = self.out / f"checkpoint-{self.step:08d}.pt"
            kept.unlink(missing_ok=True)
            os.link(path, kept)
            for old in sorted(self.out.glob("checkpoint-*.pt"))[: -self.args.keep_last]:
                old.unlink()

    def finish(self, **results: float) -> dict:
        """Final checkpoint (unless stopped early, which already saved) and the result line."""
        for sig, old in self._old_handlers.items():  # hand signals back (in-process callers)
            signal.signal(sig, old)
        if not self.stopped:
            self.save()
        seconds = time.time() - self.t0
        images = (self.step - self.log.s0) * self.args.batch_size  # trained this session
        n_params = sum(
            p.numel() for m in (self.backbone, self.head) if m is not None for p in m.parameters()
        )
        result = {
            "command": launch_command(self.method),
            "method": self.method,
            "epochs": self.args.epochs,
            "steps": self.step,
            **results,
            # Efficiency (this process; the images/s of the whole job, all ranks together)
            "train_minutes": round(seconds / 60, 2),
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
    """Initialise distributed, validate args, seed, create OUT; returns (device, out_dir)."""
    check_args(args, int(os.environ.get("WORLD_SIZE", "1")))  # before any work
    device = D.init_distributed(args.device, timeout_s=getattr(args, "dist_timeout", 600))
    check_same_config(args)
    out = Path(args.out)
    if D.is_main():
        out.mkdir(parents=True, exist_ok=True)
    D.barrier()
    torch.manual_seed(args.seed + D.get_rank())
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if D.is_main():
        cfg = {k: v for k, v in vars(args).items()}
        print(f"config: {json.dumps(cfg)} world_size {D.get_world_size()} device {device}")
    return device, out


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
