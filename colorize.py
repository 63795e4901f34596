"""Colorization: learning by predicting an image's colours from its lightness.

Paper: Zhang, Isola, Efros. "Colorful Image Colorization", ECCV 2016 (arXiv:1603.08511).

Method: in CIE Lab, the network sees only L and predicts ab for every pixel. Regressing ab
with an L2 loss averages the plausible colours of an object into grey-brown, so the paper
classifies instead: ab is quantised into bins of a grid of 10 (the in-gamut ones: 313 in the
paper), the target of a pixel is its soft-encoding (its 5 nearest bins, Gaussian weights of
sigma 5) and the loss is a per-pixel multinomial cross-entropy. Class rebalancing weights
each pixel by w(q*) of its target's top bin q*: w ~ ((1 - lambda) p~ + lambda / Q)^-1 with
p~ the empirical ab distribution of the training set smoothed by a Gaussian (sigma 5),
lambda = 0.5, normalised so that E_p~[w] = 1 (rare, saturated colours count more). The
prediction is decoded by the "annealed mean": the mean ab of the distribution sharpened with
temperature T = 0.38 (softmax(logits / T)), between the mean (T = 1, desaturated) and the
mode (T -> 0, spatially incoherent). `--loss l2` is the plain regression baseline.

Choices made here:
- In-gamut bins: ab bins of the 10-grid (centres at multiples of 10) that some 8-bit sRGB
  colour falls in, found by converting the RGB cube's surface (6 x 256^2 colours; it projects
  to the same ab region as the whole cube, as every L-line through the gamut crosses its
  boundary; tests/test_colorize.py checks it against all 256^3 colours). That gives 261 bins,
  not the paper's 313, whose bins also cover ab where no 8-bit sRGB colour lies.
- Network: the common ResNet with a 1-channel stem (linear_probe.py rebuilds it from the
  checkpoint: in_chans 1, input "lab_l"), and a light decoder head (this file): the maps after
  stages 2, 3 and 4 (1/2, 1/4, 1/8 of a CIFAR image with the stride-1 CIFAR stem), each
  projected by a 1x1 conv, upsampled to stage 2's resolution and summed (a hypercolumn), then
  3x3 conv-BN-ReLU and a 1x1 conv to Q logits (or 2 for L2). The loss is computed at that
  resolution (16x16 for CIFAR: the paper predicts at 1/4 of its 224 px input) against ab
  averaged to it; decoded ab is upsampled bilinearly to the image and joined with the full L.
- 32x32 images are used as they are: stage 2 still gives a 16x16 map, enough for colours of
  CIFAR's objects (Imagenette's 224 px with the ImageNet stem: 28x28, 1/8). Augmentation is
  the paper's: random crops (area 50-100%, resized back to the image size) and horizontal
  flips, never colour changes. The empirical prior comes from (up to) 5,000 training images,
  <= 1024 pixels each, before augmentation.
- Optimiser: Adam (beta1 0.9, beta2 0.99, weight decay 1e-3 added to the gradient, as the
  paper's Caffe solver; none on biases and BN), the shared warm-up + cosine schedule instead of
  the paper's step decay; peak lr = lr * batch / 256 (2-3e-3 in the presets: the paper's 3e-5
  at batch 40 is for 450k steps).
- Pretext metrics (percent, on a fixed random subset of test images), each next to the best a
  constant guess does on the same pixels:
  "pretext_top1", the pretext accuracy: class-balanced top-1 over 8 hue classes (45-degree
  sectors of the ab plane) of the decoded colour on the pixels that have one (|ab| >= 20),
  i.e. the mean over true classes of the fraction predicted in the class; chance, and any
  constant guess, is 12.5% (as for context.py). Balanced, as the paper's rebalanced metrics,
  because yellow-brown hues (45-135 degrees) hold two thirds of the coloured pixels
  ("pixel_hue_top1" vs the most frequent class, "mode_hue_top1"), and over all pixels the grey
  bin is the most frequent at every lightness (a third of CIFAR's pixels), so "always grey"
  wins the top-1 over the 261 bins ("bin_top1", at the loss's resolution, vs the most
  frequent bin, "mode_bin_top1") until long training.
  "pretext_auc", the paper's AuC: the fraction of (full-resolution) pixels whose decoded ab is
  within t of the truth, averaged over t = 0..150, vs predicting grey ("grey_auc"), and its
  class-rebalanced variant, every true bin weighted alike ("pretext_auc_rebal" vs
  "grey_auc_rebal"). Grey is hard to beat on the first (the paper's full model: 89.5 vs 89.1)
  and easy on the second (an untrained network's saturated guesses already do).
- OUT/colorize_samples.png: test images evenly spaced through the test set; rows: grey input,
  prediction, truth.

Run:
  python colorize.py                                  # CIFAR-10 in ./data, GPU recipe if CUDA
  torchrun --nproc_per_node=8 colorize.py --data ./data
  python colorize.py --preset cpu --data ../shared/data/cifar10-jpeg.tar.gz
  python linear_probe.py runs/colorize --data ./data  # evaluate (on the L channel)
Expect: the paper (ImageNet, VGG-style net) reports AuC 89.5 (grey 89.1; L2 regression 91.2)
and rebalanced AuC 67.3 (grey 58.0; L2 64.4). Here `--preset tiny` (200 steps, about a CPU
minute) gives a balanced hue top-1 of ~24% (chance 12.5%); `--preset cpu` (~17 min on 2 cores)
31.0% hue top-1, AuC 89.8 (grey 90.1), rebalanced AuC 67.5 (grey 61.2): the paper's pattern,
and a probe (10k train images) of 33.4 k-NN / 41.2 linear against 26.8 / 31.6 for a random
1-channel network; the README has the commands.
"""

