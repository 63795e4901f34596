"""Context encoders: learning features by inpainting.

Paper: Pathak, Krahenbuhl, Donahue, Darrell, Efros. "Context Encoders: Feature Learning by
Inpainting", CVPR 2016 (arXiv:1604.07379).

Method: a region of every image (the "hole") is replaced by the dataset mean; an encoder sees
the rest (the context), a channel-wise fully connected bottleneck spreads information across
the whole feature map, and an up-convolutional decoder paints the image back. The loss is L2
on the hole, with a weight of 10 on a thin overlap band around it (visible pixels the decoder
also predicts, so that the completion fits its border). To fill a hole plausibly the encoder
must understand what the context shows; the decoder is thrown away and the encoder is
evaluated with the linear probe and k-NN (linear_probe.py).

Choices made here:
- Encoder: the shared ResNet of common/backbones.py (linear_probe.py rebuilds it from the
  checkpoint's config), up to its last stage's map (4x4 for CIFAR with the stride-1 stem).
  Bottleneck: the paper's channel-wise FC (every channel its own [hw x hw] fully connected
  layer over the spatial positions, no mixing across channels), then a 1x1 conv across
  channels. Decoder: 4x4 stride-2 up-convolutions (BN, ReLU), channels halved each time, up to
  the full image, then a 3x3 conv to RGB in normalised units (the prediction covers the whole
  image; the loss reads only the hole and band).
- Masks (--mask): "region" (the default), the paper's masks for its feature-learning results
  (56.5% VOC classification): random shapes, here uniform noise on a grid of 1/8 of the side,
  upsampled bilinearly and thresholded at its per-image quantile, so that exactly --hole-frac
  of the pixels (rounded) are holes (the paper takes shapes from PASCAL masks); "blocks",
  random squares of 1/8 to 1/4 of the side added until they cover --hole-frac; "center", a
  central square of --hole-frac of the area (1/4: 16x16 at 32 px, as 64x64 at 128 px), the
  paper's setting for its completion figures: its features latch onto the hole's fixed
  boundary (the paper's own finding), so it is an option here and the PNG's mask.
  Hole pixels become 0 (the mean, after normalisation) before the encoder: nothing of them
  reaches it.
- Overlap band: the pixels within --band px outside the hole (the paper's 7 px at 128 px scaled
  to the image: 2 px at 32 px), weight --band-weight (10), hole weight 1, all else 0; the loss
  is the weighted squared error summed over channels' mean, divided by the pixels of hole+band.
- Adversarial loss (--adv-weight, paper 0.001; 0 by default): as the paper, the discriminator
  sees the filled region only, real pixels vs. the prediction: the hole's pixels in place,
  zeros elsewhere, cropped to the bounding box of the batch's holes (for "center" exactly the
  central square, the paper's input). It has its own Adam (same settings and schedule), and
  each step updates it first, on the detached prediction; the encoder-decoder's adversarial
  term then reads the updated discriminator through detached weights (the DCGAN order).
- Augmentation: random crops (area 60-100%, resized back) and horizontal flips, from
  common.augment's batched helpers, no colour changes. Optimiser: Adam (beta1 0.5, as the
  paper), peak lr = lr * batch / 64 (the paper's 2e-4 at batch 64); the shared cosine schedule.
- Pretext metrics on --pretext-test test images: "pretext_l2" (squared error in the hole,
  normalised units) and "fill_l2" (leaving the mean in it) on the training --mask kind (fixed
  seed), and "pretext_l2_center" on central holes, comparable across mask kinds.
- OUT/inpainting_samples.png: test images evenly spaced through the test set with central
  holes; rows: input with the hole, completion (context + prediction in the hole), truth.

Run:
  python inpainting.py                                  # CIFAR-10 in ./data, GPU recipe if CUDA
  torchrun --nproc_per_node=8 inpainting.py --data ./data
  python inpainting.py --preset cpu --data ../shared/data/cifar10-jpeg.tar.gz
  python inpainting.py --mask center --adv-weight 0.001  # the paper's completion setting
  python linear_probe.py runs/inpainting --data ./data  # evaluate
Expect: the paper (AlexNet, ImageNet, random regions) reports 56.5% PASCAL VOC classification
mAP after fine-tuning vs 53.3% from a random init (ImageNet labels: 78.2%). Here "pretext_l2"
must fall below "fill_l2" (the mean fill's error). Measured with `--mask center` (before
"region" became the default): `--preset cpu` (4680 steps, 12 min on 2 cores) pretext_l2 0.42
vs fill 1.03, k-NN 36.1 (25k bank), and a probe (10k train images, 10 epochs) of 33.4 k-NN /
37.2 linear against 29.0 / 32.1 from random init.
"""

