"""SimCLR: contrastive learning of visual representations.

Paper: Chen, Kornblith, Norouzi, Hinton. "A Simple Framework for Contrastive Learning of Visual
Representations", ICML 2020 (arXiv:2002.05709); CIFAR-10 recipe from its appendix B.9 and the
official repository (google-research/simclr).

Method: every image in a batch of N is augmented twice (random resized crop, flip, colour
jitter, grayscale, optional blur). An encoder f (ResNet) gives representations h, an MLP head g
(2 layers; 3 in the gpu preset, as the official run.py) gives projections z = g(h). The
NT-Xent loss makes each view's positive (the other view of the same image) the most similar
among the 2N - 1 others (cosine similarity / temperature, softmax cross-entropy), with
negatives from every GPU. After training, g is thrown away and h is
evaluated: linear probe and k-NN (linear_probe.py).

Run:
  python simclr.py                                  # CIFAR-10 in ./data, GPU recipe if CUDA
  torchrun --nproc_per_node=8 simclr.py --data ./data
  python simclr.py --preset cpu --data ../shared/data/cifar10-jpeg.tar.gz
  python simclr.py --preset fast --time-budget 7    # the best k-NN for 7 minutes of training
  python linear_probe.py runs/simclr --data ./data  # evaluate
Expect: the paper's best CIFAR-10 ResNet-50 (appendix B.9) reaches 94.0% linear top-1; the
official repository's ResNet-18 recipe (batch 512, 1000 epochs: the `gpu` preset here) states
"around 91%" after linear evaluation. The README lists what the `cpu` and `fast` presets give
on 2 CPU cores, with the commands (speed-to-quality curve: bench/speed_to_quality.py).
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

try:  # a script copied on its own: say what else to copy, not a traceback
    import common  # noqa: F401
except ModuleNotFoundError:
    print(
        "error: simclr.py needs the common/ folder next to it: copy common/ with it",
        file=sys.stderr,
    )
    raise SystemExit(2) from None

from common import dist
from common.augment import AugConfig, BatchAugment
from common.backbones import build_backbone, stem_for
from common.cli import ConfigError, apply_preset, base_parser, check_range, run_cli
from common.data import load_split
from common.eval import knn_top1, labelled
from common.feed import BatchFeed, step_generator
from common.nt_xent import nt_xent_impl_used, nt_xent_rows
from common.train import TrainRun, compile_model, place_model, setup_run

# ----------------------------------------------------------------------------------- config
# Presets fill every flag the user did not give (explicit flags win). `gpu` is the official
# CIFAR-10 recipe (README of google-research/simclr: ResNet-18, batch 512, LARS lr 1.0 x
# batch/256, wd 1e-4, temperature 0.5, jitter strength 0.5, no blur, 1000 epochs, 10 warm-up
# epochs), with the official loss scale (nt_xent_loss below: the two directions' means summed),
# run.py's 3-layer projection head and its ResNet's zero-initialised last BN per block;
# docs/gpu.md lists where it still differs (bicubic crop resize, head init, ...).
# `tiny` proves the pipeline in seconds (tests); `cpu` is ~10 minutes on 2 cores. `fast` is the
# recipe chosen by measurement for short wall-clock budgets (use it with --time-budget MIN): at
# a 3-minute CPU budget, temperature 0.2 instead of 0.5 gave +3.4 k-NN and 24 px crops (2.3x
# the steps of 32 px) +3.6; batch 128 instead of 256 was no better (bench/RESULTS.md).
# fmt: off
#                  tiny      cpu       gpu       fast
_TABLE = {
    "epochs":        (2,        5,        1000,     100),   # passes over the (limited) train set
    "batch_size":    (128,      256,      512,      256),   # global batch N (2N views per step)
    "lr":            (None,     None,     None,     None),  # LARS base lr (None: 1.0, 0.075 sqrt)
    "weight_decay":  (1e-4,     1e-4,     1e-4,     1e-4),  # on weights only (not biases, BN)
    "warmup_epochs": (0.5,      0.5,      10,       0.5),   # linear warm-up, then cosine to 0
    "temperature":   (0.5,      0.5,      0.5,      0.2),   # NT-Xent temperature (CIFAR: 0.5)
    "backbone":      ("resnet18", "resnet18", "resnet18", "resnet18"),
    "width":         (8,        16,       64,       16),    # ResNet width (64 = ResNet-18)
    "limit_train":   (1024,     25000,    None,     None),  # random train subset (None: all)
    "log_every":     (4,        20,       50,       20),    # steps between log lines
    "eval_every":    (0,        0,        50,       0),     # epochs between k-NN evals (0: end)
    "knn_bank":      (2000,     None,     None,     10000), # train images in the k-NN bank
    "crop_scale_min": (0.08,    0.08,     0.08,     0.2),   # random resized crop: area min-1
    "crop_frac":     (1.0,      1.0,      1.0,      0.75),  # crop side / image side
    "proj_layers":   (2,        2,        3,        2),     # projection head depth (run.py: 3)
    "zero_init_residual": (False, False,  True,     False), # last BN of each block starts at 0
    "compile":       (False,    False,    True,     False), # torch.compile the model
}
# fmt: on
PRESET_NAMES = ("tiny", "cpu", "gpu", "fast")
PRESETS = {name: {k: v[i] for k, v in _TABLE.items()} for i, name in enumerate(PRESET_NAMES)}


def get_args_parser():
    p = base_parser("simclr", __doc__, presets=PRESET_NAMES)
    p.add_argument("--temperature", type=float, help="NT-Xent temperature (0.5 for CIFAR)")
    p.add_argument("--proj-dim", type=int, default=128, help="output size of the projection head")
    p.add_argument(
        "--jitter-strength", type=float, help="colour jitter s (default 0.5 <= 64 px, else 1)"
    )
    p.add_argument(
        "--blur", type=float, help="Gaussian blur probability (default 0 <= 64 px, else 0.5)"
    )
    p.add_argument(
        "--crop-scale-min",
        type=float,
        help="smallest random-resized-crop area, as a fraction of the image (paper: 0.08)",
    )
    p.add_argument(
        "--crop-frac",
        type=float,
        help="training crop side as a fraction of the image side, when --crop-size is not given "
        "(below 1: more steps per minute; the probe still sees whole images)",
    )
    p.add_argument(
        "--aug",
        default="crop,color",
        help="comma list of the augmentations to compose (paper's Figure 5): crop (random resized "
        "crop + flip; without it, the whole image), color (jitter + grayscale), blur, rotate, "
        "cutout, noise, sobel (each p 0.5: common/augment.py). blur is also on when --blur > 0",
    )
    p.add_argument(
        "--proj-layers",
        type=int,
        help="projection head layers: 0 = none (the loss on h), 1 = linear, 2 = the paper's, "
        "3 = the official code's",
    )
    p.add_argument(
        "--zero-init-residual",
        action=argparse.BooleanOptionalAction,
        help="zero-initialise the last BN of every residual block (official ResNet)",
    )
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        help="torch.compile the model (gpu preset; falls back to eager with one warning)",
    )
    p.add_argument("--momentum", type=float, default=0.9, help="LARS momentum, in [0, 1)")
    p.add_argument("--lars-eta", type=float, default=1e-3, help="LARS trust coefficient")
    p.add_argument(
        "--lr-scaling",
        choices=["linear", "sqrt"],
        default="linear",
        help="peak lr = lr * batch/256 (linear, base 1.0) or lr * sqrt(batch) (paper B.1 for "
        "small batches, base 0.075); the base is --lr when given",
    )
    return p


BASE_LR = {"linear": 1.0, "sqrt": 0.075}  # the paper's base lr for each scaling rule (B.1)
# --aug's names: the augmentations the paper's Figure 5 composes (common/augment.py)
AUG_OPS = ("crop", "color", "blur", "rotate", "cutout", "noise", "sobel")


def check_simclr_args(args) -> None:
    """SimCLR's own flags, checked with the shared ones before any work, folder or output."""
    check_range(args, "jitter_strength", 0)
    check_range(args, "blur", 0, 1)
    check_range(args, "momentum", 0, 1, hi_open=True)
    check_range(args, "crop_scale_min", 0, 1, lo_open=True)
    check_range(args, "crop_frac", 0, 1, lo_open=True)
    check_range(args, "lars_eta", 0, lo_open=True)
    if args.proj_dim <= 0:
        raise ConfigError(f"--proj-dim must be > 0, got {args.proj_dim}")
    if args.batch_size is not None and 0 < args.batch_size < 2:  # NT-Xent needs negatives
        raise ConfigError(
            f"--batch-size {args.batch_size}: SimCLR needs at least 2 images per step (each "
            "image's negatives are the other images' views; with 1 the loss is always 0)"
        )
    if args.proj_layers < 0:
        raise ConfigError(f"--proj-layers must be >= 0 (0: no head), got {args.proj_layers}")
    ops = [a.strip() for a in args.aug.split(",") if a.strip()]
    bad = [a for a in ops if a not in AUG_OPS]
    if bad or not ops:
        raise ConfigError(
            f"--aug {args.aug!r}: unknown {', '.join(bad) or '(empty)'}; choose from "
            + ", ".join(AUG_OPS)
        )
    if "blur" in ops and args.blur == 0:
        raise ConfigError("--aug has blur but --blur is 0: drop one of them")
    args.aug = ",".join(ops)


