"""Linear probe and k-NN evaluation of any method's checkpoint.

Protocol (SimCLR / InstDisc / lightly benchmarks): freeze the backbone, embed the train and test
images without augmentation, then
- linear: a linear classifier on the precomputed, standardised features, trained with SGD
  (momentum 0.9, cosine lr, cross-entropy); the lr and weight decay are picked by a small sweep
  on a held-out 10% of the training set, then the classifier is retrained on all of it;
- k-NN: weighted k-NN on L2-normalised features (k = 200, T = 0.1, cosine).
`--random-init` evaluates the same architecture untrained: the baseline every result needs.
Unlabelled images (label < 0, STL-10's unlabeled split) are left out of every split.
Bad flags, data or checkpoints stop with exit code 2 and one line `error: ...` before any work.

Run:
  python linear_probe.py runs/simclr --data ./data
  python linear_probe.py runs/simclr/checkpoint.pt --data ./data --random-init
The last line printed is one JSON object with `linear_top1` and `knn_top1` (percent).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
import time
import zipfile
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

try:  # a script copied on its own: say what else to copy, not a traceback
    import common  # noqa: F401
except ModuleNotFoundError:
    print(
        "error: linear_probe.py needs the common/ folder next to it: copy common/ with it",
        file=sys.stderr,
    )
    raise SystemExit(2) from None

from common import dist
from common.backbones import backbone_from_config
from common.checkpoint import load_checkpoint
from common.cli import ConfigError, check_finite, check_range
from common.data import DEFAULT_DATA, DataError, load_split
from common.eval import extract_features, input_transform, knn_predict
from common.outputs import WriteError, check_output_dir, write_text_atomic
from common.train import launch_command


def get_args_parser():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("run", help="run directory (holding checkpoint.pt) or checkpoint file")
    p.add_argument("--data", help="dataset (default: the one the checkpoint was trained on)")
    p.add_argument("--random-init", action="store_true", help="evaluate an untrained backbone")
    p.add_argument(
        "--layer",
        type=int,
        choices=[1, 2, 3, 4],
        help="probe the pooled output of ResNet stage 1-4 instead of the final features",
    )
    p.add_argument(
        "--head",
        action="store_true",
        help="probe the projection head's output z = g(h) instead of h (SimCLR's Figure 8; "
        "for methods whose script defines build_head)",
    )
    p.add_argument(
        "--upsample",
        type=float,
        default=1.0,
        help="resize images by this factor (bilinear) before the backbone: probe at the scale "
        "the trunk trained at (context.py's patches come from a x3 canvas)",
    )
    p.add_argument("--epochs", type=int, default=100, help="linear classifier epochs")
    p.add_argument("--batch-size", type=int, default=1024, help="linear classifier batch size")
    p.add_argument("--lrs", type=float, nargs="+", default=[0.01, 0.1, 1.0], help="lr sweep")
    p.add_argument("--wds", type=float, nargs="+", default=[0.0, 1e-4], help="weight-decay sweep")
    p.add_argument("--knn-k", type=int, default=200)
    p.add_argument("--knn-t", type=float, default=0.1)
    p.add_argument("--limit-train", type=int, help="use a fixed random subset of N train images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda when available")
    p.add_argument(
        "--no-save", dest="save", action="store_false", help="do not write RUN/eval_linear*.json"
    )
    return p


def check_args(args: argparse.Namespace) -> None:
    """Reject bad numbers before any work (no checkpoint or data is read first): ConfigError
    naming the flag. Also checks the probe flags evaluate.py's transfer / robustness share; a
    flag the namespace lacks is skipped."""
    for k in ("epochs", "batch_size", "knn_k", "limit_train"):
        v = getattr(args, k, None)
        if v is not None and v <= 0:  # epochs 0 would report an untrained classifier
            raise ConfigError(f"--{k.replace('_', '-')} must be > 0, got {v}")
    check_range(args, "knn_t", 0, lo_open=True)
    check_range(args, "upsample", 0, lo_open=True)
    for k, lo_open in (("lrs", True), ("wds", False)):
        values = getattr(args, k, None)
        if values is None:
            continue
        bad = [v for v in values if not math.isfinite(v) or v < 0 or (lo_open and v == 0)]
        if not values or bad:
            rule = "> 0" if lo_open else ">= 0"
            raise ConfigError(f"--{k} needs one or more finite values {rule}, got {values}")
    check_finite(args)
    if getattr(args, "device", None) == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda, but no CUDA device is available")


def run_folder(run: str | Path) -> Path:
    """The folder of a run argument: the run directory, or a checkpoint file's folder."""
    p = Path(run)
    return p if p.is_dir() else p.parent