from __future__ import annotations

import math
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.utils import save_image

try:  # a script copied on its own: say what else to copy, not a traceback
    import common  # noqa: F401
except ModuleNotFoundError:
    print(
        "error: inpainting.py needs the common/ folder next to it: copy common/ with it",
        file=sys.stderr,
    )
    raise SystemExit(2) from None

from common import dist
from common.augment import AugConfig, apply_params, normalize, sample_params, to_float
from common.backbones import build_backbone, stem_for
from common.cli import ConfigError, apply_preset, base_parser, check_range, run_cli
from common.data import load_split
from common.eval import knn_top1, labelled
from common.feed import BatchFeed, step_generator
from common.train import TrainRun, place_model, setup_run

# ----------------------------------------------------------------------------------- config
# Presets fill every flag the user did not give (explicit flags win). `gpu` is the paper's
# recipe (Adam lr 2e-4 at batch 64, beta1 0.5, random-region holes) on a ResNet-18 on CIFAR-10;
# `tiny` proves the pipeline in seconds (tests); `cpu` is ~10-15 minutes on 2 cores with the
# other scripts' cpu backbone (ResNet-18, width 16).
# fmt: off
#                  tiny      cpu       gpu
_TABLE = {
    "epochs":        (2,        12,       100),    # passes over the (limited) training set
    "batch_size":    (32,       64,       64),     # global batch of images
    "lr":            (2e-3,     1e-3,     2e-4),   # Adam lr per 64 images; peak = lr * N / 64
    "weight_decay":  (0.0,      0.0,      0.0),    # the paper uses none
    "warmup_epochs": (0,        0.1,      1),      # linear warm-up, then cosine decay to 0
    "backbone":      ("resnet18", "resnet18", "resnet18"),
    "width":         (8,        16,       64),     # ResNet width (64 = the real ResNet-18)
    "limit_train":   (1024,     25000,    None),   # random subset of train images (None: all)
    "log_every":     (8,        20,       50),     # steps between log lines
    "eval_every":    (0,        0,        20),     # epochs between evaluations (0: at the end)
    "knn_bank":      (2000,     None,     None),   # train images in the k-NN bank (None: all)
    "adv_weight":    (0.0,      0.0,      0.0),    # adversarial weight (paper: 0.001)
}
# fmt: on
PRESETS = {
    name: {k: v[i] for k, v in _TABLE.items()} for i, name in enumerate(("tiny", "cpu", "gpu"))
}


def get_args_parser():
    p = base_parser("inpainting", __doc__)
    p.add_argument(
        "--mask",
        choices=["region", "blocks", "center"],
        default="region",
        help="hole shape in training: the paper's random regions (its features), random "
        "blocks, or its central square (its completions; the PNG always uses it)",
    )
    p.add_argument("--hole-frac", type=float, default=0.25, help="fraction of the image masked")
    p.add_argument("--band", type=int, help="overlap band in px (default: 7 px per 128 px)")
    p.add_argument("--band-weight", type=float, default=10.0, help="loss weight of the band")
    p.add_argument("--adv-weight", type=float, help="adversarial loss weight (0: none)")
    p.add_argument("--pretext-test", type=int, default=1000, help="test images for pretext_l2")
    p.add_argument("--samples", type=int, default=8, help="test images in the PNG grid")
    return p


