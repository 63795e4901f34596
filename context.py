"""Context prediction: learning by predicting where a patch sits relative to another one.

Paper: Doersch, Gupta, Efros. "Unsupervised Visual Representation Learning by Context
Prediction", ICCV 2015 (arXiv:1505.05192).

Method: from an image, take a centre patch and one of its 8 neighbours on a 3x3 grid; a
siamese network embeds both patches with the same trunk, concatenates the two embeddings (late
fusion: neither patch sees the other before the fully-connected layers) and classifies which of
the 8 positions the second patch came from. Solving this needs object and scene layout ("the
wheel is below the car door"), so the trunk's features transfer. The paper blocks the shortcuts:
- a gap between patches (half a patch: 48 px for 96 px patches) and a random jitter of each
  patch (up to 7 px), so that lines and textures cannot simply be continued across the border;
- chromatic aberration: lenses shift green against magenta towards the image's edges, which
  tells a patch's absolute position. The paper removes it by "projection" (multiply every pixel
  by A = I - B^T B / (B B^T), B = [-1, 2, -1]: the green-magenta axis projected out) or by
  "colour dropping" (keep one random channel per patch, replace the other two with Gaussian
  noise of 1/100 of the kept channel's std). Both are here (--chroma); projection is the
  default: deterministic, and the probe's colour input stays close to what training saw.
Labels 0..7 are the neighbours in raster order (paper, Fig. 2): 0 top-left, 1 top, 2 top-right,
3 left, 4 right, 5 bottom-left, 6 bottom, 7 bottom-right of the centre patch.

Choices made here:
- 32x32 images (CIFAR): a 3x3 grid of patches with half-patch gaps spans 4 patch sides plus
  the jitter, so native CIFAR patches would be ~7 px, too small for a ResNet (its last stage
  would see 1x1).
  As the paper works on a resized image, the image is upsampled x3 to a 96 px canvas and the
  patches are 16 px there (5.3 source pixels), gap 8 (half a patch, as the paper's 48/96) and
  jitter +-1 (the paper's ratio, 7 px per 96 px patch; the gap never closes below 6 px, 2
  source pixels: a larger jitter, +-3, let it shrink to under one source pixel, where edges
  continue across it). The grid's place is random.
- JPEG shortcut (small images): JPEG stores 8x8-pixel blocks, and at CIFAR's native resolution
  their edges are visible. If neighbouring patches are not a whole number of blocks apart, the
  block grid's phase in the neighbour against the centre tells the direction: with 20 px
  patches and 10 px gaps (10 source px apart, 2 px off the block grid) the network learnt
  that and not the content (cpu preset: 66% position accuracy, but a linear probe below a
  random network's). So patches are exactly 8 source px apart (patch + gap = 24 canvas px):
  the phase difference is then the jitter alone, the same for every label (same run: 56%). Any JPEG dataset (this repo's CIFAR copy,
  ImageNet) has the artefact; torchvision's CIFAR-10 binaries do not, and lose nothing by it.
  The upsampling is implicit: roi_align samples each patch from the 32x32 image at exactly the
  canvas pixel centres (bilinear, the same values as F.interpolate then cropping), so no 96 px
  image is ever built. Bigger images (Imagenette, 224) use the image itself as the canvas with
  patches of 5/24 of it (47 px, gap 23, jitter 3: 7/96 of the patch). Each patch holds at most
  ~45 source pixels at 32 px (paper: some patches are downsampled to 100 pixels against
  pixelation shortcuts), so that augmentation is not needed here and is not done.
- Batches: every image gives its centre patch with all 8 neighbours, 8 labelled pairs (the
  paper samples one random pair at a time). Same task and loss, but the centre's embedding is
  shared, so 8 pairs cost 9 patch embeddings instead of 16, and every batch has balanced
  labels: on CIFAR this reaches a given accuracy in about half the compute of single pairs.
  --batch-size counts images (x 8 pairs, x 9 patches through the trunk).
- Trunk: the common ResNet (CIFAR stem for patches <= 64 px), not the paper's AlexNet-style
  net; fusion head: concat(2 x feat_dim) -> Linear -> BN -> ReLU -> Linear(8) (the paper's
  fc7 and fc8 on top of each patch's fc6; our fc6 is the trunk's pooled feature).
- Optimiser: SGD with momentum 0.9 and weight decay 5e-4, batch norm in the trunk (the paper:
  SGD, with batch normalisation), the shared warm-up + cosine schedule; lr 0.1 per 256 pairs
  (32 images), linear in the batch.
- linear_probe.py, evaluate.py and the k-NN evaluate the trunk on whole 32x32 images with the
  colours it trained on: green-magenta projected, then normalised (the checkpoint's input
  "rgb_project"; with --chroma drop, plain RGB), at native size, not 3x-upsampled patches: one
  protocol for all methods (linear_probe.py --upsample 3 gives the training scale).
- --neighbour-only: the ablation in which the head sees the neighbour's embedding alone. On
  noise images neither it nor the pair beats chance (tests/test_context.py: no low-level cue
  to a patch's place); on photographs it measures what one patch's content says.

Run:
  python context.py                                  # CIFAR-10 in ./data, GPU recipe if CUDA
  torchrun --nproc_per_node=8 context.py --data ./data
  python context.py --preset cpu --data ../shared/data/cifar10-jpeg.tar.gz
  python linear_probe.py runs/context --data ./data  # evaluate
Expect: relative-position accuracy on the test set ("pretext_top1", chance 12.5%) of ~17%
after `--preset tiny` (288 steps, under a CPU minute) and 58% after `--preset cpu` (10.5 min on
one core of 2); on that budget the features stay below a random network's under the linear
probe (30.0% against 32.8% for the untrained trunk fed the same projected colours): at 32 px
the pair is solved by comparing the two patches in a way that does not make features (the
neighbour-only ablation trains better ones; README, "Context prediction at 32 px").
"""