from __future__ import annotations

import functools
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.utils import save_image

try:  # a script copied on its own: say what else to copy, not a traceback
    import common  # noqa: F401
except ModuleNotFoundError:
    print(
        "error: colorize.py needs the common/ folder next to it: copy common/ with it",
        file=sys.stderr,
    )
    raise SystemExit(2) from None

from common import dist
from common.augment import AugConfig, apply_params, sample_params, to_float
from common.backbones import build_backbone, stem_for
from common.cli import ConfigError, apply_preset, base_parser, run_cli
from common.color import lab_l_input, lab_to_rgb, rgb_to_lab
from common.data import load_split
from common.eval import knn_top1, labelled
from common.feed import BatchFeed, step_generator
from common.train import TrainRun, decay_groups, place_model, setup_run

# ----------------------------------------------------------------------------------- config
# Presets fill every flag the user did not give (explicit flags win). `gpu` adapts the paper
# (Adam, class rebalancing, batch 40 for ~14 ImageNet epochs) to CIFAR-10 on a ResNet-18;
# `tiny` proves the pipeline in seconds (tests); `cpu` is ~10 minutes on 2 cores with simclr's
# cpu backbone (ResNet-18, width 16).
# fmt: off
#                  tiny      cpu       gpu
_TABLE = {
    "epochs":        (2,        6,        100),    # passes over the (limited) training set
    "batch_size":    (32,       64,       256),    # global batch of images
    "lr":            (0.024,    0.012,    0.002),  # Adam lr per 256 images; peak = lr * N / 256
    "weight_decay":  (1e-3,     1e-3,     1e-3),   # L2 on weights (the paper's 1e-3)
    "warmup_epochs": (0.1,      0.1,      2),      # linear warm-up, then cosine decay to 0
    "backbone":      ("resnet18", "resnet18", "resnet18"),
    "width":         (8,        16,       64),     # ResNet width (64 = the real ResNet-18)
    "limit_train":   (3200,     25000,    None),   # random subset of train images (None: all)
    "log_every":     (8,        20,       50),     # steps between log lines
    "eval_every":    (0,        0,        20),     # epochs between evaluations (0: at the end)
    "knn_bank":      (2000,     None,     None),   # train images in the k-NN bank (None: all)
    "pretext_test":  (1000,     None,     None),   # test images for the pretext metrics
}
# fmt: on
PRESETS = {
    name: {k: v[i] for k, v in _TABLE.items()} for i, name in enumerate(("tiny", "cpu", "gpu"))
}
GRID = 10  # ab bin size
AUC_MAX = 150  # AuC thresholds 0..150 in ab units
HUES, CHROMA = 8, 20.0  # the pretext accuracy: 8 hue classes, on pixels with |ab| >= 20


