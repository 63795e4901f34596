"""Jigsaw puzzles: learning visual representations by solving a shuffled 3x3 grid of tiles.

Paper: Noroozi, Favaro. "Unsupervised Learning of Visual Representations by Solving Jigsaw
Puzzles", ECCV 2016 (arXiv:1603.09246); details from the authors' PyTorch port
(bbrattoli/JigsawPuzzlePytorch).

Method: cut a square region of the image into a 3x3 grid of cells and take one tile from each
cell, at a random place inside the cell: the random gaps and jitter between tiles mean that
edges and textures cannot simply be continued across borders. Each tile is normalised on its
own (per channel: mean 0, std 1), so that brightness and contrast do not match up either. The
tiles are shuffled by one of P permutations chosen in advance, and the network predicts which
(P-way softmax). The context-free network (CFN) runs one shared trunk on every tile (it sees
one tile at a time), concatenates the 9 tile features in the shuffled order and classifies them
with an MLP: solving the puzzle needs object parts and their layout ("the wheel below the door").
The permutation set is built by the paper's greedy algorithm: starting from a random one, add
the permutation whose minimum Hamming distance to the chosen set is largest (ties: the largest
sum of distances, the paper's Algorithm 1 criterion, then the first in lexicographic order),
so that any two puzzles differ in many tiles. It is computed deterministically (fixed seed)
and cached under the data cache directory. Labels: position j of the input holds the tile of
grid cell perms[label][j] (cells in raster order).

Choices made here:
- 32x32 images (CIFAR): the tile size trades compute against the trunk's geometry.
  `--upsample 1` (tiny, cpu presets) cuts the grid from the native image: a random 24 px
  region, cells of 8 px, tiles of 6 px (the paper's 64/75 ratio), so each tile moves by 0-2 px
  per axis and neighbours are 0-4 px apart. A puzzle costs ~0.3 CIFAR images of compute, and on
  2 CPU cores the number of puzzles decides. The price: the last ResNet stage sees a 6 px tile
  as a 1x1 map, which trains only the centre taps of its 3x3 kernels, so probe `--layer 3`
  too. `--upsample 2` (gpu preset) resizes the image x2 (bilinear) to a 64 px canvas: cells of
  16 px, tiles of 13 (jitter 0-3, gaps 0-6 px); the last stage sees 2x2 maps, for ~1.5 CIFAR
  images per puzzle. Images over 64 px are used as they are (Imagenette 224: cells of 74 px,
  tiles of 63, as the paper's 75/64).
- JPEG shortcut (small images): JPEG stores 8x8-pixel blocks, whose edges show at CIFAR's
  native resolution. With cells of 10 px, a tile's place in the block grid said which cell it
  came from, and the network solved 99% of the 100-way puzzles from that, not from content
  (its features probed below a random network's). So cells are exactly one block (8 source px,
  x upsample) and the grid's origin ranges over a whole block: every cell then has the same
  block phase (the same cpu run: 40% of puzzles, features above random; README). Any JPEG data
  (this repo's CIFAR copy, ImageNet) has the artefact; torchvision's CIFAR binaries do not.
- Colour: the paper trains on colour and grey images against chromatic-aberration shortcuts;
  here every image is turned grey with p 0.3 (as the authors' port). Per-tile normalisation also
  removes each tile's colour cast.
- Trunk: the common ResNet (not the paper's AlexNet). Head: fc6 Linear(D, D)-BN-ReLU on each
  tile (the paper's per-tile fc6, 512 at width 64), concatenation [9D], fc7 Linear(9D, 8D)-BN-
  ReLU (4096 at width 64, the paper's) and fc8 Linear(8D, P).
- Optimiser: SGD, momentum 0.9, wd 5e-4 (the paper's) on weights, batch 256, lr 0.1 per 256
  puzzles with the shared warm-up + cosine schedule (the paper's lr 0.01 was for a BN-free
  AlexNet; 0.1 is Goyal et al.'s ResNet jigsaw recipe, ICCV 2019). P: 1000 (gpu) as the paper,
  100 (cpu, the default the paper also studies). The tiny preset (tests) uses P = 10, the first
  10 of the same greedy sequence (minimum distance 8): a 100-way puzzle takes several hundred
  steps to leave the log(P) plateau, too long and too erratic for a test, while P = 10 reaches
  ~30% (chance 10%) in 320 steps (14 CPU seconds).
- linear_probe.py and the k-NN evaluate the trunk on whole 32x32 images (RGB, normalised with
  the dataset's statistics), not on tiles: one protocol for all methods.

Run:
  python jigsaw.py                                  # CIFAR-10 in ./data, GPU recipe if CUDA
  torchrun --nproc_per_node=8 jigsaw.py --data ./data
  python jigsaw.py --preset cpu --data ../shared/data/cifar10-jpeg.tar.gz
  python linear_probe.py runs/jigsaw --data ./data --layer 3   # evaluate a stage (1-4)
Expect: puzzle accuracy on the test set ("pretext_top1", chance 1/P) far above chance within
minutes: the `cpu` preset (~12 min on 2 cores) solves 40% of 100-way puzzles, and a probe of
block 3 (10k train images) gives 40.7% linear against 36.0% from random init; the README has
the commands.
"""

