"""One checkpoint format for every method, written atomically, loaded without pickle code.

A checkpoint is a dict of tensors and plain Python values:
  format       1
  method       "simclr", "rotnet", ...
  backbone     state dict of the encoder (what linear_probe.py evaluates)
  head         state dict of the method's head (projection MLP, classifier, decoder, ...)
  optimizer    optimizer state dict
  scheduler    the lr schedule's parameters (the lr is a pure function of the step)
  step, epoch  finished optimisation steps, and the epoch the next step belongs to
  config       the run's full configuration (vars(args)): rebuilds the backbone
  rng          torch / numpy / Python RNG states (augmentation streams are derived from
               (seed, rank, step), so resuming does not depend on these)
  preprocess   the backbone's input: the training set's channel "mean" and "std" (what it was
               normalised with), "input_size" and "input" kind (export.py; older checkpoints
               lack it: `preprocess_of` recomputes it from the training data)

`torch.load(weights_only=True)` refuses anything but tensors and plain containers, so a
checkpoint from an untrusted source cannot run code.
"""

from __future__ import annotations

import os
import pickle
import random
import tempfile
from pathlib import Path

import numpy as np
import torch

from common.outputs import WriteError, os_error_reason  # noqa: F401 (a save's errors)

FORMAT = 1
TEMP_GLOB = ".ckpt-*.tmp"  # save_checkpoint's temp files: a killed save leaves one behind


def remove_stale_temps(folder: str | Path) -> int:
    """Delete the temp files of saves that were killed (SIGKILL, power loss) in `folder`;
    returns how many. Call only while holding the run's lock: a live save's temp file is
    otherwise someone else's."""
    n = 0
    for f in Path(folder).glob(TEMP_GLOB):
        try:
            f.unlink()
            n += 1
        except FileNotFoundError:
            pass
    return n


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DDP / torch.compile wrappers."""
    while True:
        if hasattr(model, "module"):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2])},
        "python": random.getstate(),
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    key = state["numpy"]["key"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", key, state["numpy"]["pos"]))
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))


def save_checkpoint(
    path: str | Path,
    *,
    method: str,
    backbone: torch.nn.Module,
    head: torch.nn.Module | None,
    optimizer: torch.optim.Optimizer | None,
    scheduler: dict | None,
    step: int,
    epoch: int,
    config: dict,
    extra: dict | None = None,
) -> None:
    """Write the checkpoint atomically: temp file in the same folder, fsync, rename."""
    state = {
        "format": FORMAT,
        "method": method,
        "backbone": unwrap(backbone).state_dict(),
        "head": unwrap(head).state_dict() if head is not None else {},
        "optimizer": optimizer.state_dict() if optimizer is not None else {},
        "scheduler": scheduler or {},
        "step": step,
        "epoch": epoch,
        "config": config,
        "rng": rng_state(),
        **(extra or {}),
    }
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=".ckpt-", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX: readers see the old or the new file, never half
        tmp = None
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)  # make the rename itself durable
        finally:
            os.close(dfd)
    except BaseException as e:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        reason = os_error_reason(e)
        if reason is None or isinstance(e, KeyboardInterrupt):
            raise
        kept = "the previous one is intact" if path.exists() else "none was written before"
        raise WriteError(f"cannot write checkpoint {path}: {reason} ({kept})") from e


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load with weights_only=True; checks the format and names the file on failure."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint.pt"
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message advises weights_only=False, i.e. running the file's code: not here.
        raise ValueError(
            f"{path} is not a loadable checkpoint: it holds objects other than tensors and plain "
            f"containers ({_unpickle_reason(str(e))}), and is refused without running them"
        ) from None
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ValueError(
            f"{path} is not a loadable checkpoint ({type(e).__name__}: {first}): truncated or "
            "not written by torch.save"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path} is not a checkpoint of this repo (format {FORMAT})")
    return state


def data_preprocess(config: dict, data: str | None = None) -> dict:
    """The input preprocessing of a run's backbone, from its training data (`data`, default the
    config's): the train split's channel mean and std, which every method normalises with (the
    same for any --limit-train subset), the side the probes feed, and the input kind."""
    from common.data import load_split

    train = load_split(data or config["data"], "train")
    return {
        "mean": [float(v) for v in train.mean],
        "std": [float(v) for v in train.std],
        "input_size": int(config.get("image_size") or train.image_size),
        "input": config.get("input", "rgb"),  # "lab_l" (colorize), "rgb_project" (context)
    }


def preprocess_of(state: dict, data: str | None = None) -> dict:
    """A checkpoint's stored preprocessing, or (older checkpoints) the one its data gives."""
    return state.get("preprocess") or data_preprocess(state["config"], data)


def _unpickle_reason(message: str) -> str:
    """The line of torch's weights_only refusal that names what was refused (e.g. "Trying to
    load unsupported GLOBAL posix.system ..."), without its advice to load unsafely."""
    for line in message.splitlines():
        line = line.strip()
        if line and "weights_only" not in line and "documentation" not in line:
            return line.rstrip(".")
    return "unsupported content"