def check_save_folder(run: str | Path, save: bool) -> None:
    """Before any work: the folder the result JSON goes to must be writable (WriteError)."""
    if save:
        try:
            check_output_dir(run_folder(run), "run folder")
        except WriteError as e:
            raise WriteError(f"{e} (--no-save prints the result without saving it)") from None


def load_at_size(data: str, split: str, size: int | None):
    """load_split at the image size the backbone trained at (a run with --image-size, or
    data whose most common size is not what it was), else at the data's own size."""
    images = load_split(data, split)
    if size and images.image_size != size:
        images = load_split(data, split, image_size=size)
    return images


def checkpoint_data(data: str | None, cfg: dict) -> tuple[str, int | None]:
    """(dataset path, image size) to evaluate on: --data when given (images at their own
    size), else the checkpoint's dataset at its training size. The checkpoint stores --data as
    typed (maybe relative to where training ran) and, since the run-folder checks, also its
    absolute path: the first of them that exists here is used; none is a DataError naming
    both, not a "does not exist" that hides where the path came from."""
    if data:
        return data, None
    given, absolute = cfg["data"], cfg.get("data_path")
    for path in (given, absolute):
        if path and Path(path).exists():
            return path, cfg.get("image_size")
    if given == DEFAULT_DATA and not absolute:
        return given, cfg.get("image_size")  # torchvision's download into ./data, as trained
    raise DataError(
        f"the checkpoint's dataset --data {given!r} (as given to the training run"
        + (f", i.e. {absolute}" if absolute and absolute != given else "")
        + f") is not found from {os.getcwd()}: pass --data PATH"
    )


def read_checkpoint(run: str | Path) -> dict:
    """load_checkpoint, except that a file torch.save did not write (a log, a JSON file, a
    truncated copy) is reported as such: torch.load's own complaint about it can be a bare
    number (e.g. "101", an unpickling opcode)."""
    try:
        return load_checkpoint(run)
    except ValueError:
        path = Path(run) / "checkpoint.pt" if Path(run).is_dir() else Path(run)
        if not path.is_file() or zipfile.is_zipfile(path):
            raise
        with open(path, "rb") as f:
            head = f.read(20)
        raise ValueError(
            f"{path} is not a checkpoint: not a file written by torch.save "
            f"({path.stat().st_size} bytes, starting {head!r})"
        ) from None


def with_head(backbone: torch.nn.Module, state: dict, random_init: bool) -> torch.nn.Module:
    """backbone followed by the run's projection head g, built by the method script's
    build_head(config, feat_dim) (method code stays in its script): features z = g(h)."""
    import importlib

    method = state["method"]
    build = getattr(importlib.import_module(method), "build_head", None)
    if build is None:
        raise ValueError(f"--head: {method} has no projection head to probe")
    head = build(state["config"], backbone.feat_dim)
    if not random_init:
        head.load_state_dict(state["head"])
    return torch.nn.Sequential(backbone, head)