def get_args_parser():
    p = base_parser("colorize", __doc__)
    p.add_argument("--loss", choices=["class", "l2"], default="class", help="bins (paper) or L2")
    p.add_argument("--rebalance-lambda", type=float, default=0.5, help="1: no rebalancing")
    p.add_argument("--temperature", type=float, default=0.38, help="annealed-mean temperature T")
    p.add_argument("--head-dim", type=int, help="decoder channels (default max(64, 4 x width))")
    p.add_argument("--pretext-test", type=int, help="test images for the pretext metrics")
    p.add_argument("--samples", type=int, default=8, help="test images in the PNG grid")
    return p


# ----------------------------------------------------------------------------- ab quantiser
@functools.lru_cache(maxsize=4)
def gamut_bins(grid: int = GRID) -> torch.Tensor:
    """Centres [Q, 2] (a, b) of the ab bins that 8-bit sRGB colours fall in (module doc).

    A colour's bin is its ab rounded to the grid; the colours are the RGB cube's 6 faces at
    256 levels, whose ab cover the whole cube's (each face's third channel is 0 or 1).
    """
    v = torch.arange(256, dtype=torch.float32) / 255
    uw = torch.stack([t.flatten() for t in torch.meshgrid(v, v, indexing="ij")])  # [2, 256^2]
    faces = [  # channel c fixed at 0 or 1, the other two over all 256 x 256 levels
        torch.cat([uw[:c], torch.full_like(uw[:1], val), uw[c:]])
        for c in range(3)
        for val in (0.0, 1.0)
    ]
    rgb = torch.cat(faces, 1).view(1, 3, -1, 1)  # [1, 3, 6 * 256^2, 1]
    ab = rgb_to_lab(rgb)[0, 1:, :, 0]  # [2, M]
    cells = torch.unique(torch.round(ab / grid).long().T, dim=0)  # [Q, 2], sorted
    return cells.float() * grid