from __future__ import annotations

import itertools
import os
import sys
import tempfile

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

try:  # a script copied on its own: say what else to copy, not a traceback
    import common  # noqa: F401
except ModuleNotFoundError:
    print(
        "error: jigsaw.py needs the common/ folder next to it: copy common/ with it",
        file=sys.stderr,
    )
    raise SystemExit(2) from None

from common import dist
from common.augment import rgb_to_gray, to_float
from common.backbones import build_backbone, stem_for
from common.cli import ConfigError, apply_preset, base_parser, run_cli
from common.data import default_cache_dir, load_split
from common.eval import knn_top1, labelled
from common.feed import BatchFeed, step_generator
from common.train import TrainRun, decay_groups, place_model, setup_run

# ----------------------------------------------------------------------------------- config
JPEG_BLOCK = 8  # JPEG's block side in pixels (images <= 64 px: see the docstring)

# Presets fill every flag the user did not give (explicit flags win). `gpu` adapts the paper to
# CIFAR-10 on a ResNet-18 (P = 1000, 13 px tiles, SGD + BN as Goyal et al. 2019's ResNet
# jigsaw, long training); `tiny` proves the pipeline in seconds (tests); `cpu` is ~10 minutes
# on 2 cores with simclr's cpu backbone (ResNet-18, width 16) and 6 px tiles.
# fmt: off
#                  tiny      cpu       gpu
_TABLE = {
    "epochs":        (10,       11,       200),    # passes over the (limited) training set
    "batch_size":    (32,       128,      256),    # global batch of puzzles (9 tiles each)
    "lr":            (0.2,      0.1,      0.1),    # SGD lr per 256 puzzles; peak = lr * N / 256
    "weight_decay":  (5e-4,     5e-4,     5e-4),   # on weights only (not biases, not BN)
    "warmup_epochs": (0.5,      0.5,      5),      # linear warm-up, then cosine decay to 0
    "num_perms":     (10,       100,      1000),   # P: puzzle classes (the paper: 1000)
    "upsample":      (1,        1,        2),      # CIFAR: 6 px tiles (x1) or 13 px (x2)
    "backbone":      ("resnet18", "resnet18", "resnet18"),
    "width":         (8,        16,       64),     # ResNet width (64 = the real ResNet-18)
    "limit_train":   (1024,     None,     None),   # random subset of train images (None: all)
    "log_every":     (16,       50,       50),     # steps between log lines
    "eval_every":    (0,        0,        20),     # epochs between evaluations (0: at the end)
    "knn_bank":      (2000,     None,     None),   # train images in the k-NN bank (None: all)
}
# fmt: on
PRESETS = {
    name: {k: v[i] for k, v in _TABLE.items()} for i, name in enumerate(("tiny", "cpu", "gpu"))
}


