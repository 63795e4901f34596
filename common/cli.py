"""The command line every method script shares: the flags, the presets, the checks of bad
values before any work starts, and `run_cli`, which maps failures to one line and an exit code.

Owns: what a user types and what the shell gets back. (The run folder is common/rundir.py's,
the lr schedule common/schedule.py's, the training loop's bookkeeping common/train.py's.)

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
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable

import torch

from common import dist
from common.data import DEFAULT_DATA, DataError
from common.outputs import WriteError, os_error_reason

EXIT_CONFIG, EXIT_NONFINITE, EXIT_PREEMPTED = 2, 3, 75
SEED_MODULUS = 1 << 63  # torch generators take seeds below 2^64; derived seeds add to them


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
    except (DataError, ConfigError, dist.DistInitError, WriteError) as e:
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
        from common.rundir import release_run_dir  # (rundir imports ConfigError from here)

        release_run_dir(failed=code not in (0, EXIT_PREEMPTED))
        dist.cleanup()
    sys.exit(code)


def one_line(e: BaseException) -> str:
    """An exception's message on one line (a library's multi-line message, folded)."""
    return " ".join(str(e).split())
