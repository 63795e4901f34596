"""Evaluation protocols beyond the linear probe, for any method's checkpoint.

  cluster     k-means on the L2-normalised frozen test features (k = number of classes, 10
              k-means++ restarts, in torch so it runs on the GPU): NMI, ARI and cluster accuracy
              (clusters matched to classes one to one by the Hungarian algorithm).
  tsne        a PNG scatter of t-SNE-embedded test features coloured by class, with a legend;
              one panel per run when given several (2,000 test images by default).
  transfer    the standard transfer protocol: frozen features of the pre-trained backbone on
              another dataset (--data TARGET, e.g. STL-10 or any ImageFolder; images resized to
              the pre-training resolution), a linear probe (+ k-NN) trained on the target's
              train split and tested on its test split. The source is the checkpoint's dataset.
  robustness  a linear probe trained on clean features of the same dataset, tested on the test
              set under Gaussian noise, Gaussian blur, contrast and JPEG at severities 1-5
              (CIFAR-10-C's parameters up to 64 px, ImageNet-C's above; common/metrics.py).
Fine-tuning with 1%, 10% or 100% of the labels is finetune.py's (on the helpers below).
--random-init evaluates the same architecture untrained: the baseline of every protocol. The
linear probe is linear_probe.py's (lr / weight-decay sweep on a held-out 10%). Unlabelled images
(label < 0, STL-10's unlabeled split) take part in no protocol: common/eval.py's
extract_features skips them in train and test sets.

Each run prints one JSON line (tsne: one for the figure) holding "command", the command line
that produced it, and saves it as RUN_DIR/eval_<protocol>[_<target>][_random_init].json, which
results_table.py collects. --out is where PNGs go (default: the first run's directory). Inputs
are prepared as the method trained (common/eval.py's input_transform). Exit codes are the
training scripts' (common/cli.py's run_cli): 0 done, 2 a bad flag, checkpoint, data or output.

Run (CPU or GPU; torchrun shards feature extraction over the ranks):
  python evaluate.py cluster runs/simclr
  python evaluate.py tsne runs/simclr runs/mae --out runs/figures
  python evaluate.py transfer runs/simclr --data ./stl10
  python evaluate.py robustness runs/simclr
  python finetune.py runs/simclr --subset-dir runs/subsets   # few-label fine-tuning
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
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

from common import dist
from common.augment import to_float
from common.backbones import backbone_from_config
from common.cli import ConfigError, check_range, one_line, run_cli
from common.data import load_split
from common.eval import extract_features, input_transform, knn_predict
from common.metrics import CORRUPTIONS, ari, cluster_accuracy, corrupt, kmeans, nmi
from common.outputs import (
    WriteError,
    check_output_dir,
    check_output_file,
    os_error_reason,
    write_text_atomic,
)
from common.train import launch_command


# -------------------------------------------------------------------------------------- CLI
def run_flags() -> argparse.ArgumentParser:
    """The flags of every protocol (finetune.py's too): the runs, the data, the outputs."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories or checkpoints")
    p.add_argument("--data", help="dataset (default: the one each checkpoint trained on)")
    p.add_argument("--out", help="folder for PNGs and subset lists (default: first run's)")
    p.add_argument("--random-init", action="store_true", help="evaluate untrained weights")
    p.add_argument("--limit-test", type=int, help="a fixed random subset of N test images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda when available")
    p.add_argument("--no-save", action="store_true", help="do not write RUN/eval_*.json")
    return p


class Moved(argparse.Action):
    """`evaluate.py finetune ...`: one line saying where fine-tuning went, exit 2."""

    def __call__(self, parser, namespace, values, option_string=None):
        moved = "fine-tuning moved to finetune.py (the same flags and outputs)"
        parser.exit(2, f"error: {moved}: python finetune.py RUN ...\n")


def get_args_parser() -> argparse.ArgumentParser:
    common = run_flags()
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
    # (not listed in --help: it only says that fine-tuning is finetune.py now)
    moved = sub.add_parser("finetune", add_help=False)
    moved.add_argument("rest", nargs=argparse.REMAINDER, action=Moved)

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


# -------------------------------------------------------- shared helpers (finetune.py's too)
def run_dir(run: str | Path) -> Path:
    """The run directory of a run argument (a directory, or a checkpoint file's folder)."""
    p = Path(run)
    return p if p.is_dir() else p.parent


def read_run(run: str | Path) -> dict:
    """The run's checkpoint dict; a missing, truncated or foreign file is a ConfigError naming
    it (linear_probe.read_checkpoint's message), exit 2."""
    try:
        return linear_probe.read_checkpoint(run)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(one_line(e)) from None


def load_backbone(run: str, args: argparse.Namespace, device: torch.device):
    """(backbone on device, checkpoint dict): trained weights, or untrained with --random-init
    (seeded, so every protocol's baseline starts from the same weights)."""
    state = read_run(run)
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
    if dist.is_main():
        print(json.dumps(result), flush=True)
        if not args.no_save:
            suffix = "_random_init" if args.random_init else ""
            write_json(folder / f"eval_{name}{suffix}.json", result)
    return result


def write_json(path: Path, obj, indent: int | None = 1) -> None:
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
        cfg = read_run(run)["config"]
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
        if dist.is_main():
            emb = tsne_embed(feats, args.perplexity, args.seed)
            title = f"{state['method']}{' (random init)' if random_init else ''}"
            title += f"\n{run_dir(run).name}, {test.name}"
            panels.append((title, emb, labels.cpu().numpy(), test.classes))
        runs.append(header(job_args, run, state, data))
    out = Path(args.out) if args.out else run_dir(args.runs[0])
    png = out / args.png
    if dist.is_main():
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


# ------------------------------------------------------------------------------- 3. transfer
def resized(prepare, size: int):
    """prepare composed with an antialiased resize of the images to size x size."""

    def fn(images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(to_float(images), size=(size, size), mode="bilinear", antialias=True)
        return prepare(x.clamp_(0, 1))

    return fn


def transfer(args: argparse.Namespace, run: str, device: torch.device) -> dict:
    t0 = time.time()
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


# ----------------------------------------------------------------------------- 4. robustness
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
PROTOCOLS = {"cluster": cluster, "transfer": transfer, "robustness": robustness}


def main(args: argparse.Namespace) -> list[dict]:
    args.command = launch_command("evaluate")
    check_args(args)
    check_outputs(args)  # every output path, before any checkpoint or data is read
    device = dist.init_distributed(args.device)
    if args.protocol == "tsne":
        return [tsne(args, device)]
    return [PROTOCOLS[args.protocol](args, run, device) for run in args.runs]


def check_args(args: argparse.Namespace) -> None:
    """Bad numbers before any work, as ConfigError naming the flag (and its range); a flag the
    namespace lacks is skipped (finetune.py checks its own flags, then calls this)."""
    for k in ("limit_test", "limit_train", "restarts", "iters", "epochs", "batch_size"):
        v = getattr(args, k, None)
        if v is not None and v <= 0:
            raise ConfigError(f"--{k.replace('_', '-')} must be > 0, got {v}")
    check_range(args, "perplexity", 0, lo_open=True)  # tsne
    if args.protocol == "transfer" and not args.data:
        raise ConfigError("transfer needs --data TARGET (the dataset to transfer to)")
    linear_probe.check_args(args)  # the probe's flags (--knn-k, --knn-t, --lrs, --wds); NaN


def check_outputs(args: argparse.Namespace) -> None:
    """WriteError before any work for an output that cannot be written: --out, tsne's PNG, and
    the run folders the result JSONs go to (unless --no-save)."""
    if args.out:
        check_output_dir(args.out, "--out")
    if args.protocol == "tsne":  # its JSON goes next to the PNG
        png = (Path(args.out) if args.out else run_dir(args.runs[0])) / args.png
        check_output_file(png, "--png")
        return
    for run in args.runs:
        linear_probe.check_save_folder(run, save=not args.no_save)


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