def get_args_parser():
    p = base_parser("jigsaw", __doc__)
    p.add_argument("--num-perms", type=int, help="P, the size of the permutation set")
    p.add_argument("--perm-seed", type=int, default=0, help="seed of the set's first permutation")
    p.add_argument(
        "--upsample", type=int, help="resize images <= 64 px by this factor before cutting tiles"
    )
    p.add_argument(
        "--tile", type=int, help="tile side in (upsampled) pixels (default: cell * 64/75)"
    )
    p.add_argument("--gray-p", type=float, default=0.3, help="probability of a grey image")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    return p


# ------------------------------------------------------------------------- permutation set
def hamming_set(num: int, seed: int = 0, n: int = 9) -> tuple[np.ndarray, int]:
    """The paper's greedy maximal-minimum-Hamming-distance permutation set.

    Returns (perms [num, n] int64, d_min): d_min is the smallest distance any permutation had
    to the ones before it when it was added, which is the set's minimum pairwise distance.
    Vectorised over all n! candidates: each step costs one [n!, n] comparison (~5 ms).
    """
    cands = np.array(list(itertools.permutations(range(n))), dtype=np.uint8)  # [n!, n]
    if not 0 < num <= len(cands):
        raise ConfigError(f"--num-perms must be in 1..{len(cands)}, got {num}")
    min_d = np.full(len(cands), n + 1, dtype=np.int64)  # distance to the nearest chosen
    sum_d = np.zeros(len(cands), dtype=np.int64)  # sum of distances to the chosen
    j = int(np.random.default_rng(seed).integers(len(cands)))
    chosen, d_min = [], n
    for _ in range(num):
        chosen.append(j)
        if len(chosen) > 1:
            d_min = min(d_min, int(min_d[j]))
        d = (cands != cands[j]).sum(1)  # [n!]
        np.minimum(min_d, d, out=min_d)
        sum_d += d
        key = min_d * (n * num + 1) + sum_d  # max-min first, the paper's sum breaks ties
        key[chosen] = -1
        j = int(key.argmax())
    return cands[chosen].astype(np.int64), d_min


def load_perms(num: int, seed: int = 0) -> torch.Tensor:
    """hamming_set(num, seed), cached as a .npy under the data cache directory."""
    path = default_cache_dir() / "jigsaw" / f"perms_9_{num}_seed{seed}.npy"
    if path.exists():
        return torch.from_numpy(np.load(path))
    perms, _ = hamming_set(num, seed)
    try:  # atomic: concurrent ranks or runs may write the same file
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npy")
        with os.fdopen(fd, "wb") as f:
            np.save(f, perms)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache only costs the recomputation
    return torch.from_numpy(perms)


# ------------------------------------------------------------------------------ pretext task
def tile_corners(n: int, canvas: int, cell: int, tile: int, gen) -> torch.Tensor:
    """Top-left corners [n, 9, 2] = (y, x) of the 9 tiles of n puzzles, in canvas pixels, cells
    in raster order. The 3x3 grid (3 * cell px) sits at a random integer place on the canvas;
    each tile at a random integer place inside its own cell (the gaps and the jitter)."""
    origin = torch.randint(0, canvas - 3 * cell + 1, (n, 1, 2), generator=gen)
    rc = torch.tensor([(r, c) for r in range(3) for c in range(3)])  # [9, 2]
    jitter = torch.randint(0, cell - tile + 1, (n, 9, 2), generator=gen)
    return origin + rc * cell + jitter


def cut_tiles(x: torch.Tensor, corners: torch.Tensor, tile: int) -> torch.Tensor:
    """x [n, 3, S, S], corners [n, k, 2] -> tiles [n, k, 3, tile, tile] (integer crops)."""
    ar = torch.arange(tile, device=x.device)
    corners = corners.to(x.device)
    rows = (corners[..., 0, None] + ar)[..., :, None]  # [n, k, T, 1]
    cols = (corners[..., 1, None] + ar)[..., None, :]  # [n, k, 1, T]
    b = torch.arange(len(x), device=x.device).view(-1, 1, 1, 1)
    return x[b, :, rows, cols].permute(0, 1, 4, 2, 3)  # [n, k, T, T, 3] -> [n, k, 3, T, T]