from __future__ import annotations

import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.ops import roi_align

try:  # a script copied on its own: say what else to copy, not a traceback
    import common  # noqa: F401
except ModuleNotFoundError:
    print(
        "error: context.py needs the common/ folder next to it: copy common/ with it",
        file=sys.stderr,
    )
    raise SystemExit(2) from None

from common import dist
from common.augment import to_float
from common.backbones import build_backbone, stem_for
from common.cli import ConfigError, apply_preset, base_parser, run_cli
from common.color import project_green_magenta
from common.data import load_split
from common.eval import knn_top1, labelled
from common.feed import BatchFeed, step_generator
from common.train import TrainRun, decay_groups, place_model, setup_run

# ----------------------------------------------------------------------------------- config
# Presets fill every flag the user did not give (explicit flags win). `gpu` adapts the paper
# (SGD + BN, one pair per image, long training) to CIFAR-10 on a ResNet-18; `tiny` proves the
# pipeline in seconds (tests); `cpu` is ~10 minutes on 2 cores with simclr's cpu backbone.
# fmt: off
#                  tiny      cpu       gpu
_TABLE = {
    "epochs":        (3,        3,        200),    # passes over the (limited) training set
    "batch_size":    (16,       32,       128),    # global batch of images (x 8 pairs)
    "lr":            (0.1,      0.1,      0.1),    # SGD lr per 256 pairs: peak = lr * 8N / 256
    "weight_decay":  (5e-4,     5e-4,     5e-4),   # on weights only (not biases, not BN)
    "warmup_epochs": (0.5,      0.2,      5),      # linear warm-up, then cosine decay to 0
    "backbone":      ("resnet18", "resnet18", "resnet18"),
    "width":         (8,        16,       64),     # ResNet width (64 = the real ResNet-18)
    "limit_train":   (1536,     25000,    None),   # random subset of train images (None: all)
    "log_every":     (8,        20,       50),     # steps between log lines
    "eval_every":    (0,        0,        20),     # epochs between evaluations (0: at the end)
    "knn_bank":      (2000,     None,     None),   # train images in the k-NN bank (None: all)
    "pretext_test":  (2000,     None,     None),   # test images for the position accuracy
}
# fmt: on
PRESETS = {
    name: {k: v[i] for k, v in _TABLE.items()} for i, name in enumerate(("tiny", "cpu", "gpu"))
}