def default_blur(aug: str, big: bool) -> float:
    """--blur's default: the paper blurs ImageNet-sized views (p 0.5), not CIFAR's; naming blur
    in --aug asks for it at any size."""
    return 0.5 if big or "blur" in aug.split(",") else 0.0


def aug_config(args, big: bool) -> AugConfig:
    """The composition --aug names. `crop` is the random resized crop with its flip (the paper
    pairs them); without it every view is the whole image, resized. `color` is the jitter and
    the random grayscale; blur's probability is --blur (default 0.5 when named, and on images
    above 64 px: default_blur); rotate, cutout, noise and sobel are drawn with p 0.5 each."""
    ops = set(args.aug.split(","))
    crop = "crop" in ops
    return AugConfig(
        args.crop_size,
        scale=(args.crop_scale_min, 1.0) if crop else (1.0, 1.0),
        ratio=(3 / 4, 4 / 3) if crop else (1.0, 1.0),
        flip_p=0.5 if crop else 0.0,
        jitter_strength=args.jitter_strength,
        jitter_p=0.8 if "color" in ops else 0.0,
        gray_p=0.2 if "color" in ops else 0.0,
        blur_p=default_blur(args.aug, big) if args.blur is None else args.blur,
        rotate_p=0.5 * ("rotate" in ops),
        cutout_p=0.5 * ("cutout" in ops),
        noise_p=0.5 * ("noise" in ops),
        sobel_p=0.5 * ("sobel" in ops),
    )