# ------------------------------------------------------------------------------------ masks
def make_masks(kind: str, n: int, size: int, frac: float, gen: torch.Generator) -> torch.Tensor:
    """Boolean hole masks [n, 1, size, size] (True: hole), on the CPU; see the module doc."""
    if kind == "center":
        side = max(1, round(size * math.sqrt(frac)))
        top = (size - side) // 2
        m = torch.zeros(n, 1, size, size, dtype=torch.bool)
        m[..., top : top + side, top : top + side] = True
        return m
    if kind == "blocks":
        m = torch.zeros(n, 1, size, size, dtype=torch.bool)
        lo, hi = max(1, size // 8), max(1, size // 4)
        ys = torch.arange(size).view(1, size, 1)
        for _ in range(10 * int(1 / max(frac, 1e-3) * 16)):  # bounded; stops when all covered
            todo = m.float().mean((1, 2, 3)) < frac  # images still short of the target
            if not todo.any():
                break
            side = torch.randint(lo, hi + 1, (n,), generator=gen).view(-1, 1, 1)
            top = (torch.rand(n, generator=gen).view(-1, 1, 1) * (size - side + 1)).long()
            left = (torch.rand(n, generator=gen).view(-1, 1, 1) * (size - side + 1)).long()
            xs = ys.transpose(1, 2)
            block = (ys >= top) & (ys < top + side) & (xs >= left) & (xs < left + side)
            m |= (block & todo.view(-1, 1, 1)).unsqueeze(1)
        return m
    if kind == "region":
        low = max(2, size // 8)
        noise = torch.rand(n, 1, low, low, generator=gen)
        noise = F.interpolate(noise, size=(size, size), mode="bilinear", align_corners=False)
        k = max(1, round(frac * size * size))
        # The k highest pixels (ties, frequent where bilinear upsampling clamps at the
        # border, broken by topk's order): exactly k holes per image.
        top = noise.flatten(1).topk(k, dim=1).indices
        m = torch.zeros(n, size * size, dtype=torch.bool).scatter_(1, top, True)
        return m.view(n, 1, size, size)
    raise ValueError(f"unknown mask kind {kind!r}")


def band_of(hole: torch.Tensor, band: int) -> torch.Tensor:
    """Pixels within `band` px (Chebyshev distance) outside the hole: [n, 1, S, S] bool."""
    if band <= 0:
        return torch.zeros_like(hole)
    grown = F.max_pool2d(hole.float(), 2 * band + 1, stride=1, padding=band) > 0
    return grown & ~hole


def fill_holes(x: torch.Tensor, hole: torch.Tensor) -> torch.Tensor:
    """Hole pixels -> 0, the dataset mean of normalised images (torch.where: their gradient
    is exactly zero, nothing of them reaches the encoder)."""
    return torch.where(hole, torch.zeros((), dtype=x.dtype, device=x.device), x)


def hole_box(hole: torch.Tensor, min_side: int = 8) -> tuple[slice, slice]:
    """Rows and columns of the bounding box of a batch's holes [n, 1, S, S] (CPU masks: no
    device sync), grown about its centre to >= min_side px so that the discriminator's three
    stride-2 convolutions have a map to read."""
    u = hole.any(0)[0]  # [S, S]
    out = []
    for line in (u.any(1), u.any(0)):  # rows, then columns, holding any hole pixel
        n = len(line)
        idx = line.nonzero().flatten()
        lo, hi = (int(idx[0]), int(idx[-1]) + 1) if len(idx) else (0, n)
        side = min(n, max(hi - lo, min_side))
        lo = min(max(0, (lo + hi - side) // 2), n - side)  # centred, inside the image
        out.append(slice(lo, lo + side))
    return out[0], out[1]


def filled_region(img: torch.Tensor, hole: torch.Tensor, box: tuple[slice, slice]) -> torch.Tensor:
    """What the discriminator sees: img's hole pixels in place, zeros elsewhere, cropped to
    `box` (from hole_box): [n, 3, h, w]. With central holes, the central square itself."""
    return torch.where(hole, img, torch.zeros((), dtype=img.dtype, device=img.device))[
        ..., box[0], box[1]
    ]


def inpaint_loss(pred, target, hole, band: torch.Tensor, band_weight: float) -> torch.Tensor:
    """Weighted L2: weight 1 in the hole, band_weight in the band, 0 elsewhere; the squared
    error averaged over channels, summed over pixels and divided by hole+band's pixel count."""
    w = hole.float() + band_weight * band.float()  # [n, 1, S, S]; hole and band are disjoint
    err = (pred - target).pow(2).mean(1, keepdim=True)
    return (w * err).sum() / (hole | band).sum().clamp_min(1)


# ------------------------------------------------------------------------------------ model
def trunk_map(bb: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The ResNet's last stage's map [B, feat_dim, h, w] (h = S/8 with the CIFAR stem)."""
    x = bb.maxpool(bb.relu(bb.bn1(bb.conv1(x))))
    return bb.layer4(bb.layer3(bb.layer2(bb.layer1(x))))


class ChannelwiseFC(nn.Module):
    """Per-channel fully connected layer over the h*w positions: [B, C, h, w] -> same shape;
    C * (hw)^2 weights instead of a full FC's (C hw)^2 (the paper's bottleneck)."""

    def __init__(self, channels: int, positions: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(channels, positions, positions) / positions**0.5)
        self.bias = nn.Parameter(torch.zeros(channels, positions))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, h, w = x.shape
        y = torch.einsum("bcp,cpq->bcq", x.flatten(2), self.weight.to(x.dtype)) + self.bias
        return y.view(B, C, h, w)


class InpaintHead(nn.Module):
    """Channel-wise FC + 1x1 conv bottleneck, then up-convolutions to the image size."""

    def __init__(self, feat_dim: int, map_size: int, image_size: int):
        super().__init__()
        self.image_size = image_size
        self.chfc = ChannelwiseFC(feat_dim, map_size * map_size)
        self.mix = nn.Sequential(
            nn.Conv2d(feat_dim, feat_dim, 1, bias=False), nn.BatchNorm2d(feat_dim), nn.ReLU(True)
        )
        ups, c, s = [], feat_dim, map_size
        while s < image_size:  # 4x4 stride-2 up-convolutions double the side each time
            c_out = max(16, c // 2)
            ups += [nn.ConvTranspose2d(c, c_out, 4, 2, 1, bias=False), nn.BatchNorm2d(c_out)]
            ups.append(nn.ReLU(True))
            c, s = c_out, 2 * s
        self.up = nn.Sequential(*ups)
        self.out = nn.Conv2d(c, 3, 3, padding=1)

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        y = self.out(self.up(self.mix(self.chfc(fmap))))
        if y.shape[-1] != self.image_size:  # sides that are not map_size * 2^k
            y = F.interpolate(y, size=self.image_size, mode="bilinear", align_corners=False)
        return y


class ContextEncoder(nn.Module):
    def __init__(self, backbone: nn.Module, map_size: int, image_size: int):
        super().__init__()
        self.backbone = backbone
        self.head = InpaintHead(backbone.feat_dim, map_size, image_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(trunk_map(self.backbone, x))  # holes filled -> image [B, 3, S, S]


def discriminator(width: int) -> nn.Module:
    """A small conv discriminator (stride-2 convs, LeakyReLU, no batch norm) -> a logit."""
    c = max(16, 2 * width)
    return nn.Sequential(
        nn.Conv2d(3, c, 4, 2, 1), nn.LeakyReLU(0.2, True),
        nn.Conv2d(c, 2 * c, 4, 2, 1), nn.LeakyReLU(0.2, True),
        nn.Conv2d(2 * c, 4 * c, 4, 2, 1), nn.LeakyReLU(0.2, True),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * c, 1),
    )  # fmt: skip


# ------------------------------------------------------------------------------------- eval
@torch.no_grad()
def pretext_l2(model, test, train, args, device) -> dict:
    """Squared error in the holes (normalised units) on the first --pretext-test test images
    (rank 0's view; all ranks hold the same weights), and the mean fill's: with the training
    --mask kind (a fixed seed: the same holes every evaluation) and with central holes."""
    was_training = model.training
    model.eval()
    res = {}
    for kind, key in ((args.mask, "pretext_l2"), ("center", "pretext_l2_center")):
        gen = torch.Generator().manual_seed(0)
        sums = torch.zeros(2, dtype=torch.float64)
        n_pix = 0.0
        for chunk in test.images[: args.pretext_test].split(500):
            x = normalize(chunk.to(device), train.mean, train.std)
            hole = make_masks(kind, len(x), x.shape[-1], args.hole_frac, gen).to(device)
            pred = model(fill_holes(x, hole)).float()
            h = hole.float()
            sums += torch.stack([(h * (pred - x) ** 2).sum(), (h * x**2).sum()]).double().cpu()
            n_pix += h.sum().item() * 3
        res[key] = (sums[0] / n_pix).item()
        if kind == args.mask:
            res["fill_l2"] = (sums[1] / n_pix).item()
    model.train(was_training)
    return res


@torch.no_grad()
def save_samples(model, test, train, args, device, path) -> None:
    """PNG grid: input with a central hole, completion, truth (rows) for --samples images."""
    was_training = model.training
    model.eval()
    idx = torch.linspace(0, len(test) - 1, args.samples).long()
    x = normalize(test.images[idx].to(device), train.mean, train.std)
    hole = make_masks("center", len(x), x.shape[-1], args.hole_frac, None).to(device)
    inp = fill_holes(x, hole)
    done = torch.where(hole, model(inp).float(), x)
    mean = torch.tensor(train.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(train.std, device=device).view(1, 3, 1, 1)
    rows = torch.cat([inp, done, x]) * std + mean
    save_image(rows.clamp(0, 1).cpu(), path, nrow=len(x), padding=1)
    model.train(was_training)


class Optimizers:
    """Several optimisers saved and resumed as one (TrainRun checkpoints `optimizer`); set_lr
    sets every group's lr (one schedule)."""

    def __init__(self, **opts: torch.optim.Optimizer):
        self.opts = opts

    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self.opts.values() for g in o.param_groups]

    def state_dict(self) -> dict:
        return {k: o.state_dict() for k, o in self.opts.items()}

    def load_state_dict(self, state: dict) -> None:
        for k, o in self.opts.items():
            o.load_state_dict(state[k])


# ------------------------------------------------------------------------------------ train
def check_inpainting_args(args) -> None:
    """Inpainting's own float flags, range-checked (NaN refused) before any work or folder."""
    check_range(args, "hole_frac", 0, 1, lo_open=True, hi_open=True)
    check_range(args, "band_weight", 0)
    check_range(args, "adv_weight", 0)


def main(args):
    check_inpainting_args(args)
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
    args.band = round(7 * args.crop_size / 128) if args.band is None else args.band
    if args.band < 0:
        raise ConfigError(f"--band must be >= 0, got {args.band}")
    aug = AugConfig(args.crop_size, scale=(0.6, 1.0), jitter_p=0.0, gray_p=0.0, blur_p=0.0)
    mean = torch.tensor(train.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(train.std, device=device).view(1, 3, 1, 1)

    backbone = build_backbone(args.backbone, args.stem, args.width)
    with torch.no_grad():  # the trunk's map side for this crop size (4 for 32 px, CIFAR stem)
        map_size = trunk_map(backbone.eval(), torch.zeros(1, 3, args.crop_size, args.crop_size))
    model = place_model(
        ContextEncoder(backbone.train(), map_size.shape[-1], args.crop_size), device
    )
    disc = place_model(discriminator(args.width), device) if args.adv_weight > 0 else None
    peak_lr = args.lr * args.batch_size / 64
    adam = dict(lr=peak_lr, betas=(0.5, 0.999), weight_decay=args.weight_decay)
    opt = torch.optim.Adam(model.parameters(), **adam)
    opt_d = torch.optim.Adam(disc.parameters(), **adam) if disc else None

    feed = BatchFeed(train.images, args.batch_size, device, args.seed)
    run = TrainRun(
        args,
        out,
        "inpainting",
        backbone=model.backbone,
        head=nn.ModuleDict({"decoder": model.head, "disc": disc}) if disc else model.head,
        optimizer=Optimizers(model=opt, disc=opt_d) if disc else opt,
        steps_per_epoch=feed.steps_per_epoch,
        peak_lr=peak_lr,
    )
    ddp = dist.wrap_ddp(model, device)

    def evaluate(epoch):
        res = pretext_l2(model, test, train, args, device)
        bank = labelled(train).subset(args.knn_bank, args.seed)
        res["knn_top1"] = knn_top1(model.backbone, bank, test, device)
        run.log.write({"step": run.step, "epoch": epoch, **res})
        if dist.is_main():
            save_samples(model, test, train, args, device, out / "inpainting_samples.png")
            print(f"epoch {epoch} " + " ".join(f"{k} {v:.4f}" for k, v in res.items()), flush=True)
        return res

    for images in run.batches(feed, evaluate):
        # images: uint8 [n, H, W, 3] on the device; randomness from (seed, rank, step).
        gen = step_generator(args.seed, rank, run.step)
        x = to_float(images)
        x = apply_params(x, sample_params(aug, len(x), x.shape[2], x.shape[3], gen), aug)
        x = (x - mean) / std  # [n, 3, S, S]
        hole_cpu = make_masks(args.mask, len(x), args.crop_size, args.hole_frac, gen)
        hole = hole_cpu.to(device)
        band = band_of(hole, args.band)
        inp = fill_holes(x, hole)
        if device.type == "cuda":
            inp = inp.contiguous(memory_format=torch.channels_last)
        lr = run.set_lr(opt)
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            pred = ddp(inp)  # [n, 3, S, S]
        pred = pred.float()
        rec = inpaint_loss(pred, x, hole, band, args.band_weight)
        metrics = {"lr": lr, "rec_loss": rec.detach()}
        loss = check = rec
        if disc is not None:
            box = hole_box(hole_cpu)
            real, fake = filled_region(x, hole, box), filled_region(pred, hole, box)
            d_loss = F.softplus(-disc(real)).mean() + F.softplus(disc(fake.detach())).mean()
            check = rec + 0 * d_loss  # one finiteness check for both (logs the rec loss)
            metrics["d_loss"] = d_loss.detach()
        if run.nonfinite(check):  # stops the run, or skips this update with --skip-nonfinite
            continue
        if disc is not None:  # the discriminator's own step first, then the context encoder's
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            if dist.get_world_size() > 1:  # disc is outside DDP: average here
                for p in disc.parameters():
                    p.grad.copy_(dist.all_reduce_mean(p.grad))
            opt_d.step()
            frozen = {k: v.detach() for k, v in disc.named_parameters()}  # no grad to disc
            g_adv = F.softplus(-torch.func.functional_call(disc, frozen, (fake,))).mean()
            loss = rec + args.adv_weight * g_adv
            metrics["g_adv"] = g_adv.detach()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (run.step + 1) % args.log_every == 0 or run.step + 1 == run.total:
            metrics = {k: float(v) for k, v in metrics.items()}  # only when logged: syncs
        else:
            metrics = {"lr": lr}
        run.step_done(check, **metrics)
    if run.stopped:
        return run.finish()
    return run.finish(**evaluate(args.epochs))


if __name__ == "__main__":
    run_cli(main, apply_preset(get_args_parser().parse_args(), PRESETS))