class ABBins(nn.Module):
    """The quantiser and the class-rebalancing weights; buffers, so checkpoints carry them."""

    def __init__(self, grid: int = GRID):
        super().__init__()
        centres = gamut_bins(grid).clone()  # the cache must not share storage with buffers
        q = len(centres)
        self.grid = grid
        self.half = int(centres.abs().max().item()) // grid  # the grid spans -half..half cells
        side = 2 * self.half + 1
        cell = (centres / grid).long() + self.half
        lut = torch.full((side * side,), -1, dtype=torch.long)  # grid cell -> bin (or -1)
        lut[cell[:, 0] * side + cell[:, 1]] = torch.arange(q)
        self.register_buffer("centres", centres)  # [Q, 2]
        self.register_buffer("lut", lut)
        self.register_buffer("prior", torch.full((q,), 1 / q))  # empirical p (unsmoothed)
        self.register_buffer("prior_smooth", torch.full((q,), 1 / q))  # p~, Gaussian-smoothed
        self.register_buffer("weights", torch.ones(q))  # rebalancing w(q)

    def __len__(self) -> int:
        return len(self.centres)

    def hard(self, ab: torch.Tensor) -> torch.Tensor:
        """ab [N, 2] -> nearest in-gamut bin [N]: the grid cell's bin, or for the rare colour
        outside every in-gamut cell (interpolated pixels) the nearest centre."""
        side = 2 * self.half + 1
        cell = (torch.round(ab / self.grid).long() + self.half).clamp(0, side - 1)
        idx = self.lut[cell[:, 0] * side + cell[:, 1]]
        bad = idx < 0
        if bad.any():
            idx[bad] = torch.cdist(ab[bad], self.centres).argmin(1)
        return idx

    def soft(self, ab: torch.Tensor, k: int = 5, sigma: float = 5.0) -> torch.Tensor:
        """Soft-encoding [N, Q]: the k nearest bins get exp(-d^2 / 2 sigma^2), normalised."""
        d, idx = torch.cdist(ab, self.centres).topk(k, dim=1, largest=False)  # [N, k]
        w = torch.softmax(-(d**2) / (2 * sigma**2), 1)
        return torch.zeros(len(ab), len(self), device=ab.device).scatter_(1, idx, w)

    def fit_prior(self, images: torch.Tensor, lam: float, sigma: float = 5.0) -> None:
        """Empirical bin distribution of uint8 images [N, H, W, 3], and the rebalancing weights
        w = ((1 - lam) p~ + lam / Q)^-1 / E_p~[...], p~ = p smoothed by a Gaussian of `sigma`
        ab units on the grid (then restricted to the in-gamut bins and renormalised)."""
        counts = torch.zeros(len(self), dtype=torch.float64)
        for chunk in images.split(256):
            ab = rgb_to_lab(to_float(chunk.cpu()))[:, 1:]  # [n, 2, H, W]
            counts += torch.bincount(
                self.hard(ab.permute(0, 2, 3, 1).reshape(-1, 2)), minlength=len(self)
            ).double()
        p = counts / counts.sum()
        side = 2 * self.half + 1
        hist = torch.zeros(side * side, dtype=torch.float64)
        hist[self.lut >= 0] = p[self.lut[self.lut >= 0]]  # bins -> the full grid [side^2]
        r = torch.arange(-2, 3, dtype=torch.float64) * self.grid  # kernel to +-2 cells
        g = torch.exp(-(r**2) / (2 * sigma**2))
        g2 = (g[:, None] * g[None]) / (g.sum() ** 2)  # [5, 5], sums to 1
        smooth = F.conv2d(hist.view(1, 1, side, side), g2[None, None], padding=2).flatten()
        p_s = smooth[self.lut >= 0][torch.argsort(self.lut[self.lut >= 0])]  # back to bins
        p_s = p_s / p_s.sum()
        w = 1 / ((1 - lam) * p_s + lam / len(self))
        w = w / (p_s * w).sum()  # E_p~[w] = 1
        self.prior.copy_(p.float())
        self.prior_smooth.copy_(p_s.float())
        self.weights.copy_(w.float())