def get_args_parser():
    p = base_parser("context", __doc__)
    p.add_argument(
        "--canvas",
        type=int,
        help="side the image is (implicitly) resized to (default 96 px "
        "for images <= 64 px, else the image size); --crop-size is the patch side on it",
    )
    p.add_argument(
        "--gap",
        type=int,
        help="pixels between neighbouring patches (default P/2; images <= 64 px without "
        "--crop-size: 16 px patches 8 px apart, one JPEG block between neighbours)",
    )
    p.add_argument(
        "--jitter", type=int, help="max shift of each patch per axis (default 7/96 P, the paper's)"
    )
    p.add_argument(
        "--chroma",
        choices=["project", "drop"],
        default="project",
        help="chromatic-aberration removal: green-magenta projection or colour drop",
    )
    p.add_argument(
        "--neighbour-only",
        action="store_true",
        help="ablation: the head sees only the neighbour's embedding (the centre's is zeroed), "
        "so the position must be read from one patch alone (chance 12.5%% if it cannot be)",
    )
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    p.add_argument("--pretext-test", type=int, help="test images for the position accuracy")
    return p


# ------------------------------------------------------------------------------ pretext task
# (dy, dx) of the neighbour relative to the centre patch, for labels 0..7 (raster order).
JPEG_BLOCK = 8  # JPEG's block side in pixels (source images <= 64 px: the docstring)
JITTER_FRAC = 7 / 96  # the paper's jitter, 7 px on 96 px patches, as a fraction of the patch
NEIGHBOURS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))


def sample_grid(
    n: int, image_size: int, canvas: int, patch: int, gap: int, jitter: int, gen
) -> torch.Tensor:
    """Boxes of the 9 patches of n images, on the CPU: [n, 9, 4] = (top, left, h, w) in
    source-image pixels. Patch 0 is the centre, patch k + 1 the neighbour with label k.

    Positions are integer canvas pixels, as crops of the image resized to canvas x canvas: the
    3x3 grid (3 patches + 2 gaps = `span`) sits at a random offset that leaves room for the
    jitter, and every patch moves by its own uniform shift in [-jitter, jitter] per axis.
    """
    span = 3 * patch + 2 * gap
    free = canvas - span - 2 * jitter  # >= 0, checked in main
    origin = jitter + torch.randint(0, free + 1, (n, 1, 2), generator=gen)  # grid's (y, x)
    cells = torch.tensor(((0, 0), *NEIGHBOURS)) + 1  # [9, 2] grid cell (row, col)
    shift = torch.randint(-jitter, jitter + 1, (n, 9, 2), generator=gen)
    top_left = origin + cells * (patch + gap) + shift  # [n, 9, 2] canvas pixels
    scale = canvas / image_size
    return torch.cat([top_left / scale, torch.full((n, 9, 2), patch / scale)], 2)


