"""RotNet: unsupervised representation learning by predicting image rotations.

Paper: Gidaris, Singh, Komodakis. "Unsupervised Representation Learning by Predicting Image
Rotations", ICLR 2018 (arXiv:1803.07728); CIFAR-10 recipe from the paper's section 3.1 and the
official code (gidariss/FeatureLearningRotNet, config CIFAR10_RotNet_NIN4blocks).

Method: every image of a batch is shown in all four rotations, 0, 90, 180 and 270 degrees, in
the same batch (the paper and its code do this: it beats one random rotation per image, which
is VISSL's default, because the network must tell all four apart on the same content and batch
norm sees balanced classes). A ConvNet classifies the rotation: a 4-way softmax cross-entropy.
To recognise "sky is up" or "a face is upright" the network has to localise and recognise
objects, so its features transfer to classification. The rotation classifier is thrown away;
the features are evaluated with the linear probe and k-NN (linear_probe.py).

Choices made here:
- Backbone: a ResNet from common/backbones.py (not the paper's Network-In-Network), so that
  every method in this repo is compared on the same encoder. Head: one linear layer on the
  pooled features (the paper's NIN ends in global pooling + a linear 4-way classifier).
- Mid-network features: RotNet's last blocks specialise in rotations; the paper (NIN, CIFAR-10)
  finds its best features in block 2 (89.06% vs 72.50% from a random init, as quoted by the
  issue this script answers). Probe a stage with `linear_probe.py RUN --layer 2` (1-4).
- CIFAR's 32x32 images are used as they are (rotations need no upsampling): the paper's code
  augments them with a random 32x32 crop of the image zero-padded by 4 pixels, and a horizontal
  flip; both happen here per image, on the device. Bigger images (Imagenette) get the same
  crop with padding of 1/8 of the side. Rotations are exact (torch.rot90 of square crops).
- Optimiser: SGD with Nesterov momentum 0.9, weight decay 5e-4, lr 0.1 for 128 images (x 4
  rotations = 512 network inputs), linear in the batch. The official code's step decay (x0.2
  at epochs 30, 60, 80 of 100) is replaced by the shared cosine schedule of common/schedule.py.

Run:
  python rotnet.py                                  # CIFAR-10 in ./data, GPU recipe if CUDA
  torchrun --nproc_per_node=8 rotnet.py --data ./data
  python rotnet.py --preset cpu --data ../shared/data/cifar10-jpeg.tar.gz
  python linear_probe.py runs/rotnet --data ./data --layer 2   # evaluate stage 2 (or 3, 4)
Expect: rotation accuracy on the test set ("pretext_top1") in the high 80s/90s% with the `gpu`
preset (chance: 25%). The `cpu` preset (2 cores, ~15 min, 390 steps) gives 59% rotations and a
probe (10k train images) of 35.3 k-NN / 38.9 linear against 29.0 / 34.3 from random init; the
README has the commands.
"""

from __future__ import annotations

import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

try:  # a script copied on its own: say what else to copy, not a traceback
    import common  # noqa: F401
except ModuleNotFoundError:
    print(
        "error: rotnet.py needs the common/ folder next to it: copy common/ with it",
        file=sys.stderr,
    )
    raise SystemExit(2) from None

from common import dist
from common.augment import normalize, resized_crop, to_float
from common.backbones import build_backbone, stem_for
from common.cli import ConfigError, apply_preset, base_parser, run_cli
from common.data import load_split
from common.eval import knn_top1, labelled
from common.feed import BatchFeed, step_generator
from common.train import TrainRun, place_model, setup_run

