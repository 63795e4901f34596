"""Evaluation protocols beyond the linear probe, for any method's checkpoint.

  cluster     k-means on the L2-normalised frozen test features (k = number of classes, 10
              k-means++ restarts, in torch so it runs on the GPU): NMI, ARI and cluster accuracy
              (clusters matched to classes one to one by the Hungarian algorithm).
  tsne        a PNG scatter of t-SNE-embedded test features coloured by class, with a legend;
              one panel per run when given several (2,000 test images by default).
  finetune    the whole backbone plus a linear head fine-tuned on 1% and 10% of the training
              labels (SimCLR, Table 7): class-balanced subsets, floor(pct/100 * n_c) images per
              class, drawn with --seed; the index lists are saved to
              SUBSET_DIR/subset_{pct}pct_seed{seed}.json and re-used, so every method sees the
              same images. Flip + random-resized-crop augmentation, cosine lr, top-1 on the test
              set. `--pcts 100` alone is full fine-tuning (every label), saved on its own as
              eval_finetune_full.json. ResNets: SimCLR's recipe (Nesterov SGD, lr 0.05 x
              batch/256, no weight decay, 60 epochs for 1%, 30 for 10%). ViTs (MAE): the MAE
              fine-tuning essentials (AdamW, lr 1e-3 x batch/256, weight decay 0.05,
              layer-wise lr decay 0.75, 5 warm-up epochs, label smoothing 0.1).
  transfer    the standard transfer protocol: frozen features of the pre-trained backbone on
              another dataset (--data TARGET, e.g. STL-10 or any ImageFolder; images resized to
              the pre-training resolution), a linear probe (+ k-NN) trained on the target's
              train split and tested on its test split. The source is the checkpoint's dataset.
  robustness  a linear probe trained on clean features of the same dataset, tested on the test
              set under Gaussian noise, Gaussian blur, contrast and JPEG at severities 1-5
              (CIFAR-10-C's parameters up to 64 px, ImageNet-C's above; common/metrics.py).
--random-init evaluates the same architecture untrained: the baseline of every protocol. The
linear probe is linear_probe.py's (lr / weight-decay sweep on a held-out 10%). Unlabelled images
(label < 0, STL-10's unlabeled split) take part in no protocol: common/eval.py's
extract_features skips them in train and test sets, and few-label subsets never draw them.

Each run prints one JSON line (tsne: one for the figure) holding "command", the command line
that produced it, and saves it as RUN_DIR/eval_<protocol>[_<target>][_random_init].json, which
results_table.py collects. --out is where PNGs and subset lists go (default: the first run's
directory). Inputs are prepared as the method trained (common/eval.py's input_transform).

Run (CPU or GPU; torchrun shards feature extraction and fine-tuning over the ranks):
  python evaluate.py cluster runs/simclr
  python evaluate.py tsne runs/simclr runs/mae --out runs/figures
  python evaluate.py finetune runs/simclr --subset-dir runs/subsets
  python evaluate.py finetune runs/simclr --subset-dir runs/subsets --random-init
  python evaluate.py transfer runs/simclr --data ./stl10
  python evaluate.py robustness runs/simclr
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import linear_probe

try:  # a script copied on its own: say what else to copy, not a traceback
    import common  # noqa: F401
except ModuleNotFoundError:
    print(
        "error: evaluate.py needs the common/ folder next to it: copy common/ with it",
        file=sys.stderr,
    )
    raise SystemExit(2) from None

from common import dist as D
from common.augment import AugConfig, apply_params, sample_params, to_float
from common.backbones import backbone_from_config
from common.data import DataError, ImageSet, load_split
from common.eval import extract_features, input_transform, knn_predict
from common.metrics import (
    CORRUPTIONS,
    ari,
    balanced_subset,
    cluster_accuracy,
    corrupt,
    kmeans,
    nmi,
)
from common.outputs import (
    WriteError,
    check_output_dir,
    check_output_file,
    os_error_reason,
    write_text_atomic,
)
from common.train import check_range, lr_at, step_generator


# -------------------------------------------------------------------------------------- CLI
def get_args_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("runs", nargs="+", metavar="RUN", help="run directories or checkpoints")
    common.add_argument("--data", help="dataset (default: the one each checkpoint trained on)")
    common.add_argument("--out", help="folder for PNGs and subset lists (default: first run's)")
    common.add_argument("--random-init", action="store_true", help="evaluate untrained weights")
    common.add_argument("--limit-test", type=int, help="a fixed random subset of N test images")
    common.add_argument("--seed", type=int, default=0)
    common.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda when available")
    common.add_argument("--no-save", action="store_true", help="do not write RUN/eval_*.json")
    # The linear probe's flags, with linear_probe.py's defaults (its functions read them).
    probe = argparse.ArgumentParser(add_help=False)
    probe.add_argument("--limit-train", type=int, help="a fixed random subset of N train images")
    probe.add_argument("--epochs", type=int, default=100, help="linear classifier epochs")
    probe.add_argument("--batch-size", type=int, default=1024, help="linear classifier batch")
    probe.add_argument("--lrs", type=float, nargs="+", default=[0.01, 0.1, 1.0], help="lr sweep")
    probe.add_argument("--wds", type=float, nargs="+", default=[0.0, 1e-4], help="wd sweep")
    probe.add_argument("--knn-k", type=int, default=200)
    probe.add_argument("--knn-t", type=float, default=0.1)

    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="protocol", required=True, metavar="PROTOCOL")
    c = sub.add_parser("cluster", parents=[common], help="k-means: NMI, ARI, cluster accuracy")
    c.add_argument("--restarts", type=int, default=10, help="k-means++ restarts")
    c.add_argument("--iters", type=int, default=300, help="max Lloyd iterations per restart")

    t = sub.add_parser("tsne", parents=[common], help="t-SNE scatter PNG (grid for several runs)")
    t.set_defaults(limit_test=2000)
    t.add_argument("--perplexity", type=float, default=30.0)
    t.add_argument("--png", default="tsne.png", help="file name inside --out")
    t.add_argument(
        "--with-random-init",
        action="store_true",
        help="after the runs' panels, one panel of each distinct architecture untrained (the "
        "same network at random init, fed the same input): the baseline to compare with",
    )

    f = sub.add_parser("finetune", parents=[common], help="fine-tune with 1%% / 10%% of labels")
    f.add_argument(
        "--pcts",
        type=float,
        nargs="+",
        default=[1.0, 10.0],
        help="label percents; 100 alone is full fine-tuning, saved as eval_finetune_full.json",
    )
    f.add_argument("--subset-dir", help="where subset index lists live (default: --out)")
    f.add_argument("--epochs", type=int, help="default: 60 for <= 1%% of the labels, else 30")
    f.add_argument("--batch-size", type=int, default=256, help="global batch size")
    f.add_argument(
        "--optimizer",
        choices=["auto", "sgd", "adamw"],
        default="auto",
        help="auto: AdamW for ViTs (MAE recipe), Nesterov SGD otherwise (SimCLR's)",
    )
    f.add_argument("--lr", type=float, help="base lr per 256 images (sgd 0.05, adamw 1e-3)")
    f.add_argument("--weight-decay", type=float, help="default: sgd 0, adamw 0.05")
    f.add_argument("--layer-decay", type=float, default=0.75, help="layer-wise lr decay (ViTs)")
    f.add_argument("--warmup-epochs", type=float, help="default: sgd 0, adamw 5")
    f.add_argument("--label-smoothing", type=float, help="default: sgd 0, adamw 0.1")
    f.add_argument("--crop-min", type=float, default=0.2, help="random-resized-crop min scale")

    tr = sub.add_parser("transfer", parents=[common, probe], help="linear probe on --data")
    tr.add_argument(
        "--native-size",
        action="store_true",
        help="keep the target's image size (default: resize to the pre-training size)",
    )
    r = sub.add_parser("robustness", parents=[common, probe], help="probe under corruptions")
    r.add_argument("--corruptions", nargs="+", choices=CORRUPTIONS, default=list(CORRUPTIONS))
    r.add_argument(
        "--severities", type=int, nargs="+", choices=range(1, 6), default=[1, 2, 3, 4, 5]
    )
    return p


# ---------------------------------------------------------------------------- shared helpers
def run_dir(run: str | Path) -> Path:
    """The run directory of a run argument (a directory, or a checkpoint file's folder)."""
    p = Path(run)
    return p if p.is_dir() else p.parent


def load_backbone(run: str, args: argparse.Namespace, device: torch.device):
    """(backbone on device, checkpoint dict): trained weights, or untrained with --random-init
    (seeded, so every protocol's baseline starts from the same weights)."""
    state = linear_probe.read_checkpoint(run)  # names a file that is not a checkpoint
    torch.manual_seed(args.seed)
    backbone = backbone_from_config(state["config"])
    if not args.random_init:
        backbone.load_state_dict(state["backbone"])
    return backbone.to(device), state


def load_data(args: argparse.Namespace, cfg: dict, limit_train: int | None = None):
    """(train, test, prepare, data path): the dataset (--data, else the checkpoint's), test
    limited by --limit-test; prepare maps uint8 images to the backbone's input."""
    data, size = linear_probe.checkpoint_data(args.data, cfg)  # (size: None for --data)
    train, test = load_split(data, "train"), load_split(data, "test")
    if size and train.image_size != size:  # the checkpoint's own data, at its training size
        train, test = (load_split(data, s, image_size=size) for s in ("train", "test"))
    train, test = train.subset(limit_train, args.seed), test.subset(args.limit_test, args.seed)
    return train, test, input_transform(cfg, train.mean, train.std), data


def header(args: argparse.Namespace, run: str, state: dict, data) -> dict:
    cfg = state["config"]
    return {
        "protocol": args.protocol,
        "checkpoint": str(run),
        "method": state["method"],
        "random_init": args.random_init,
        "backbone": cfg["backbone"],
        "width": cfg.get("width"),
        "epochs": cfg.get("epochs"),
        "data": str(data),
    }


def finish(args: argparse.Namespace, result: dict, folder: Path, name: str, t0: float) -> dict:
    """Add the command and time; rank 0 prints the JSON line and saves folder/eval_<name>.json."""
    result["command"] = args.command
    result["seconds"] = round(time.time() - t0, 1)
    if D.is_main():
        print(json.dumps(result), flush=True)
        if not args.no_save:
            suffix = "_random_init" if args.random_init else ""
            _write_json(folder / f"eval_{name}{suffix}.json", result)
    return result


def _write_json(path: Path, obj, indent: int | None = 1) -> None:
    """Atomic write (temp file + rename): a reader never sees half a file; a full disk or a
    read-only folder is a WriteError naming the file."""
    write_text_atomic(path, json.dumps(obj, indent=indent))


# ---------------------------------------------------------------------------- 1. clustering
def cluster(args: argparse.Namespace, run: str, device: torch.device) -> dict:
    t0 = time.time()
    backbone, state = load_backbone(run, args, device)
    _, test, prepare, data = load_data(args, state["config"])
    feats, labels = extract_features(backbone, test, device, prepare=prepare)  # [N, D], [N]
    k = len(test.classes)
    # Every rank runs the same seeded k-means on the same gathered features: same result.
    km = kmeans(F.normalize(feats, dim=1), k, args.restarts, args.iters, args.seed)
    y, pred = labels.cpu(), km.labels.cpu()
    result = {
        **header(args, run, state, data),
        "k": k,
        "nmi": nmi(y, pred),
        "ari": ari(y, pred),
        "cluster_acc": 100.0 * cluster_accuracy(y, pred),
        "inertia": km.inertia,
        "restarts": args.restarts,
        "num_test": len(labels),  # labelled test images
    }
    return finish(args, result, run_dir(run), "cluster", t0)


# --------------------------------------------------------------------------------- 2. t-SNE
def tsne_embed(feats: torch.Tensor, perplexity: float, seed: int):
    """[N, D] features -> [N, 2] numpy t-SNE embedding (cosine geometry: L2-normalised, then
    PCA to 50 dimensions first, as usual, to denoise and speed up)."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    x = F.normalize(feats.float(), dim=1).cpu().numpy()
    if x.shape[1] > 50 and len(x) > 50:
        x = PCA(50, random_state=seed).fit_transform(x)
    perplexity = min(perplexity, (len(x) - 1) / 3)  # sklearn needs perplexity < N
    tsne = TSNE(2, perplexity=perplexity, init="pca", learning_rate="auto", random_state=seed)
    return tsne.fit_transform(x)


def plot_tsne(panels: list[tuple], path: Path) -> None:
    """panels: (title, emb [N, 2], labels [N], class names); one subplot each, up to 3 a row,
    one shared legend (the first panel's classes) below."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    n = len(panels)
    ncols = min(n, 3)
    nrows = math.ceil(n / ncols)
    classes = panels[0][3]
    nc = len(classes)
    cmap = matplotlib.colormaps["tab10" if nc <= 10 else "tab20" if nc <= 20 else "turbo"]

    def color(c: int):
        return cmap(c) if nc <= 20 else cmap(c / max(1, nc - 1))

    legend_rows = math.ceil(min(nc, 40) / 5)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(4.5 * ncols, 4.5 * nrows + 0.3 * legend_rows), squeeze=False
    )
    for ax, (title, emb, y, names) in zip(axes.flat, panels):
        for c in range(len(names)):
            m = y == c
            ax.scatter(emb[m, 0], emb[m, 1], s=4, color=color(c), label=names[c], linewidths=0)
        ax.set_title(title, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes.flat[n:]:
        ax.axis("off")
    if nc <= 40:  # beyond that a legend is unreadable; the colours still separate classes
        handles, names = axes.flat[0].get_legend_handles_labels()
        fig.legend(handles, names, loc="lower center", ncol=min(nc, 5), markerscale=3)
    bottom = 0.3 * legend_rows / fig.get_figheight() + 0.02 if nc <= 40 else 0
    fig.tight_layout(rect=(0, bottom, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def untrained_twins(args: argparse.Namespace) -> list[str]:
    """--with-random-init: the runs whose architecture and input (backbone, width, channels,
    input transform) no earlier run shares; each gets an untrained panel."""
    seen, out = set(), []
    for run in args.runs:
        cfg = linear_probe.read_checkpoint(run)["config"]
        key = tuple(str(cfg.get(k)) for k in ("backbone", "width", "in_chans", "input", "stem"))
        if key not in seen:
            seen.add(key)
            out.append(run)
    return out


def tsne(args: argparse.Namespace, device: torch.device) -> dict:
    t0 = time.time()
    panels, runs = [], []
    jobs = [(run, args.random_init) for run in args.runs]
    if getattr(args, "with_random_init", False) and not args.random_init:
        jobs += [(run, True) for run in untrained_twins(args)]
    for run, random_init in jobs:
        job_args = argparse.Namespace(**{**vars(args), "random_init": random_init})
        backbone, state = load_backbone(run, job_args, device)
        _, test, prepare, data = load_data(args, state["config"])  # same seed: same images
        feats, labels = extract_features(backbone, test, device, prepare=prepare)
        if D.is_main():
            emb = tsne_embed(feats, args.perplexity, args.seed)
            title = f"{state['method']}{' (random init)' if random_init else ''}"
            title += f"\n{run_dir(run).name}, {test.name}"
            panels.append((title, emb, labels.cpu().numpy(), test.classes))
        runs.append(header(job_args, run, state, data))
    out = Path(args.out) if args.out else run_dir(args.runs[0])
    png = out / args.png
    if D.is_main():
        try:
            plot_tsne(panels, png)
        except OSError as e:
            raise WriteError(f"cannot write {png}: {os_error_reason(e)}") from None
    result = {
        "protocol": "tsne",
        "png": str(png),
        "runs": runs,
        "num_points": len(labels),
        "perplexity": args.perplexity,
    }
    return finish(args, result, out, "tsne", t0)


# ---------------------------------------------------------------------- 3. few-label fine-tune
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
            raise ValueError(
                f"{path}: not a subset list of this script ({type(e).__name__}: {e}); delete "
                "it to draw the subset again"
            ) from None
        if saved["num_train"] != len(train) or saved["labels_sha1"] != labels_sha1:
            raise ValueError(
                f"{path} was drawn from another training set ({saved['dataset']}, "
                f"{saved['num_train']} images); use another --subset-dir for {train.name}"
            )
        return torch.tensor(saved["indices"], dtype=torch.long)
    idx = balanced_subset(train.labels, pct / 100, seed)
    if D.is_main():  # every rank draws the same indices; one writes them
        counts = torch.bincount(train.labels[idx], minlength=len(train.classes)).tolist()
        _write_json(
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
    rank, ws = D.get_rank(), D.get_world_size()
    n = len(data)
    batch = max(ws, min(batch_size, n) // ws * ws)  # a few-label subset may be < the batch
    if batch > n:
        raise ValueError(f"{n} training images cannot fill one batch on {ws} ranks")
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
    net = D.wrap_ddp(model, device)
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
            mean_loss = D.all_reduce_mean(total_loss / steps_per_epoch).item()
            if not math.isfinite(mean_loss):
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
        model = D.convert_global_bn(model.to(device), device)  # BN statistics over all ranks
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


# ------------------------------------------------------------------------------- 4. transfer
def resized(prepare, size: int):
    """prepare composed with an antialiased resize of the images to size x size."""

    def fn(images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(to_float(images), size=(size, size), mode="bilinear", antialias=True)
        return prepare(x.clamp_(0, 1))

    return fn


def transfer(args: argparse.Namespace, run: str, device: torch.device) -> dict:
    t0 = time.time()
    if not args.data:
        raise ValueError("transfer needs --data TARGET (the dataset to transfer to)")
    backbone, state = load_backbone(run, args, device)
    cfg = state["config"]
    train, test, prepare, data = load_data(args, cfg, args.limit_train)
    # The probes feed the pre-training set's images at their own side (a CIFAR model: 32 px);
    # STL-10's 96 px would change the scale of every filter's input, so resize to that side
    # unless --native-size. (Not crop_size: context's is a patch, SimCLR's fast preset 24 px.)
    size = cfg.get("image_size") or cfg.get("crop_size") or train.image_size
    if not args.native_size and size != train.image_size:
        prepare = resized(prepare, size)
    else:
        size = train.image_size
    ftr, ytr = extract_features(backbone, train, device, prepare=prepare)
    fte, yte = extract_features(backbone, test, device, prepare=prepare)
    num_classes = len(train.classes)
    knn = knn_predict(ftr, ytr, fte, num_classes, args.knn_k, args.knn_t)
    target = Path(str(data)).name.split(".")[0] or train.name
    result = {
        **header(args, run, state, data),
        "source": cfg.get("data"),
        "target": str(data),
        "target_name": target,
        "input_size": size,
        "num_classes": num_classes,
        "knn_top1": 100.0 * (knn == yte).float().mean().item(),
        **linear_probe.linear_probe(ftr, ytr, fte, yte, num_classes, args),
        "num_train": len(ytr),  # labelled images used
        "num_test": len(yte),
    }
    return finish(args, result, run_dir(run), f"transfer_{target}", t0)


# ----------------------------------------------------------------------------- 5. robustness
def robustness(args: argparse.Namespace, run: str, device: torch.device) -> dict:
    t0 = time.time()
    backbone, state = load_backbone(run, args, device)
    train, test, prepare, data = load_data(args, state["config"], args.limit_train)
    ftr, ytr = extract_features(backbone, train, device, prepare=prepare)
    fte, yte = extract_features(backbone, test, device, prepare=prepare)
    num_classes = len(train.classes)
    # linear_probe.py's protocol picks lr / wd on a held-out split; retrain with the winners
    # to keep the classifier, then score it on every corrupted copy of the test set.
    probe = linear_probe.linear_probe(ftr, ytr, fte, yte, num_classes, args)
    mu, sd = ftr.mean(0), ftr.std(0).clamp_min(1e-6)  # the probe's standardisation
    torch.manual_seed(args.seed)
    clf = linear_probe.train_linear(
        (ftr - mu) / sd,
        ytr,
        num_classes,
        probe["best_lr"],
        probe["best_wd"],
        args.epochs,
        args.batch_size,
        args.seed,
    )
    clean = linear_probe.accuracy(clf, (fte - mu) / sd, yte)
    table: dict[str, list[float]] = {}
    for ci, name in enumerate(args.corruptions):
        table[name] = []
        for s in args.severities:
            # One noise stream per (corruption, severity): reruns see the same corrupted images.
            gen = torch.Generator(device=device).manual_seed(args.seed * 1000 + ci * 10 + s)

            def corrupted(x, name=name, s=s, gen=gen):  # uint8 [B, H, W, 3] -> model input
                return prepare(corrupt(x, name, s, gen))

            fc, _ = extract_features(backbone, test, device, prepare=corrupted)
            table[name].append(linear_probe.accuracy(clf, (fc - mu) / sd, yte))
    means = {f"{k}_top1": sum(v) / len(v) for k, v in table.items()}
    corrupted_mean = sum(sum(v) for v in table.values()) / sum(len(v) for v in table.values())
    result = {
        **header(args, run, state, data),
        "clean_top1": clean,
        "corrupted_top1": corrupted_mean,  # mean over corruptions and severities
        "relative_robustness": corrupted_mean / max(clean, 1e-9),
        **means,
        "severities": args.severities,
        "top1": table,  # corruption -> top-1 at each severity
        "best_lr": probe["best_lr"],
        "best_wd": probe["best_wd"],
        "num_train": len(ytr),  # labelled images used
        "num_test": len(yte),
    }
    return finish(args, result, run_dir(run), "robustness", t0)


# ------------------------------------------------------------------------------------- main
PROTOCOLS = {
    "cluster": cluster,
    "finetune": finetune,
    "transfer": transfer,
    "robustness": robustness,
}


def main(argv: list[str] | None = None) -> list[dict]:
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args = get_args_parser().parse_args(argv)
    args.command = shlex.join(["python", "evaluate.py", *argv])
    for k in ("limit_test", "limit_train", "restarts", "iters", "epochs", "batch_size"):
        v = getattr(args, k, None)
        if v is not None and v <= 0:
            raise ValueError(f"--{k.replace('_', '-')} must be > 0, got {v}")
    if args.protocol == "finetune" and not all(0 < p <= 100 for p in args.pcts):
        raise ValueError(f"--pcts must be in (0, 100], got {args.pcts}")
    check_float_flags(args)
    linear_probe.check_args(args)  # the probe's flags (--knn-k, --knn-t, --lrs, --wds); NaN
    check_outputs(args)  # every output path, before any checkpoint or data is read
    device = D.init_distributed(args.device)
    if args.protocol == "tsne":
        return [tsne(args, device)]
    return [PROTOCOLS[args.protocol](args, run, device) for run in args.runs]


def check_float_flags(args: argparse.Namespace) -> None:
    """The ranges of each protocol's float flags (ConfigError naming the flag and its range);
    linear_probe.check_args then refuses a NaN or inf in any other."""
    check_range(args, "perplexity", 0, lo_open=True)  # tsne
    check_range(args, "lr", 0, lo_open=True)  # finetune
    check_range(args, "weight_decay", 0)
    check_range(args, "layer_decay", 0, 1, lo_open=True)
    check_range(args, "warmup_epochs", 0)
    check_range(args, "label_smoothing", 0, 1, hi_open=True)
    check_range(args, "crop_min", 0, 1, lo_open=True)


def check_outputs(args: argparse.Namespace) -> None:
    """WriteError before any work for an output that cannot be written: --out, --subset-dir,
    tsne's PNG, and the run folders the result JSONs go to (unless --no-save)."""
    if args.out:
        check_output_dir(args.out, "--out")
    if getattr(args, "subset_dir", None):
        check_output_dir(args.subset_dir, "--subset-dir")
    if args.protocol == "tsne":
        png = (Path(args.out) if args.out else run_dir(args.runs[0])) / args.png
        check_output_file(png, "--png")
    if args.protocol == "tsne":
        return  # its JSON goes next to the PNG
    # (finetune's subset lists go to the run folder when neither folder is given)
    subsets_in_run = args.protocol == "finetune" and not (args.subset_dir or args.out)
    for run in args.runs:
        linear_probe.check_save_folder(run, save=not args.no_save or subsets_in_run)


if __name__ == "__main__":
    try:
        main()
    except (DataError, FileNotFoundError, ValueError, WriteError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(2)
    except FloatingPointError as e:  # a diverged fine-tuning: exit 3, as training scripts
        print(f"error: {e}", file=sys.stderr)
        sys.exit(3)
    finally:
        D.cleanup()