# ------------------------------------------------------------------------------------ model
class ProjectionHead(nn.Sequential):
    """g: `layers` x (Linear-BN), with ReLU between, as the official code's nonlinear head
    (model_util.projection_head: BN instead of biases; hidden layers keep the input width).
    layers=2 (SimCLR v1): Linear-BN-ReLU-Linear-BN; layers=3 (run.py's num_proj_layers=3)."""

    def __init__(self, in_dim: int, out_dim: int, layers: int = 2):
        mods: list[nn.Module] = []
        if layers == 0:  # no head: the loss on h itself (the paper's Figure 8, "None")
            super().__init__()
            return
        for _ in range(layers - 1):
            mods += [nn.Linear(in_dim, in_dim, bias=False), nn.BatchNorm1d(in_dim), nn.ReLU(True)]
        super().__init__(*mods, nn.Linear(in_dim, out_dim, bias=False), nn.BatchNorm1d(out_dim))


def build_head(cfg: dict, feat_dim: int) -> nn.Module:
    """g as a checkpoint's config describes it (for `linear_probe.py --head`, which probes z)."""
    return ProjectionHead(feat_dim, cfg["proj_dim"], cfg.get("proj_layers", 2))


class SimCLR(nn.Module):
    def __init__(self, backbone: nn.Module, proj_dim: int, proj_layers: int = 2):
        super().__init__()
        self.backbone = backbone
        self.head = ProjectionHead(backbone.feat_dim, proj_dim, proj_layers)

    def forward(self, views: torch.Tensor) -> torch.Tensor:
        # views: [2n, 3, S, S], both views in one batch so BN normalises over all 2n images
        return self.head(self.backbone(views))  # [2n, proj_dim]


