"""Fine-tuning with few labels: the whole pre-trained backbone plus a linear head, trained on 1%
and 10% of the training labels (SimCLR, Table 7) or on all of them (`--pcts 100`: full
fine-tuning, the lecture's "linear probe vs fine-tuning"), then scored (top-1) on the test set.
The same protocol for every method's checkpoint (simclr.py, mae.py, rotnet.py, ...).

Protocol:
- Labels: class-balanced subsets, floor(pct/100 * n_c) images per class, drawn with --seed
  (common/metrics.py's balanced_subset; unlabelled images, label < 0, are never drawn). The
  index lists are saved to SUBSET_DIR/subset_{pct}pct_seed{seed}.json and re-used, so every
  method and every baseline sees the same images; a list drawn from another training set is
  refused.
- Training: flip + random-resized-crop augmentation per image on the device, the inputs then
  prepared as the method trained (common/eval.py's input_transform); warm-up and cosine lr;
  every image seen --epochs times (default 60 for <= 1% of the labels, else 30: SimCLR's).
  Under torchrun the global batch is sharded over the ranks (DDP, BatchNorm over all ranks).
- The recipe follows the architecture (--optimizer auto; an explicit flag wins):
    ResNets: SimCLR's, Nesterov SGD (momentum 0.9), lr 0.05 x batch/256, no weight decay, no
      warm-up, no label smoothing.
    ViTs (MAE): MAE's fine-tuning essentials, AdamW, lr 1e-3 x batch/256, weight decay 0.05
      (none on biases, norms and tokens), layer-wise lr decay 0.75, 5 warm-up epochs, label
      smoothing 0.1, the head initialised trunc_normal(std 2e-5).
- --random-init fine-tunes the same architecture from untrained weights: the baseline.

Outputs: one JSON line per run (the recipe, "finetune_{pct}pct_top1" per fraction, each
fraction's training stats under "runs", and "command"), saved as
RUN/eval_finetune[_random_init].json; `--pcts 100` alone is saved on its own as
RUN/eval_finetune_full[_random_init].json, beside the few-label results. results_table.py
collects both ("fine-tune 1%", "fine-tune 10%", "fine-tune 100%").

Run (CPU or GPU):
  python finetune.py runs/simclr --subset-dir runs/subsets
  python finetune.py runs/simclr --subset-dir runs/subsets --random-init   # the baseline
  python finetune.py runs/simclr --subset-dir runs/subsets --pcts 100      # full fine-tuning
  torchrun --nproc_per_node=8 finetune.py runs/mae --subset-dir runs/subsets
Expect: pre-training helps most with the fewest labels, and the gap to the random-init
baseline shrinks as labels are added. docs/results_cpu.md ("Fine-tuning: few labels and all
of them") has every method at CPU scale (6-minute pre-training, `--epochs 10 --batch-size
64`): SimCLR 37.4 / 51.0 / 51.2 top-1 with 1% / 10% / 100% of CIFAR-10's labels against
28.0 / 47.2 / 46.3 from random init; some pretext tasks end level with their baseline or
below it there (context: 23.7 against 27.4 with 1%). Exit codes are the training scripts'
(common/cli.py's run_cli): 2 a bad flag, checkpoint, data or output; 3 a diverged run.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

try:  # a script copied on its own: say what else to copy, not a traceback
    import common  # noqa: F401
    import evaluate
except ModuleNotFoundError:
    print(
        "error: finetune.py needs evaluate.py, linear_probe.py and the common/ folder next to "
        "it: copy them with it",
        file=sys.stderr,
    )
    raise SystemExit(2) from None

import linear_probe
from common import dist
from common.augment import AugConfig, apply_params, sample_params, to_float
from common.backbones import backbone_from_config
from common.cli import ConfigError, check_range, run_cli
from common.data import ImageSet
from common.eval import extract_features
from common.feed import step_generator
from common.metrics import balanced_subset
from common.outputs import check_output_dir
from common.schedule import lr_at
from common.train import launch_command
from evaluate import finish, header, load_backbone, load_data, run_dir, write_json


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__,
        parents=[evaluate.run_flags()],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.set_defaults(protocol="finetune")  # the results' "protocol", as evaluate.py's
    p.add_argument(
        "--pcts",
        type=float,
        nargs="+",
        default=[1.0, 10.0],
        help="label percents; 100 alone is full fine-tuning, saved as eval_finetune_full.json",
    )
    p.add_argument("--subset-dir", help="where subset index lists live (default: --out)")
    p.add_argument("--epochs", type=int, help="default: 60 for <= 1%% of the labels, else 30")
    p.add_argument("--batch-size", type=int, default=256, help="global batch size")
    p.add_argument(
        "--optimizer",
        choices=["auto", "sgd", "adamw"],
        default="auto",
        help="auto: AdamW for ViTs (MAE recipe), Nesterov SGD otherwise (SimCLR's)",
    )
    p.add_argument("--lr", type=float, help="base lr per 256 images (sgd 0.05, adamw 1e-3)")
    p.add_argument("--weight-decay", type=float, help="default: sgd 0, adamw 0.05")
    p.add_argument("--layer-decay", type=float, default=0.75, help="layer-wise lr decay (ViTs)")
    p.add_argument("--warmup-epochs", type=float, help="default: sgd 0, adamw 5")
    p.add_argument("--label-smoothing", type=float, help="default: sgd 0, adamw 0.1")
    p.add_argument("--crop-min", type=float, default=0.2, help="random-resized-crop min scale")
    return p


# ------------------------------------------------------------------------------ the labels
def few_label_subset(train: ImageSet, pct: float, seed: int, folder: Path) -> torch.Tensor:
    """Indices into the train split of the class-balanced pct% subset: read from
    folder/subset_{pct}pct_seed{seed}.json when present (checked against this training set's
    labels), else drawn (common.metrics.balanced_subset) and saved there."""
    path = folder / f"subset_{pct:g}pct_seed{seed}.json"
    labels_sha1 = hashlib.sha1(train.labels.numpy().tobytes()).hexdigest()
    if path.exists():
        try:
            saved = json.loads(path.read_text())
            saved["num_train"], saved["labels_sha1"], saved["dataset"], saved["indices"]
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(
                f"{path}: not a subset list of this script ({type(e).__name__}: {e}); delete "
                "it to draw the subset again"
            ) from None
        if saved["num_train"] != len(train) or saved["labels_sha1"] != labels_sha1:
            raise ConfigError(
                f"{path} was drawn from another training set ({saved['dataset']}, "
                f"{saved['num_train']} images); use another --subset-dir for {train.name}"
            )
        return torch.tensor(saved["indices"], dtype=torch.long)
    idx = balanced_subset(train.labels, pct / 100, seed)
    if dist.is_main():  # every rank draws the same indices; one writes them
        counts = torch.bincount(train.labels[idx], minlength=len(train.classes)).tolist()
        write_json(
            path,
            {
                "dataset": train.name,
                "split": "train",
                "num_train": len(train),
                "labels_sha1": labels_sha1,
                "pct": pct,
                "seed": seed,
                "per_class": dict(zip(train.classes, counts)),
                "indices": idx.tolist(),
            },
            indent=None,  # one line: 5,000 indices for 10% of CIFAR-10
        )
    return idx


# ------------------------------------------------------------------------------- the model
class Classifier(nn.Module):
    """backbone -> linear head: [B, C, H, W] -> logits [B, num_classes]."""

    def __init__(self, backbone: nn.Module, num_classes: int, head_std: float | None = None):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.feat_dim, num_classes)
        if head_std is not None:  # MAE fine-tuning: trunc_normal(std 2e-5) weights, zero bias
            nn.init.trunc_normal_(self.head.weight, std=head_std)
            nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


# ------------------------------------------------------------------------------ the recipe
def layer_depths(backbone: nn.Module) -> tuple[dict[str, int], int] | None:
    """Depth of every parameter for layer-wise lr decay, and the number of blocks L, for a
    module with a `blocks` ModuleList (ViTs); None otherwise (ResNets: no decay).
    Depth 0: embeddings (patch embedding, class / mask / position tokens, and anything
    registered before the blocks); i + 1: block i; L + 1: what comes after (final norm)."""
    blocks = getattr(backbone, "blocks", None)
    if not isinstance(blocks, nn.ModuleList):
        return None
    n_blocks = len(blocks)
    depths, after = {}, False
    for name, _ in backbone.named_parameters():
        if name.startswith("blocks."):
            depths[name] = int(name.split(".")[1]) + 1
            after = True
        elif name.startswith(("patch_embed", "pos_embed", "cls_token")) or name.endswith("token"):
            depths[name] = 0
        else:
            depths[name] = n_blocks + 1 if after else 0
    return depths, n_blocks


def finetune_param_groups(
    model: Classifier, weight_decay: float, layer_decay: float | None
) -> list[dict]:
    """Optimizer groups with "lr_scale" = layer_decay ** (L + 1 - depth) (the head is at depth
    L + 1: scale 1) and no weight decay on biases, norms and tokens (MAE / BEiT). Models
    without `blocks` get one scale, 1."""
    info = layer_depths(model.backbone) if layer_decay is not None else None
    top = info[1] + 1 if info else 0
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        sub = name.split(".", 1)[1]
        depth = info[0][sub] if info and name.startswith("backbone.") else top
        no_wd = p.ndim <= 1 or sub.endswith("token") or "pos_embed" in sub
        g = groups.setdefault(
            (depth, no_wd),
            {
                "params": [],
                "weight_decay": 0.0 if no_wd else weight_decay,
                "lr_scale": layer_decay ** (top - depth) if info else 1.0,
                "depth": depth,
            },
        )
        g["params"].append(p)
    return [groups[k] for k in sorted(groups)]


def finetune_recipe(args: argparse.Namespace, is_vit: bool) -> dict:
    """Defaults by architecture (module doc); explicit flags win."""
    adamw = args.optimizer == "adamw" or (args.optimizer == "auto" and is_vit)

    def pick(value, sgd_default, adamw_default):
        return value if value is not None else (adamw_default if adamw else sgd_default)

    return {
        "optimizer": "adamw" if adamw else "sgd",
        "lr": pick(args.lr, 0.05, 1e-3),
        "weight_decay": pick(args.weight_decay, 0.0, 0.05),
        "warmup_epochs": pick(args.warmup_epochs, 0.0, 5.0),
        "label_smoothing": pick(args.label_smoothing, 0.0, 0.1),
        "layer_decay": args.layer_decay if is_vit else None,
    }


# ---------------------------------------------------------------------------- the training
def train_classifier(
    model: Classifier,
    data: ImageSet,
    prepare,
    recipe: dict,
    epochs: int,
    batch_size: int,
    crop_min: float,
    device: torch.device,
    seed: int,
) -> dict:
    """Fine-tune model (in place) on all of `data`: per-sample random-resized-crop + flip on the
    device, warm-up + cosine lr, DDP when a process group is up. Returns training stats."""
    rank, ws = dist.get_rank(), dist.get_world_size()
    n = len(data)
    batch = max(ws, min(batch_size, n) // ws * ws)  # a few-label subset may be < the batch
    if batch > n:
        raise ConfigError(f"{n} training images cannot fill one batch on {ws} ranks")
    # Batches are consecutive slices of a stream of shuffles of the subset (one per pass): every
    # batch is full and every image is seen `epochs` times, give or take one, however the batch
    # divides the subset (500 images in batches of 256 would otherwise drop 244 an epoch).
    steps_per_epoch = math.ceil(n / batch)
    total = epochs * steps_per_epoch
    gen = torch.Generator().manual_seed(seed)  # the same stream on every rank
    stream = torch.cat(
        [torch.randperm(n, generator=gen) for _ in range(math.ceil(total * batch / n))]
    )
    warmup = round(recipe["warmup_epochs"] * steps_per_epoch)
    peak_lr = recipe["lr"] * batch / 256
    groups = finetune_param_groups(model, recipe["weight_decay"], recipe["layer_decay"])
    if recipe["optimizer"] == "adamw":
        opt = torch.optim.AdamW(groups, lr=peak_lr, betas=(0.9, 0.999))
    else:
        opt = torch.optim.SGD(groups, lr=peak_lr, momentum=0.9, nesterov=True)
    net = dist.wrap_ddp(model, device)
    aug = AugConfig(data.image_size, scale=(crop_min, 1.0), jitter_p=0.0, gray_p=0.0)
    images, labels = data.images.to(device), data.labels.to(device)  # a subset: small
    model.train()
    epoch_losses, total_loss = [], torch.zeros((), device=device)
    for step in range(total):
        # This step's global batch; rank r takes every ws-th image of it.
        idx = stream[step * batch : (step + 1) * batch][rank::ws].to(device)
        x = to_float(images[idx])  # [b, 3, H, W] in [0, 1]
        gen = step_generator(seed, rank, step)
        x = apply_params(x, sample_params(aug, len(idx), x.shape[2], x.shape[3], gen), aug)
        x = prepare(x)  # then normalised (or colorization's L channel) as in pre-training
        lr = lr_at(step, total, warmup, peak_lr)
        for g in opt.param_groups:
            g["lr"] = lr * g["lr_scale"]
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            logits = net(x)
        smoothing = recipe["label_smoothing"]
        loss = F.cross_entropy(logits.float(), labels[idx], label_smoothing=smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total_loss += loss.detach()
        if (step + 1) % steps_per_epoch == 0:  # an epoch's mean loss, the same on all ranks
            mean_loss = dist.all_reduce_mean(total_loss / steps_per_epoch).item()
            if not math.isfinite(mean_loss):  # run_cli: exit 3, as the training scripts
                raise FloatingPointError(f"fine-tuning diverged (loss {mean_loss}) at step {step}")
            epoch_losses.append(mean_loss)
            total_loss.zero_()
    return {
        "steps": total,
        "batch_size": batch,
        "peak_lr": peak_lr,
        "loss_first_epoch": epoch_losses[0],
        "loss_last_epoch": epoch_losses[-1],
    }


def finetune(args: argparse.Namespace, run: str, device: torch.device) -> dict:
    """Every label fraction of --pcts on one run, each from the run's weights: the result."""
    t0 = time.time()
    backbone, state = load_backbone(run, args, device)
    cfg = state["config"]
    train, test, prepare, data = load_data(args, cfg)
    init = copy.deepcopy(backbone.state_dict())  # every label fraction starts from these
    is_vit = layer_depths(backbone) is not None
    recipe = finetune_recipe(args, is_vit)
    folder = Path(args.subset_dir or args.out or run_dir(run))
    result = {**header(args, run, state, data), **recipe, "runs": {}}
    for pct in args.pcts:
        idx = few_label_subset(train, pct, args.seed, folder)
        subset = ImageSet(
            train.images[idx], train.labels[idx], train.classes, train.mean, train.std, train.name
        )
        epochs = args.epochs or (60 if pct <= 1 else 30)  # SimCLR's fine-tuning lengths
        torch.manual_seed(args.seed)
        bb = backbone_from_config(cfg)
        bb.load_state_dict(init)
        model = Classifier(bb, len(train.classes), head_std=2e-5 if is_vit else None)
        model = dist.convert_global_bn(model.to(device), device)  # BN statistics over all ranks
        stats = train_classifier(
            model, subset, prepare, recipe, epochs=epochs, batch_size=args.batch_size,
            crop_min=args.crop_min, device=device, seed=args.seed,
        )  # fmt: skip
        logits, labels = extract_features(model, test, device, prepare=prepare)  # [N, classes]
        top1 = 100.0 * (logits.argmax(1) == labels).float().mean().item()
        result[f"finetune_{pct:g}pct_top1"] = top1
        result["num_test"] = len(labels)  # labelled test images
        subset_file = folder / f"subset_{pct:g}pct_seed{args.seed}.json"
        result["runs"][f"{pct:g}"] = {
            "top1": top1,
            "num_labels": len(idx),
            "epochs": epochs,
            "subset": str(subset_file),
            **stats,
        }
    # Full fine-tuning alone (--pcts 100) gets a file of its own, so the few-label results in
    # eval_finetune.json stay next to it (the lecture's "linear probe vs fine-tuning" table).
    name = "finetune_full" if args.pcts == [100.0] else "finetune"
    return finish(args, result, run_dir(run), name, t0)