def train_linear(x, y, num_classes, lr, wd, epochs, batch_size, seed) -> torch.nn.Linear:
    """SGD (momentum 0.9, cosine schedule) on features x [N, D] with labels y [N]."""
    gen = torch.Generator().manual_seed(seed)
    clf = torch.nn.Linear(x.shape[1], num_classes).to(x.device)
    opt = torch.optim.SGD(clf.parameters(), lr=lr, momentum=0.9, weight_decay=wd)
    steps = epochs * max(1, len(x) // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=gen).to(x.device)
        for idx in perm.split(batch_size):
            if len(idx) < batch_size and len(x) >= batch_size:
                continue  # drop the ragged last batch
            loss = F.cross_entropy(clf(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return clf


@torch.no_grad()
def accuracy(clf, x, y) -> float:
    return 100.0 * (clf(x).argmax(1) == y).float().mean().item()


def linear_probe(ftr, ytr, fte, yte, num_classes, args) -> dict:
    if len(ytr) < 2 or len(yte) == 0:  # the sweep holds out 10% (at least one) of the train set
        raise DataError(
            f"the linear probe needs >= 2 labelled train and >= 1 labelled test images, got "
            f"{len(ytr)} and {len(yte)}"
        )
    # Standardise with the training features' statistics (a BN without affine, as in MAE).
    mu, sd = ftr.mean(0), ftr.std(0).clamp_min(1e-6)
    ftr, fte = (ftr - mu) / sd, (fte - mu) / sd
    perm = torch.randperm(len(ftr), generator=torch.Generator().manual_seed(args.seed))
    n_val = max(1, len(ftr) // 10)
    val, fit = perm[:n_val].to(ftr.device), perm[n_val:].to(ftr.device)
    sweep = {}
    for lr, wd in itertools.product(args.lrs, args.wds):
        clf = train_linear(
            ftr[fit], ytr[fit], num_classes, lr, wd, args.epochs, args.batch_size, args.seed
        )
        sweep[(lr, wd)] = accuracy(clf, ftr[val], ytr[val])
    (lr, wd), val_top1 = max(sweep.items(), key=lambda kv: kv[1])
    clf = train_linear(ftr, ytr, num_classes, lr, wd, args.epochs, args.batch_size, args.seed)
    return {
        "linear_top1": accuracy(clf, fte, yte),
        "val_top1": val_top1,
        "best_lr": lr,
        "best_wd": wd,
    }


def upsampled(images: torch.Tensor, prepare, factor: float) -> torch.Tensor:
    """The backbone's input at `factor` times the size (bilinear, like context.py's canvas;
    antialiased when shrinking, e.g. 224 px Imagenette to a 96 px canvas)."""
    x = prepare(images)
    return F.interpolate(
        x, scale_factor=factor, mode="bilinear", align_corners=False, antialias=factor < 1
    )


def main(args):
    t0 = time.time()
    check_args(args)
    check_save_folder(args.run, args.save)
    state = read_checkpoint(args.run)
    cfg = state["config"]
    torch.manual_seed(args.seed)
    backbone = backbone_from_config(cfg)
    if args.layer is not None and not hasattr(backbone, "layer4"):
        raise ValueError("--layer applies to ResNet backbones only")
    if args.head and (args.layer is not None or args.upsample != 1):
        raise ValueError("--head probes the head's output: without --layer or --upsample")
    if not args.random_init:
        backbone.load_state_dict(state["backbone"])
    if args.head:  # (after the trunk's weights: the head loads its own)
        backbone = with_head(backbone, state, args.random_init)
    device = dist.init_distributed(args.device)
    backbone.to(device)
    data, size = checkpoint_data(args.data, cfg)
    train = load_at_size(data, "train", size).subset(args.limit_train, args.seed)
    test = load_at_size(data, "test", size)
    # Inputs as the method saw them (RGB normalised with the training set's statistics, or
    # colorization's L channel), features from the last stage or from --layer.
    prepare = input_transform(cfg, train.mean, train.std)
    if args.upsample != 1:  # [B, C, H, W] -> [B, C, s*H, s*W]
        prepare = partial(upsampled, prepare=prepare, factor=args.upsample)
    # Features of the labelled images only (extract_features skips label < 0).
    ftr, ytr = extract_features(backbone, train, device, prepare=prepare, layer=args.layer)
    fte, yte = extract_features(backbone, test, device, prepare=prepare, layer=args.layer)
    num_classes = len(train.classes)
    knn = knn_predict(ftr, ytr, fte, num_classes, args.knn_k, args.knn_t)
    result = {
        "checkpoint": str(args.run),
        "method": state["method"],
        "random_init": args.random_init,
        "backbone": cfg["backbone"],
        "width": cfg.get("width"),
        "layer": args.layer,
        "head": args.head,
        "upsample": args.upsample,
        "epochs": cfg.get("epochs"),
        "data": str(data),
        "knn_top1": 100.0 * (knn == yte).float().mean().item(),
        **linear_probe(ftr, ytr, fte, yte, num_classes, args),
        "num_train": len(ytr),  # labelled images used
        "num_test": len(yte),
        "seconds": round(time.time() - t0, 1),
    }
    result["command"] = launch_command("linear_probe")
    if dist.is_main():
        print(json.dumps(result), flush=True)
        if args.save:  # next to the checkpoint, where results_table.py looks for it
            name = "eval_linear" + ("_random_init" if args.random_init else "")
            name += f"_layer{args.layer}" if args.layer else ""
            name += "_head" if args.head else ""
            name += f"_x{args.upsample:g}" if args.upsample != 1 else ""
            # (the result is printed above: a full disk costs the file, not the numbers)
            write_text_atomic(run_folder(args.run) / f"{name}.json", json.dumps(result) + "\n")
    return result


def cli(argv: list[str] | None = None) -> int:
    """The command line: 0 on success; 2 and one line `error: ...` on stderr for bad flags (as
    argparse's own usage errors), data or checkpoint."""
    args = get_args_parser().parse_args(argv)
    try:
        main(args)
    # ConfigError is a ValueError; DistInitError: a rank that cannot reach the others.
    except (DataError, FileNotFoundError, ValueError, dist.DistInitError, WriteError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    finally:
        dist.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(cli())