# ----------------------------------------------------------------------------------- config
# Presets fill every flag the user did not give (explicit flags win). `gpu` is the paper's
# CIFAR-10 recipe on a ResNet-18 (batch 128 images, SGD Nesterov lr 0.1, wd 5e-4, 100 epochs;
# cosine instead of step decay). `tiny` proves the pipeline in seconds (tests); `cpu` is ~10
# minutes on 2 cores with simclr's cpu backbone (ResNet-18, width 16).
# fmt: off
#                  tiny      cpu       gpu
_TABLE = {
    "epochs":        (2,        5,        100),    # passes over the (limited) training set
    "batch_size":    (32,       128,      128),    # global batch of images (x4 rotations)
    "lr":            (0.2,      0.1,      0.1),    # SGD lr for 128 images; peak = lr * N / 128
    "weight_decay":  (5e-4,     5e-4,     5e-4),   # on all parameters, as the official code
    "warmup_epochs": (0,        0,        0),      # linear warm-up, then cosine decay to 0
    "backbone":      ("resnet18", "resnet18", "resnet18"),
    "width":         (8,        16,       64),     # ResNet width (64 = the real ResNet-18)
    "limit_train":   (1024,     10000,    None),   # random subset of train images (None: all)
    "log_every":     (8,        20,       50),     # steps between log lines
    "eval_every":    (0,        0,        20),     # epochs between evaluations (0: at the end)
    "knn_bank":      (2000,     None,     None),   # train images in the k-NN bank (None: all)
}
# fmt: on
PRESETS = {
    name: {k: v[i] for k, v in _TABLE.items()} for i, name in enumerate(("tiny", "cpu", "gpu"))
}


def get_args_parser():
    p = base_parser("rotnet", __doc__)
    p.add_argument("--momentum", type=float, default=0.9, help="SGD (Nesterov) momentum")
    p.add_argument(
        "--pad", type=int, help="zero padding before the random crop (default: side / 8, 4 px)"
    )
    return p


# ------------------------------------------------------------------------------ pretext task
def rotate_batch(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """All four rotations of every image: [n, C, S, S] -> ([4n, C, S, S], labels [4n]).

    Block k (rows k*n .. k*n + n - 1) holds every image turned by k * 90 degrees
    counter-clockwise (torch.rot90 over H, W: an exact permutation of the pixels), label k.
    """
    if x.shape[-1] != x.shape[-2]:
        raise ValueError(f"rotations need square images, got {tuple(x.shape[-2:])}")
    rots = torch.cat([torch.rot90(x, k, dims=(-2, -1)) for k in range(4)])
    labels = torch.arange(4, device=x.device).repeat_interleave(len(x))
    return rots, labels


def crop_flip(
    x: torch.Tensor, size: int, pad: int, gen: torch.Generator
) -> tuple[torch.Tensor, dict]:
    """The paper's CIFAR augmentation, per image: zero-pad by `pad`, random size x size crop,
    horizontal flip with p 0.5. x: [B, 3, H, W] float -> [B, 3, size, size]."""
    B, _, H, W = x.shape
    xp = F.pad(x, (pad, pad, pad, pad))  # zeros = black, as RandomCrop(padding) before ToTensor
    dev = x.device  # drawn there from gen (a generator of that device): no copy, no sync
    top = torch.randint(0, H + 2 * pad - size + 1, (B,), generator=gen, device=dev)
    left = torch.randint(0, W + 2 * pad - size + 1, (B,), generator=gen, device=dev)
    flip = torch.rand(B, generator=gen, device=dev) < 0.5
    boxes = torch.stack([top, left, torch.full_like(top, size), torch.full_like(top, size)], 1)
    # A box exactly `size` wide resized to `size` samples each pixel centre: an exact crop.
    out = resized_crop(xp, boxes, size)
    out = torch.where(flip.view(-1, 1, 1, 1), out.flip(-1), out)
    return out, {"boxes": boxes, "flip": flip}


def center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
    return x[..., top : top + size, left : left + size]


# ------------------------------------------------------------------------------------ model
class RotNet(nn.Module):
    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.feat_dim, 4)  # the 4-way rotation classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))  # [4n, 3, S, S] -> logits [4n, 4]


@torch.no_grad()
def rotation_accuracy(model: RotNet, test, train, args, device, chunk: int = 500) -> float:
    """Rotation top-1 (%) on the test images: no augmentation, all 4 rotations of each.

    Chunks go round-robin to the ranks and the counts are summed, so the number does not
    depend on the world size."""
    was_training = model.training
    model.eval()
    images = test.images
    ws, rank = dist.get_world_size(), dist.get_rank()
    counts = torch.zeros(2, device=device, dtype=torch.float64)  # [correct, total]
    for i in range(rank * chunk, len(images), ws * chunk):
        x = normalize(images[i : i + chunk].to(device), train.mean, train.std)  # [m, 3, H, W]
        x, y = rotate_batch(center_crop(x, args.crop_size))  # [4m, 3, S, S], labels [4m]
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            pred = model(x).argmax(1)
        counts += torch.stack([(pred == y).sum().double(), torch.tensor(len(y), device=device)])
    model.train(was_training)
    counts = dist.all_reduce_mean(counts)  # mean over ranks: the ratio of sums is unchanged
    return 100.0 * (counts[0] / counts[1]).item()