# ------------------------------------------------------------------------------------- loss
# NT-Xent, the paper's eq. (1). This rank's 2n views are the anchors, rows [z1; z2]: anchor i's
# positive is row (i + n) mod 2n, the other view of the same image. The candidates are every
# rank's rows, all-gathered: the negatives come from every GPU. With s the cosine similarity,
#     l_i = -log( exp(s(i, pos_i) / T) / sum_{k != i} exp(s(i, k) / T) )
#         = logsumexp_{k != i} s(i, k) / T  -  s(i, pos_i) / T
# nt_xent_rows(rows, cols, pos_idx, self_idx, T) returns l_i [R] for any such layout: with the
# fused op of csrc/ (it never builds the [R, C] similarity matrix), or with nt_xent_reference,
# the same thing in ~20 lines of plain PyTorch (common/nt_xent.py: normalise, matmul, -inf on
# the anchor itself, cross-entropy against the positive's column).
def simclr_layout(n: int, rank: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Positive and self column of each of this rank's 2n anchors, when the columns are every
    rank's [z1; z2] in rank order (world * 2n columns): both [2n] int64."""
    i = torch.arange(2 * n, device=device)
    self_idx = rank * 2 * n + i
    pos_idx = rank * 2 * n + (i + n) % (2 * n)  # view 1 of image k <-> view 2 of image k
    return pos_idx, self_idx


def nt_xent_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's loss for this rank's [n, d] projections of the two views (unnormalised).

    The scale is the official code's (google-research/simclr, objective.py): loss_a, the mean
    over the view-1 anchors, plus loss_b for view 2, i.e. twice the mean over the 2n anchors.
    It matters beyond the log: LARS adds weight decay to the gradient, so half the loss would
    double the effective weight decay. With several ranks, the all-gather's backward sums every
    rank's gradient into the slice's owner, so after DDP averages them the gradients equal the
    single-process loss's over all anchors."""
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(f"z1 and z2 must both be [n, d], got {tuple(z1.shape)}, {tuple(z2.shape)}")
    n = z1.shape[0]
    rows = torch.cat([z1, z2], 0)  # [2n, d] this rank's anchors
    cols = dist.all_gather_with_grad(rows)  # [world * 2n, d] every rank's: the candidates
    pos_idx, self_idx = simclr_layout(n, dist.get_rank(), z1.device)
    per_anchor = nt_xent_rows(rows, cols, pos_idx, self_idx, temperature)  # [2n] fp32
    return per_anchor[:n].mean() + per_anchor[n:].mean()  # loss_a + loss_b


# -------------------------------------------------------------------------------- optimizer
class LARS(torch.optim.Optimizer):
    """LARS (You et al. 2017) as in SimCLR's code: per-layer trust ratio eta*||w||/||g||, with
    momentum on the scaled update. Groups with `exclude=True` (biases, BN) get neither weight
    decay nor adaptation.

    Every op is a `torch._foreach_*` over a group's tensors (a handful of multi-tensor
    launches instead of ~10 per parameter), the trust ratios stay on the device (no host
    sync), and the momentum buffers are created once, on the first step."""

    def __init__(self, params, lr: float, momentum: float, weight_decay: float, eta: float):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta))

    def _buffers(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        for p in params:  # (first step, or a parameter that had no gradient so far)
            if "momentum_buffer" not in self.state[p]:
                self.state[p]["momentum_buffer"] = torch.zeros_like(p)
        return [self.state[p]["momentum_buffer"] for p in params]

    @torch.no_grad()
    def step(self):
        for g in self.param_groups:
            params = [p for p in g["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            bufs = self._buffers(params)
            if g.get("exclude", False):
                update = torch._foreach_mul(grads, g["lr"])  # trust 1
            else:
                grads = torch._foreach_add(grads, params, alpha=g["weight_decay"])
                w_norm = torch.stack(torch._foreach_norm(params))  # [n_params], on the device
                g_norm = torch.stack(torch._foreach_norm(grads))
                ok = (w_norm > 0) & (g_norm > 0)
                trust = torch.where(ok, g["eta"] * w_norm / g_norm.clamp_min(1e-30), 1.0)
                update = torch._foreach_mul(grads, list((trust * g["lr"]).unbind()))
            torch._foreach_mul_(bufs, g["momentum"])
            torch._foreach_add_(bufs, update)
            torch._foreach_sub_(params, bufs)


def param_groups(model: nn.Module) -> list[dict]:
    """Biases and BN parameters (the 1-D tensors) are excluded from decay and adaptation."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    rest = [p for p in model.parameters() if p.ndim <= 1]
    return [{"params": decay}, {"params": rest, "exclude": True}]


# ------------------------------------------------------------------------------- pretext eval
def positive_hits(z1: torch.Tensor, z2: torch.Tensor) -> int:
    """How many of the 2n anchors of z1, z2 [n, d] (the two views' projections) have their
    positive (the other view of the same image) as the most cosine-similar of the 2n - 1 other
    embeddings: SimCLR's pretext task, scored as top-1 (the temperature does not change it)."""
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)  # [2n, d]
    sim = z @ z.T  # [2n, 2n]
    sim.fill_diagonal_(float("-inf"))  # an anchor is not its own candidate
    n = z1.shape[0]
    pos = (torch.arange(2 * n, device=z.device) + n) % (2 * n)  # i <-> i + n
    return int((sim.argmax(1) == pos).sum())


@torch.no_grad()
def pretext_top1(model, images: torch.Tensor, aug, batch: int, device, seed: int) -> float:
    """Percent of test anchors whose top match among the 2N - 1 is their positive (chance
    1 / (2N - 1)), on batches of N = the training batch (the candidate set the loss saw) of
    uint8 images [M, H, W, 3], two views each from `aug` seeded by (seed, batch index). A ragged
    last batch (fewer candidates: easier) is dropped unless it is the only one. BN uses the
    batch's statistics, as in the loss (the official code's contrast_acc is this metric on
    training batches), in a copy of the model: its running statistics are not touched. (With
    running statistics a short run's can lag its weights: a 16-step run scored below an
    untrained network, and above it with batch statistics.) All ranks compute the same number
    (their BN statistics, all-reduced, are the same)."""
    model = copy.deepcopy(model).train()
    hits = total = 0
    chunks = images.split(batch)
    for i, chunk in enumerate(chunks):
        if len(chunk) < batch and len(chunks) > 1:
            break
        gen = step_generator(seed, 0, i, device)
        x = chunk.to(device)
        views = torch.cat([aug(x, gen), aug(x, gen)])  # [2n, 3, S, S]
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            z = model(views)
        hits, total = hits + positive_hits(*z.float().chunk(2)), total + 2 * len(chunk)
    return 100.0 * hits / max(total, 1)


# ------------------------------------------------------------------------------------ train
def step_loss(
    model: Callable[[torch.Tensor], torch.Tensor],
    aug: BatchAugment,
    images: torch.Tensor,
    gen: torch.Generator | None,
    temperature: float,
) -> torch.Tensor:
    """One step's loss, with no host sync: images uint8 [n, H, W, 3] on the device -> two
    views -> projections -> NT-Xent."""
    cuda = images.is_cuda
    views = torch.cat([aug(images, gen), aug(images, gen)])  # [2n, 3, S, S]
    if cuda:
        views = views.contiguous(memory_format=torch.channels_last)
    with torch.autocast(images.device.type, torch.bfloat16, enabled=cuda):
        z = model(views)  # [2n, proj_dim]
    # On CUDA the fused op takes the bf16 projections (tensor cores; it accumulates in fp32,
    # and the reference upcasts); elsewhere z is fp32 already.
    z1, z2 = (z if cuda else z.float()).chunk(2)  # [n, proj_dim] each
    return nt_xent_loss(z1, z2, temperature)


def main(args):
    check_simclr_args(args)
    if args.lr is None:
        args.lr = BASE_LR[args.lr_scaling]
    device, out = setup_run(args)
    rank = dist.get_rank()

    train = load_split(args.data, "train", include_unlabeled=True).subset(
        args.limit_train, args.seed
    )
    test = load_split(args.data, "test").subset(args.limit_test, args.seed)
    args.image_size = train.image_size
    args.crop_size = args.crop_size or max(8, round(args.crop_frac * train.image_size))
    args.stem = stem_for(args.crop_size)
    big = args.crop_size > 64  # ImageNet-like images: the paper's ImageNet augmentation strength
    if args.jitter_strength is None:  # (0 is a valid strength: no colour jitter)
        args.jitter_strength = 1.0 if big else 0.5
    if args.blur is None:  # resolved here, so that the run's config records it
        args.blur = default_blur(args.aug, big)
    aug = BatchAugment(aug_config(args, big), train.mean, train.std)

    backbone = build_backbone(
        args.backbone, args.stem, args.width, zero_init_residual=args.zero_init_residual
    )
    model = SimCLR(backbone, args.proj_dim, args.proj_layers)
    model = place_model(model, device)
    scale = args.batch_size / 256 if args.lr_scaling == "linear" else math.sqrt(args.batch_size)
    peak_lr = args.lr * scale
    opt = LARS(param_groups(model), peak_lr, args.momentum, args.weight_decay, args.lars_eta)

    feed = BatchFeed(train.images, args.batch_size, device, args.seed)
    # Every log line also reports log(2N - 1) - L, the InfoNCE lower bound on the mutual
    # information between the two views (nats), with L the mean NT-Xent per anchor. The logged
    # loss is the official loss_a + loss_b (nt_xent_loss), twice that mean: hence loss / 2.
    # Derived from the loss already synced for the line: no extra host sync.
    log_2n_1 = math.log(2 * args.batch_size - 1)

    def infonce_bound(metrics: dict[str, float]) -> dict[str, float]:
        return {"infonce_bound": log_2n_1 - metrics["loss"] / 2}

    run = TrainRun(
        args,
        out,
        "simclr",
        backbone=model.backbone,
        head=model.head,
        optimizer=opt,
        steps_per_epoch=feed.steps_per_epoch,
        peak_lr=peak_lr,
        derived_metrics=infonce_bound,
    )
    ddp_model = dist.wrap_ddp(model, device)
    # the step's forward: DDP, compiled (the k-NN evaluation runs the backbone eagerly)
    train_forward = compile_model(ddp_model, args.compile)

    def evaluate(epoch):
        acc = knn_top1(
            model.backbone, labelled(train).subset(args.knn_bank, args.seed), test, device
        )
        run.log.write({"step": run.step, "epoch": epoch, "knn_top1": acc})
        if dist.is_main():
            print(f"epoch {epoch} k-NN top-1 {acc:.2f}%", flush=True)
        return acc

    for images in run.batches(feed, evaluate):
        # Both views from one generator of the device, seeded by (seed, rank, step): resumable,
        # per rank, and drawn on the GPU (the step's one host sync is run.nonfinite's).
        gen = step_generator(args.seed, rank, run.step, device)
        lr = run.set_lr(opt)
        loss = step_loss(train_forward, aug, images, gen, args.temperature)
        if run.nonfinite(loss):  # stops the run, or skips this update with --skip-nonfinite
            continue
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        run.step_done(loss, lr=lr)
    if run.stopped:
        return run.finish(nt_xent=nt_xent_impl_used())
    knn = evaluate(args.epochs)
    pretext = pretext_top1(model, test.images, aug, args.batch_size, device, args.seed)
    return run.finish(knn_top1=knn, pretext_top1=pretext, nt_xent=nt_xent_impl_used())


if __name__ == "__main__":
    run_cli(main, apply_preset(get_args_parser().parse_args(), PRESETS))