def drop_colours(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """The paper's "colour dropping", per patch: keep one random channel, replace the other two
    with Gaussian noise whose std is 1/100 of the kept channel's. x: normalised [m, 3, h, w]."""
    m = len(x)
    keep = torch.randint(0, 3, (m,), generator=gen).to(x.device)
    noise = torch.randn(x.shape, generator=gen).to(x.device)
    kept = x[torch.arange(m, device=x.device), keep]  # [m, h, w]
    sd = kept.flatten(1).std(1).view(m, 1, 1, 1) / 100
    mask = F.one_hot(keep, 3).bool().view(m, 3, 1, 1)
    return torch.where(mask, x, noise * sd)


def make_patches(images, args, mean, std, gen) -> torch.Tensor:
    """uint8 [n, H, W, 3] -> the 9 patches of every image, normalised: [n, 9, 3, P, P].

    One roi_align call crops all 9n patches: a box P/scale source pixels wide resized to P
    samples exactly at the canvas pixel centres (the module docstring's implicit upsampling;
    the same call as common.augment.resized_crop, with 9 boxes per image).
    """
    x = to_float(images)  # [n, 3, H, W]
    n, P = len(x), args.crop_size
    boxes = sample_grid(n, x.shape[-1], args.canvas, P, args.gap, args.jitter, gen)
    top, left, h, w = boxes.view(9 * n, 4).to(x.device).unbind(1)
    idx = torch.arange(n, device=x.device, dtype=torch.float32).repeat_interleave(9)
    rois = torch.stack([idx, left, top, left + w, top + h], 1)  # [9n, 5] = (b, x1, y1, x2, y2)
    p = roi_align(x, rois, (P, P), spatial_scale=1.0, sampling_ratio=-1, aligned=True)
    if args.chroma == "project":
        p = (project_green_magenta(p) - mean) / std
    else:
        p = drop_colours((p - mean) / std, gen)
    return p.view(n, 9, 3, P, P)


def pair_labels(n: int, device) -> torch.Tensor:
    """Labels of the 8n pairs ContextNet forms from n images: [0..7] per image, [8n]."""
    return torch.arange(8, device=device).repeat(n)


# ------------------------------------------------------------------------------------ model
class LateFusionHead(nn.Module):
    """concat(f_centre, f_neighbour) [m, 2D] -> fc7 (Linear-BN-ReLU) -> fc8 [m, 8]."""

    def __init__(self, feat_dim: int):
        super().__init__()
        self.fc7 = nn.Sequential(
            nn.Linear(2 * feat_dim, 2 * feat_dim, bias=False),
            nn.BatchNorm1d(2 * feat_dim),
            nn.ReLU(inplace=True),
        )
        self.fc8 = nn.Linear(2 * feat_dim, 8)

    def forward(self, fc: torch.Tensor, fn: torch.Tensor) -> torch.Tensor:
        return self.fc8(self.fc7(torch.cat([fc, fn], 1)))


class ContextNet(nn.Module):
    def __init__(self, backbone: nn.Module, neighbour_only: bool = False):
        super().__init__()
        self.backbone = backbone
        self.head = LateFusionHead(backbone.feat_dim)
        self.neighbour_only = neighbour_only  # ablation: zero the centre's embedding

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """patches [n, 9, 3, P, P] -> logits [8n, 8] of the pairs (centre, neighbour k),
        k = 0..7 per image (labels: pair_labels). Siamese: one trunk embeds all 9n patches in
        one batch, each centre's embedding is shared by its 8 pairs (9 embeddings for 8
        labelled pairs instead of 16)."""
        n = len(patches)
        f = self.backbone(patches.flatten(0, 1)).view(n, 9, -1)  # [n, 9, D]
        centre = f[:, :1].expand(-1, 8, -1).reshape(8 * n, -1)  # [8n, D]
        if self.neighbour_only:
            centre = torch.zeros_like(centre)
        return self.head(centre, f[:, 1:].reshape(8 * n, -1))  # [8n, 8]


@torch.no_grad()
def position_accuracy(model, test, args, mean, std, device, chunk: int = 250) -> float:
    """Relative-position top-1 (%) on (a fixed random subset of) the test images, all 8 pairs
    of each, grid offsets and jitter from a fixed generator per chunk (the same pairs at every
    evaluation and any world size). Chunks go round-robin to the ranks; the counts are summed."""
    was_training = model.training
    model.eval()
    images = test.subset(args.pretext_test, args.seed).images  # a fixed random subset
    ws, rank = dist.get_world_size(), dist.get_rank()
    counts = torch.zeros(2, device=device, dtype=torch.float64)  # [correct, total]
    for i in range(rank * chunk, len(images), ws * chunk):
        gen = torch.Generator().manual_seed(args.seed * 7919 + i)
        patches = make_patches(images[i : i + chunk].to(device), args, mean, std, gen)
        y = pair_labels(len(patches), device)
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            pred = model(patches).argmax(1)
        counts += torch.stack([(pred == y).sum().double(), torch.tensor(len(y), device=device)])
    model.train(was_training)
    counts = dist.all_reduce_mean(counts)  # mean over ranks: the ratio of sums is unchanged
    return 100.0 * (counts[0] / counts[1]).item()


# ------------------------------------------------------------------------------------ train
def set_geometry(args) -> None:
    """Fill in the canvas, patch side (--crop-size), gap and jitter left unset (None), in canvas
    pixels, for images of args.image_size (the module docstring's choices)."""
    small = args.image_size <= 64  # decoded at native size: JPEG's 8 px blocks show
    args.canvas = args.canvas or (96 if small else args.image_size)
    scale = args.canvas / args.image_size  # canvas px per source px
    if small and not args.crop_size:  # patch + gap = one JPEG block (8 source px): no shortcut
        step = round(JPEG_BLOCK * scale)
        args.crop_size = step * 2 // 3  # the patch side (16 on 96)
        args.gap = step - args.crop_size if args.gap is None else args.gap
    args.crop_size = args.crop_size or round(args.canvas * 5 / 24)  # the paper's 5/24
    args.gap = args.crop_size // 2 if args.gap is None else args.gap
    if args.jitter is None:  # the paper's ratio, at least one canvas pixel
        args.jitter = max(1, round(JITTER_FRAC * args.crop_size))


def main(args):
    device, out = setup_run(args)
    rank = dist.get_rank()

    train = load_split(args.data, "train", include_unlabeled=True).subset(
        args.limit_train, args.seed
    )
    test = load_split(args.data, "test")
    # The checkpoint's config (vars(args)) must say how to rebuild the backbone: set these now.
    args.image_size = train.image_size
    set_geometry(args)
    args.stem = stem_for(args.crop_size)
    # The probe feeds what the trunk trained on: projected colours (dropped colours: plain RGB).
    args.input = "rgb_project" if args.chroma == "project" else "rgb"
    free = args.canvas - 3 * args.crop_size - 2 * args.gap - 2 * args.jitter
    if min(args.gap, args.jitter) < 0 or args.crop_size <= 0 or free < 0:
        raise ConfigError(
            f"3 patches of {args.crop_size} px, 2 gaps of {args.gap} and jitter {args.jitter} on "
            f"both sides do not fit a canvas of {args.canvas} px (or a value is negative)"
        )
    if args.pretext_test is not None and args.pretext_test <= 0:
        raise ConfigError("--pretext-test must be > 0")
    mean = torch.tensor(train.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(train.std, device=device).view(1, 3, 1, 1)

    model = ContextNet(build_backbone(args.backbone, args.stem, args.width), args.neighbour_only)
    model = place_model(model, device)
    peak_lr = args.lr * 8 * args.batch_size / 256  # per 256 pairs
    opt = torch.optim.SGD(
        decay_groups(model),  # no weight decay on biases and BN
        lr=peak_lr,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
    )

    feed = BatchFeed(train.images, args.batch_size, device, args.seed)
    run = TrainRun(
        args,
        out,
        "context",
        backbone=model.backbone,
        head=model.head,
        optimizer=opt,
        steps_per_epoch=feed.steps_per_epoch,
        peak_lr=peak_lr,
    )
    ddp = dist.wrap_ddp(model, device)

    def evaluate(epoch):
        pos = position_accuracy(model, test, args, mean, std, device)
        knn = knn_top1(
            model.backbone, labelled(train).subset(args.knn_bank, args.seed), test, device
        )
        run.log.write({"step": run.step, "epoch": epoch, "pretext_top1": pos, "knn_top1": knn})
        if dist.is_main():
            print(f"epoch {epoch} position top-1 {pos:.2f}% k-NN top-1 {knn:.2f}%", flush=True)
        return pos, knn

    for images in run.batches(feed, evaluate):
        # images: uint8 [n, H, W, 3] on the device; randomness from (seed, rank, step).
        gen = step_generator(args.seed, rank, run.step)
        patches = make_patches(images, args, mean, std, gen)  # [n, 9, 3, P, P]
        y = pair_labels(len(patches), device)  # [8n]
        if device.type == "cuda":  # channels_last wants 4-D: [9n, 3, P, P] viewed back
            patches = patches.flatten(0, 1).contiguous(memory_format=torch.channels_last)
            patches = patches.view(-1, 9, *patches.shape[1:])
        lr = run.set_lr(opt)
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            logits = ddp(patches)  # [8n, 8]
        loss = F.cross_entropy(logits.float(), y)
        if run.nonfinite(loss):  # stops the run, or skips this update with --skip-nonfinite
            continue
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        metrics = {"lr": lr}
        if (run.step + 1) % args.log_every == 0 or run.step + 1 == run.total:
            acc = (logits.argmax(1) == y).float().mean()  # only when logged: .item() syncs
            metrics["train_top1"] = 100.0 * dist.all_reduce_mean(acc.detach()).item()
        run.step_done(loss, **metrics)
    if run.stopped:
        return run.finish()
    pos, knn = evaluate(args.epochs)
    return run.finish(pretext_top1=pos, knn_top1=knn)


if __name__ == "__main__":
    run_cli(main, apply_preset(get_args_parser().parse_args(), PRESETS))