# ------------------------------------------------------------------------------------ model
def trunk_maps(bb: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The ResNet's maps after stages 2, 3, 4: [B, C2, H/2, W/2], ... (CIFAR stem)."""
    x = bb.maxpool(bb.relu(bb.bn1(bb.conv1(x))))
    c2 = bb.layer2(bb.layer1(x))
    c3 = bb.layer3(c2)
    return [c2, c3, bb.layer4(c3)]


class ColorHead(nn.Module):
    """Hypercolumn decoder: 1x1 lateral convs on stages 2-4, upsampled to stage 2's size and
    summed, 3x3 conv-BN-ReLU, 1x1 conv to `out` channels (Q logits or 2 for ab)."""

    def __init__(self, feat_dim: int, dim: int, out: int):
        super().__init__()
        chans = (feat_dim // 4, feat_dim // 2, feat_dim)  # stages 2, 3, 4 of a ResNet
        self.lateral = nn.ModuleList(nn.Conv2d(c, dim, 1, bias=False) for c in chans)
        self.fuse = nn.Sequential(
            nn.BatchNorm2d(dim),
            nn.ReLU(inplace=True),
            nn.Conv2d(dim, dim, 3, padding=1, bias=False),
            nn.BatchNorm2d(dim),
            nn.ReLU(inplace=True),
            nn.Conv2d(dim, out, 1),
        )
        self.bins = ABBins()

    def forward(self, maps: list[torch.Tensor]) -> torch.Tensor:
        size = maps[0].shape[-2:]
        x = sum(
            F.interpolate(conv(m), size=size, mode="bilinear", align_corners=False)
            for conv, m in zip(self.lateral, maps)
        )
        return self.fuse(x)  # [B, out, H/2, W/2]


class Colorizer(nn.Module):
    def __init__(self, backbone: nn.Module, dim: int, loss: str):
        super().__init__()
        self.backbone = backbone
        q = len(gamut_bins())
        self.head = ColorHead(backbone.feat_dim, dim, q if loss == "class" else 2)

    def forward(self, lightness: torch.Tensor) -> torch.Tensor:
        # [B, 1, H, W] -> logits [B, Q, h, w] (or ab / 110 [B, 2, h, w]), h = H/2 on CIFAR
        return self.head(trunk_maps(self.backbone, lightness))


def colorize_loss(out, ab, bins: ABBins, kind: str) -> torch.Tensor:
    """out: [B, Q or 2, h, w]; ab: the true ab averaged to [B, 2, h, w]."""
    ab = ab.permute(0, 2, 3, 1).reshape(-1, 2)  # [N, 2], N = B h w pixels
    if kind == "l2":  # the paper's Euclidean loss, 1/2 ||Y - Y^||^2 per pixel (ab / 110)
        pred = out.permute(0, 2, 3, 1).reshape(-1, 2)
        return 0.5 * (pred - ab / 110).pow(2).sum(1).mean()
    z = bins.soft(ab)  # [N, Q] soft-encoded targets
    logp = F.log_softmax(out.permute(0, 2, 3, 1).reshape(-1, len(bins)), 1)
    w = bins.weights[z.argmax(1)]  # [N] rebalancing weight of each pixel's top bin
    return (w * -(z * logp).sum(1)).mean()


def decode(out, bins: ABBins, kind: str, temperature: float, size) -> torch.Tensor:
    """Network output -> ab [B, 2, H, W] at the image size: annealed mean, or the regression."""
    if kind == "l2":
        ab = out * 110
    else:
        f = torch.softmax(out / temperature, 1)  # [B, Q, h, w], softmax(log p / T)
        ab = torch.einsum("bqhw,qc->bchw", f, bins.centres)
    return F.interpolate(ab, size=size, mode="bilinear", align_corners=False)


def hue_class(ab: torch.Tensor) -> torch.Tensor:
    """ab [N, 2] -> one of HUES sectors of the ab plane (45 degrees each, from +a), [N]."""
    turn = torch.atan2(ab[:, 1], ab[:, 0]) / (2 * torch.pi)
    return torch.floor(turn * HUES).long() % HUES


@torch.no_grad()
def pretext_metrics(model, test, args, device, chunk: int = 250) -> dict:
    """The pretext metrics of the module docstring on a fixed random subset of test images,
    with their baselines. Chunks go round-robin to the ranks; counts are summed over ranks."""
    was_training = model.training
    model.eval()
    bins = model.head.bins
    q, t = len(bins), AUC_MAX + 2  # error histograms: ceil(err) in 0..150, and > 150
    images = test.subset(args.pretext_test, args.seed).images
    ws, rank = dist.get_world_size(), dist.get_rank()
    hue = torch.zeros(2, HUES, device=device, dtype=torch.float64)  # per true class: [right, all]
    hits = torch.zeros(2, q, device=device, dtype=torch.float64)  # per true bin: [right, all]
    hist = torch.zeros(2, q * t, device=device, dtype=torch.float64)  # [model, grey]
    for i in range(rank * chunk, len(images), ws * chunk):
        rgb = to_float(images[i : i + chunk].to(device))
        lab = rgb_to_lab(rgb)  # [n, 3, H, W]
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            out = model(lab_l_input(rgb)).float()  # [n, Q or 2, h, w]
        # bins: top-1 at the output's resolution, against the averaged ab the loss uses
        ab_lo = F.adaptive_avg_pool2d(lab[:, 1:], out.shape[-2:]).permute(0, 2, 3, 1)
        truth = bins.hard(ab_lo.reshape(-1, 2))  # [n h w]
        if args.loss == "class":
            pred = out.argmax(1).flatten()
        else:
            pred = bins.hard((out * 110).permute(0, 2, 3, 1).reshape(-1, 2))
        hits[0] += torch.bincount(truth[pred == truth], minlength=q).double()
        hits[1] += torch.bincount(truth, minlength=q).double()
        # full resolution: the decoded colour (annealed mean) against the true ab
        ab = lab[:, 1:].permute(0, 2, 3, 1).reshape(-1, 2)  # [n H W, 2]
        pred_ab = decode(out, bins, args.loss, args.temperature, lab.shape[-2:])
        pred_ab = pred_ab.permute(0, 2, 3, 1).reshape(-1, 2)
        coloured = ab.norm(dim=1) >= CHROMA  # hue classes where there is a colour
        h_true = hue_class(ab[coloured])
        h_pred = torch.where(pred_ab[coloured].norm(dim=1) > 0, hue_class(pred_ab[coloured]), -1)
        hue[0] += torch.bincount(h_true[h_pred == h_true], minlength=HUES).double()
        hue[1] += torch.bincount(h_true, minlength=HUES).double()
        cls = bins.hard(ab) * t  # AuC: histograms of ceil(error) per true bin
        for j, err in enumerate(((pred_ab - ab).norm(dim=1), ab.norm(dim=1))):
            e = torch.ceil(err).clamp(max=AUC_MAX + 1).long()
            hist[j] += torch.bincount(cls + e, minlength=q * t).double()
    model.train(was_training)
    hue, hits, hist = (dist.all_reduce_mean(x) for x in (hue, hits, hist))  # ratios unchanged
    cdf = hist.view(2, q, t).cumsum(2)[..., : AUC_MAX + 1]  # [2, Q, 151]: count(err <= thr)
    n_bin = hist.view(2, q, t).sum(2)  # [2, Q] full-resolution pixels per true bin
    auc = 100 * cdf.sum(1) / n_bin.sum(1, keepdim=True)  # [2, 151] over all pixels
    ok = n_bin[0] > 0
    auc_rebal = 100 * (cdf[:, ok] / n_bin[:, ok, None]).mean(1)  # [2, 151], bins alike
    present = hue[1] > 0
    return {
        "pretext_top1": 100 * (hue[0, present] / hue[1, present]).mean().item(),
        "pixel_hue_top1": 100 * (hue[0].sum() / hue[1].sum().clamp_min(1)).item(),
        "mode_hue_top1": 100 * (hue[1].max() / hue[1].sum().clamp_min(1)).item(),
        "bin_top1": 100 * (hits[0].sum() / hits[1].sum()).item(),
        "mode_bin_top1": 100 * (hits[1].max() / hits[1].sum()).item(),  # best constant bin
        "pretext_auc": auc[0].mean().item(),
        "grey_auc": auc[1].mean().item(),
        "pretext_auc_rebal": auc_rebal[0].mean().item(),
        "grey_auc_rebal": auc_rebal[1].mean().item(),
    }


@torch.no_grad()
def save_samples(model, test, args, device, path) -> None:
    """A PNG grid: row 1 the grey input (L with a = b = 0), row 2 the prediction, row 3 the
    truth, for --samples test images evenly spaced through the test set."""
    was_training = model.training
    model.eval()
    idx = torch.linspace(0, len(test) - 1, args.samples).long()  # spread over the classes
    rgb = to_float(test.images[idx].to(device))
    lab = rgb_to_lab(rgb)
    out = model(lab_l_input(rgb)).float()
    ab = decode(out, model.head.bins, args.loss, args.temperature, lab.shape[-2:])
    grey = lab_to_rgb(torch.cat([lab[:, :1], torch.zeros_like(ab)], 1))
    pred = lab_to_rgb(torch.cat([lab[:, :1], ab], 1))
    save_image(torch.cat([grey, pred, rgb]).cpu(), path, nrow=len(rgb), padding=1)
    model.train(was_training)


# ------------------------------------------------------------------------------------ train
def main(args):
    device, out = setup_run(args)
    rank = dist.get_rank()

    train = load_split(args.data, "train", include_unlabeled=True).subset(
        args.limit_train, args.seed
    )
    test = load_split(args.data, "test")
    # The checkpoint's config (vars(args)) must say how to rebuild the backbone: set these now.
    args.image_size = train.image_size
    args.crop_size = args.crop_size or train.image_size
    args.stem = stem_for(args.crop_size)
    args.in_chans, args.input = 1, "lab_l"  # linear_probe: 1-channel stem fed lab_l_input
    args.head_dim = args.head_dim or max(64, 4 * args.width)
    if not 0 <= args.rebalance_lambda <= 1 or args.temperature <= 0 or args.head_dim <= 0:
        raise ConfigError("need 0 <= --rebalance-lambda <= 1, --temperature > 0, --head-dim > 0")
    if args.pretext_test is not None and args.pretext_test <= 0:
        raise ConfigError("--pretext-test must be > 0")
    aug = AugConfig(args.crop_size, scale=(0.5, 1.0), jitter_p=0.0, gray_p=0.0, blur_p=0.0)

    backbone = build_backbone(args.backbone, args.stem, args.width, in_chans=1)
    model = Colorizer(backbone, args.head_dim, args.loss)
    # The prior: a fixed subset of training images, <= 1024 pixels each (a strided grid).
    sub = train.subset(5000, args.seed).images
    stride = max(1, sub.shape[1] // 32)
    model.head.bins.fit_prior(sub[:, ::stride, ::stride], args.rebalance_lambda)
    args.num_bins = len(model.head.bins)
    model = place_model(model, device)
    peak_lr = args.lr * args.batch_size / 256
    opt = torch.optim.Adam(
        decay_groups(model),  # no weight decay on biases and BN
        lr=peak_lr,
        betas=(0.9, 0.99),
        weight_decay=args.weight_decay,
    )

    feed = BatchFeed(train.images, args.batch_size, device, args.seed)
    run = TrainRun(
        args,
        out,
        "colorize",
        backbone=model.backbone,
        head=model.head,
        optimizer=opt,
        steps_per_epoch=feed.steps_per_epoch,
        peak_lr=peak_lr,
    )
    ddp = dist.wrap_ddp(model, device)

    def evaluate(epoch):
        res = pretext_metrics(model, test, args, device)
        bank = labelled(train).subset(args.knn_bank, args.seed)
        res["knn_top1"] = knn_top1(model.backbone, bank, test, device, prepare=lab_l_input)
        run.log.write({"step": run.step, "epoch": epoch, **res})
        if dist.is_main():
            save_samples(model, test, args, device, out / "colorize_samples.png")
            print(f"epoch {epoch} " + " ".join(f"{k} {v:.2f}" for k, v in res.items()), flush=True)
        return res

    bins = model.head.bins
    for images in run.batches(feed, evaluate):
        # images: uint8 [n, H, W, 3] on the device; randomness from (seed, rank, step).
        gen = step_generator(args.seed, rank, run.step)
        x = to_float(images)
        x = apply_params(x, sample_params(aug, len(x), x.shape[2], x.shape[3], gen), aug)
        lab = rgb_to_lab(x)  # [n, 3, S, S], fp32
        inp = lab_l_input(x)  # [n, 1, S, S], (L - 50) / 50: exactly what linear_probe feeds
        if device.type == "cuda":
            inp = inp.contiguous(memory_format=torch.channels_last)
        lr = run.set_lr(opt)
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            logits = ddp(inp)  # [n, Q, h, w]
        ab = F.adaptive_avg_pool2d(lab[:, 1:], logits.shape[-2:])  # targets at [n, 2, h, w]
        loss = colorize_loss(logits.float(), ab, bins, args.loss)  # fp32: log-softmax over Q
        if run.nonfinite(loss):  # stops the run, or skips this update with --skip-nonfinite
            continue
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        run.step_done(loss, lr=lr)
    if run.stopped:
        return run.finish()
    return run.finish(**evaluate(args.epochs))


if __name__ == "__main__":
    run_cli(main, apply_preset(get_args_parser().parse_args(), PRESETS))