def cut_puzzles(
    images: torch.Tensor, perms: torch.Tensor, args, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 [n, H, W, 3] -> shuffled tiles [n, 9, 3, T, T] in [0, 1], labels [n].

    Input position j holds the tile of grid cell perms[label][j] (cells in raster order)."""
    x = to_float(images)  # [n, 3, H, W]
    n = len(x)
    gray = torch.rand(n, generator=gen) < args.gray_p
    x = torch.where(gray.to(x.device).view(-1, 1, 1, 1), rgb_to_gray(x).expand_as(x), x)
    if args.canvas != x.shape[-1]:  # [n, 3, C, C]: bilinear, half-pixel centres
        x = F.interpolate(
            x,
            size=args.canvas,
            mode="bilinear",
            align_corners=False,
            antialias=args.canvas < x.shape[-1],
        )
    corners = tile_corners(n, args.canvas, args.crop_size // 3, args.tile, gen)  # [n, 9, 2]
    labels = torch.randint(0, len(perms), (n,), generator=gen)
    corners = corners[torch.arange(n)[:, None], perms[labels]]  # shuffled: [n, 9, 2]
    return cut_tiles(x, corners, args.tile), labels.to(x.device)


def normalize_tiles(tiles: torch.Tensor) -> torch.Tensor:
    """Each tile and channel to mean 0, std 1 (the paper's per-tile normalisation, per channel
    as the authors' port): no brightness or contrast to match across tiles. [..., 3, T, T]."""
    mean = tiles.mean((-2, -1), keepdim=True)
    std = tiles.std((-2, -1), keepdim=True).clamp_min(1e-2)  # flat tiles: no noise blow-up
    return (tiles - mean) / std


def make_puzzles(images, perms, args, gen) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 [n, H, W, 3] -> network input [n, 9, 3, T, T] and labels [n]."""
    tiles, labels = cut_puzzles(images, perms, args, gen)
    return normalize_tiles(tiles), labels


# ------------------------------------------------------------------------------------ model
class CFNHead(nn.Module):
    """fc6 on each tile's features, concatenation in input order, fc7, fc8 (P classes)."""

    def __init__(self, feat_dim: int, num_perms: int):
        super().__init__()
        d, h = feat_dim, 8 * feat_dim
        self.fc6 = nn.Sequential(nn.Linear(d, d, bias=False), nn.BatchNorm1d(d), nn.ReLU(True))
        self.fc7 = nn.Sequential(nn.Linear(9 * d, h, bias=False), nn.BatchNorm1d(h), nn.ReLU(True))
        self.fc8 = nn.Linear(h, num_perms)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        # f: [n * 9, D], the 9 tiles of each puzzle consecutive
        return self.fc8(self.fc7(self.fc6(f).view(-1, 9 * f.shape[1])))  # [n, P]


class CFN(nn.Module):
    def __init__(self, backbone: nn.Module, num_perms: int):
        super().__init__()
        self.backbone = backbone
        self.head = CFNHead(backbone.feat_dim, num_perms)

    def forward(self, tiles: torch.Tensor) -> torch.Tensor:
        # tiles [n, 9, 3, T, T]: the shared trunk sees every tile alone, as a batch of 9n
        return self.head(self.backbone(tiles.flatten(0, 1)))  # [n, P]


@torch.no_grad()
def puzzle_accuracy(model, test, perms, args, device, chunk: int = 500) -> float:
    """Puzzle top-1 (%) on test images, one puzzle each from a fixed generator (the same
    puzzles at every evaluation). Chunks go round-robin to the ranks; the counts are summed."""
    was_training = model.training
    model.eval()
    images = test.images
    ws, rank = dist.get_world_size(), dist.get_rank()
    counts = torch.zeros(2, device=device, dtype=torch.float64)  # [correct, total]
    for i in range(rank * chunk, len(images), ws * chunk):
        gen = torch.Generator().manual_seed(args.seed * 7919 + i)  # per chunk: any world size
        tiles, y = make_puzzles(images[i : i + chunk].to(device), perms, args, gen)
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            pred = model(tiles).argmax(1)
        counts += torch.stack([(pred == y).sum().double(), torch.tensor(len(y), device=device)])
    model.train(was_training)
    counts = dist.all_reduce_mean(counts)  # mean over ranks: the ratio of sums is unchanged
    return 100.0 * (counts[0] / counts[1]).item()


# ------------------------------------------------------------------------------------ train
def set_geometry(args) -> None:
    """Fill in the canvas, grid region (--crop-size) and tile side left unset, in canvas pixels,
    for images of args.image_size (the module docstring's choices)."""
    small = args.image_size <= 64  # CIFAR, STL-10 at 64: see the docstring; bigger: as they are
    args.canvas = args.image_size * args.upsample if small else args.image_size
    # Small images: cells of one JPEG block (8 source px), so a tile's block phase is the same
    # whatever its cell; the grid's origin then ranges over a whole block (the docstring).
    grid = 3 * JPEG_BLOCK * args.upsample if small else args.canvas // 3 * 3
    args.crop_size = args.crop_size or grid  # the grid region
    args.tile = args.tile or args.crop_size // 3 * 64 // 75


def main(args):
    device, out = setup_run(args)
    rank = dist.get_rank()

    train = load_split(args.data, "train", include_unlabeled=True).subset(
        args.limit_train, args.seed
    )
    test = load_split(args.data, "test").subset(args.limit_test, args.seed)
    # The checkpoint's config (vars(args)) must say how to rebuild the backbone: set these now.
    args.image_size = train.image_size
    args.stem = stem_for(args.image_size)  # the probe runs the trunk on whole images
    if args.upsample <= 0:
        raise ConfigError(f"--upsample must be > 0, got {args.upsample}")
    set_geometry(args)
    if not (0 < args.tile <= args.crop_size // 3 and args.crop_size <= args.canvas):
        raise ConfigError(
            f"a 3x3 grid of {args.crop_size} px with tiles of {args.tile} px does not fit a "
            f"canvas of {args.canvas} px (tile <= crop-size / 3, crop-size <= canvas)"
        )
    if not 0 <= args.gray_p <= 1:
        raise ConfigError(f"--gray-p is a probability, got {args.gray_p}")
    perms = None
    if dist.is_main():  # rank 0 computes (or loads) the set, the others receive it
        perms = load_perms(args.num_perms, args.perm_seed)
    perms = dist.broadcast_object(perms)  # [P, 9] int64

    model = CFN(build_backbone(args.backbone, args.stem, args.width), args.num_perms)
    model = place_model(model, device)
    peak_lr = args.lr * args.batch_size / 256
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
        "jigsaw",
        backbone=model.backbone,
        head=model.head,
        optimizer=opt,
        steps_per_epoch=feed.steps_per_epoch,
        peak_lr=peak_lr,
    )
    ddp = dist.wrap_ddp(model, device)

    def evaluate(epoch):
        acc = puzzle_accuracy(model, test, perms, args, device)
        knn = knn_top1(
            model.backbone, labelled(train).subset(args.knn_bank, args.seed), test, device
        )
        run.log.write({"step": run.step, "epoch": epoch, "pretext_top1": acc, "knn_top1": knn})
        if dist.is_main():
            print(f"epoch {epoch} puzzle top-1 {acc:.2f}% k-NN top-1 {knn:.2f}%", flush=True)
        return acc, knn

    for images in run.batches(feed, evaluate):
        # images: uint8 [n, H, W, 3] on the device; randomness from (seed, rank, step).
        gen = step_generator(args.seed, rank, run.step)
        tiles, y = make_puzzles(images, perms, args, gen)  # [n, 9, 3, T, T], [n]
        if device.type == "cuda":  # channels_last per tile: [n * 9, 3, T, T] strides, same shape
            tiles = tiles.flatten(0, 1).contiguous(memory_format=torch.channels_last)
            tiles = tiles.unflatten(0, (-1, 9))
        lr = run.set_lr(opt)
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            logits = ddp(tiles)  # [n, P]
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
    acc, knn = evaluate(args.epochs)
    return run.finish(pretext_top1=acc, knn_top1=knn)


if __name__ == "__main__":
    run_cli(main, apply_preset(get_args_parser().parse_args(), PRESETS))