# ------------------------------------------------------------------------------------ main
def check_args(args: argparse.Namespace) -> None:
    """Every flag's range (ConfigError naming it) before any checkpoint or data is read; the
    flags shared with evaluate.py's protocols are checked as there."""
    if not all(0 < p <= 100 for p in args.pcts):
        raise ConfigError(f"--pcts must be in (0, 100], got {args.pcts}")
    check_range(args, "lr", 0, lo_open=True)
    check_range(args, "weight_decay", 0)
    check_range(args, "layer_decay", 0, 1, lo_open=True)
    check_range(args, "warmup_epochs", 0)
    check_range(args, "label_smoothing", 0, 1, hi_open=True)
    check_range(args, "crop_min", 0, 1, lo_open=True)
    evaluate.check_args(args)  # > 0 counts, then NaN / inf in any other float flag


def check_outputs(args: argparse.Namespace) -> None:
    """WriteError before any work for a folder that cannot be written: --out, --subset-dir,
    and the run folders (the result JSONs, unless --no-save; the subset lists when neither
    folder is given)."""
    if args.out:
        check_output_dir(args.out, "--out")
    if args.subset_dir:
        check_output_dir(args.subset_dir, "--subset-dir")
    subsets_in_run = not (args.subset_dir or args.out)
    for run in args.runs:
        linear_probe.check_save_folder(run, save=not args.no_save or subsets_in_run)


def main(args: argparse.Namespace) -> list[dict]:
    args.command = launch_command("finetune")
    check_args(args)
    check_outputs(args)  # every output path, before any checkpoint or data is read
    device = dist.init_distributed(args.device)
    return [finetune(args, run, device) for run in args.runs]


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