# ------------------------------------------------------------------------------------ train
def step_loss(model, images, gen, mean, std, crop_size: int, pad: int):
    """One step's forward, with no host sync: images uint8 [n, H, W, 3] on the device ->
    (loss, logits [4n, 4], labels [4n])."""
    x, _ = crop_flip(to_float(images), crop_size, pad, gen)
    x, y = rotate_batch((x - mean) / std)  # [4n, 3, S, S], labels [4n]
    if x.is_cuda:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast(x.device.type, torch.bfloat16, enabled=x.is_cuda):
        logits = model(x)  # [4n, 4]
    return F.cross_entropy(logits.float(), y), logits, y


def main(args):
    device, out = setup_run(args)
    rank = dist.get_rank()

    train = load_split(args.data, "train", include_unlabeled=True).subset(
        args.limit_train, args.seed
    )
    test = load_split(args.data, "test").subset(args.limit_test, args.seed)
    # The checkpoint's config (vars(args)) must say how to rebuild the backbone: set these now.
    args.image_size = train.image_size
    args.crop_size = args.crop_size or train.image_size
    args.stem = stem_for(args.crop_size)
    args.pad = args.image_size // 8 if args.pad is None else args.pad
    if args.pad < 0:
        raise ConfigError(f"--pad must be >= 0, got {args.pad}")
    if not 0 < args.crop_size <= args.image_size + 2 * args.pad:
        raise ConfigError(f"--crop-size {args.crop_size} does not fit the padded images")
    mean = torch.tensor(train.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(train.std, device=device).view(1, 3, 1, 1)

    model = RotNet(build_backbone(args.backbone, args.stem, args.width))
    model = place_model(model, device)
    peak_lr = args.lr * args.batch_size / 128
    opt = torch.optim.SGD(
        model.parameters(),
        lr=peak_lr,
        momentum=args.momentum,
        nesterov=args.momentum > 0,
        weight_decay=args.weight_decay,
    )

    feed = BatchFeed(train.images, args.batch_size, device, args.seed)
    run = TrainRun(
        args,
        out,
        "rotnet",
        backbone=model.backbone,
        head=model.head,
        optimizer=opt,
        steps_per_epoch=feed.steps_per_epoch,
        peak_lr=peak_lr,
    )
    ddp = dist.wrap_ddp(model, device)

    def evaluate(epoch):
        rot = rotation_accuracy(model, test, train, args, device)
        knn = knn_top1(
            model.backbone, labelled(train).subset(args.knn_bank, args.seed), test, device
        )
        run.log.write({"step": run.step, "epoch": epoch, "pretext_top1": rot, "knn_top1": knn})
        if dist.is_main():
            print(f"epoch {epoch} rotation top-1 {rot:.2f}% k-NN top-1 {knn:.2f}%", flush=True)
        return rot, knn

    for images in run.batches(feed, evaluate):
        # images: uint8 [n, H, W, 3] on the device; randomness from (seed, rank, step), drawn
        # on the device.
        gen = step_generator(args.seed, rank, run.step, device)
        lr = run.set_lr(opt)
        loss, logits, y = step_loss(ddp, images, gen, mean, std, args.crop_size, args.pad)
        top1 = 100.0 * (logits.argmax(1) == y).float().mean()  # read in the step's one sync
        if run.nonfinite(loss, train_top1=top1):  # stops, or skips with --skip-nonfinite
            continue
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        run.step_done(loss, lr=lr)
    if run.stopped:
        return run.finish()
    rot, knn = evaluate(args.epochs)
    return run.finish(pretext_top1=rot, knn_top1=knn)


if __name__ == "__main__":
    run_cli(main, apply_preset(get_args_parser().parse_args(), PRESETS))
