"""MAE: masked autoencoders with a Vision Transformer.

Paper: He, Chen, Xie, Li, Dollár, Girshick. "Masked Autoencoders Are Scalable Vision Learners",
CVPR 2022 (arXiv:2111.06377); details from the official code (facebookresearch/mae:
models_mae.py, main_pretrain.py, util/pos_embed.py).

Method: an image is cut into patches (4 x 4 on CIFAR: an 8 x 8 grid of 64 tokens) and a high
fraction of them (75%) is dropped per sample by a random permutation (argsort of uniform
noise). The ViT encoder (common/vit.py) embeds and processes only the visible patches plus a
class token; a lighter decoder gets the encoder's tokens plus one shared, learned mask token at
every masked position, adds its own fixed sin-cos position embeddings, and a linear layer
predicts each patch's pixels. The loss is the MSE on the masked patches only, against the
(normalised) image's pixels or, with --norm-pix-loss, each patch's pixels normalised by their
own mean and variance (the paper's final recipe, +0.5 fine-tune in its Table 1d; on in the
`gpu` preset, off in `tiny`/`cpu` so that their losses read as pixel errors). After training
the decoder is thrown away and the encoder is evaluated: k-NN here, linear_probe.py for the
linear probe, on the mean of the patch tokens (`--pool mean`, the default: the official code
fine-tunes on it and finds the class token "performs similarly"; here it gave ~4 points more
k-NN in CPU runs) or on the class token (`--pool cls`, the official linear probe's); the
choice is saved in the checkpoint's config. Fine-tuning is a later step.

Why patches of 4 on 32 x 32 images: 64 tokens per image is the paper's regime (ViT-B/16 sees
196 at 224 px), 75% masking leaves 16 visible tokens, so the encoder is cheap enough for CPUs,
and a 4 x 4 x 3 patch (48 numbers) is still a region that its visible neighbours do not give
away. Patches of 2 (256 tokens of 12 numbers) cost ~4x the encoder and ~16x the attention, and
make reconstruction closer to interpolation between neighbouring visible pixels
(`--patch-size 2` runs it).

Masking (`--mask-type`, the paper's ablation, Table 1f / Fig. 6 on ImageNet, ViT-L, fine-tune /
linear top-1): random 75% 84.9 / 73.5; block-wise (BEiT's) 50% 83.9 / 72.3, 75% 82.8 / 63.9;
grid-wise (keep one of every 2 x 2) 75% 84.0 / 66.0.

Run:
  python mae.py                                     # CIFAR-10 in ./data, GPU recipe if CUDA
  torchrun --nproc_per_node=8 mae.py --data ./data
  python mae.py --preset cpu --data ../shared/data/cifar10-jpeg.tar.gz
  python linear_probe.py runs/mae --data ./data     # evaluate the encoder
Writes OUT/mae_reconstruction.png: per test image the original, the masked input, the
reconstruction, and the reconstruction with the visible patches pasted back.
Expect: the paper's numbers are ImageNet ones (above); CIFAR-10 numbers (the `cpu` preset on 2
cores, the `gpu` preset) are in the README with their commands. The result line reports the
test reconstruction loss next to `mean_color_loss`, the same loss for predicting each image's
mean colour: a model that learned something is far below it.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
import torch.nn as nn

try:  # a script copied on its own: say what else to copy, not a traceback
    import common  # noqa: F401
except ModuleNotFoundError:
    print(
        "error: mae.py needs the common/ folder next to it: copy common/ with it", file=sys.stderr
    )
    raise SystemExit(2) from None

from common import dist
from common.augment import AugConfig, BatchAugment, normalize
from common.cli import ConfigError, apply_preset, base_parser, run_cli
from common.data import load_split
from common.eval import knn_top1, labelled
from common.feed import BatchFeed, step_generator
from common.train import TrainRun, setup_run
from common.vit import (
    VIT_SIZES,
    Block,
    init_weights,
    patchify,
    sincos_pos_embed,
    unpatchify,
    vit_from_config,
)

# ----------------------------------------------------------------------------------- config
# `gpu` follows the paper's recipe (AdamW betas 0.9/0.95, base lr 1.5e-4 x batch/256, wd 0.05,
# 40 warm-up epochs, cosine, 800 epochs, mask 75%, norm_pix_loss, crops of scale 0.2-1 + flip)
# with a ViT-S on 4 x 4 patches for CIFAR. `tiny` proves the pipeline in seconds (tests); `cpu`
# is ~10 minutes on 2 cores (a 96-d ViT, 4 blocks: the paper's sizes need GPU-days). Both take
# small batches with a higher base lr (peak 2.5e-3, 3e-3): at CPU budgets steps are what count.
# fmt: off
#                  tiny        cpu         gpu
_TABLE = {
    "epochs":        (12,         10,         800),    # passes over the (limited) training set
    "batch_size":    (32,         128,        1024),   # global batch
    "lr":            (2e-2,       6e-3,       1.5e-4), # base lr; peak = lr * batch / 256
    "weight_decay":  (0.05,       0.05,       0.05),   # AdamW; not on norms, biases, tokens
    "warmup_epochs": (0.5,        1,          40),     # linear warm-up, then cosine decay to 0
    "backbone":      ("vit_pico", "vit_nano", "vit_small"),
    "limit_train":   (1024,       None,       None),   # random subset of train images
    "log_every":     (32,         100,        50),     # steps between log lines
    "eval_every":    (0,          0,          100),    # epochs between evals (0: at the end)
    "knn_bank":      (2000,       10000,      None),   # train images in the k-NN bank
    "recon_images":  (500,        2000,       None),   # test images for the recon loss
    "norm_pix_loss": (False,      False,      True),   # per-patch normalised targets
}
# fmt: on
PRESETS = {
    name: {k: v[i] for k, v in _TABLE.items()} for i, name in enumerate(("tiny", "cpu", "gpu"))
}
# --mask-type: the paper's sampling strategies (Figure 6), each a function in the masking section
MASK_TYPES = ("random", "block", "grid")


def get_args_parser() -> argparse.ArgumentParser:
    p = base_parser("mae", __doc__, backbones=tuple(VIT_SIZES))  # ViT sizes (common/vit.py)
    p.add_argument("--patch-size", type=int, default=4, help="patch side in pixels")
    p.add_argument("--mask-ratio", type=float, default=0.75, help="fraction of patches masked")
    p.add_argument("--mask-type", choices=MASK_TYPES, default="random", help="masking")
    p.add_argument(
        "--norm-pix-loss",
        action=argparse.BooleanOptionalAction,
        help="targets: each patch's pixels normalised by its own mean and std (default: preset)",
    )
    p.add_argument(
        "--pool",
        choices=["cls", "mean"],
        default="mean",
        help="encoder features: class token or mean of the patch tokens (saved in the config)",
    )
    p.add_argument("--decoder-dim", type=int, help="decoder width (default: per ViT size)")
    p.add_argument("--decoder-depth", type=int, help="decoder blocks (default: per ViT size)")
    p.add_argument("--decoder-heads", type=int, help="decoder heads (default: per ViT size)")
    p.add_argument("--recon-images", type=int, help="test images for the recon loss (all)")
    return p


# ---------------------------------------------------------------------------------- masking
# Every strategy returns ids_shuffle [n, L]: a permutation of the raster-order patch indices
# whose first L - round(ratio * L) entries are visible and the rest masked (MAE's layout).
def num_masked(num_patches: int, ratio: float) -> int:
    return round(ratio * num_patches)


def random_masking(n: int, grid: int, ratio: float, gen: torch.Generator) -> torch.Tensor:
    """MAE's: per sample, a uniformly random subset of patches (argsort of uniform noise)."""
    return torch.argsort(torch.rand(n, grid * grid, generator=gen), 1)


def block_masking(
    n: int, grid: int, ratio: float, gen: torch.Generator, blocks: int = 16
) -> torch.Tensor:
    """BEiT's block-wise masking: random rectangles (area uniform from BEiT's 16/196 of the
    patches up to the masked count, aspect 0.3-3.3) masked one after another until the count
    is reached; the last block is cut in raster order, so the count is exact."""
    L, n_mask = grid * grid, num_masked(grid * grid, ratio)
    lo = min(n_mask, max(1, round(L * 16 / 196)))
    area = torch.empty(n, blocks).uniform_(lo, n_mask, generator=gen)
    aspect = torch.empty(n, blocks).uniform_(math.log(0.3), -math.log(0.3), generator=gen).exp()
    h = (area * aspect).sqrt().round().clamp(1, grid)  # [n, K]
    w = (area / aspect).sqrt().round().clamp(1, grid)
    u = torch.rand(n, blocks, 2, generator=gen)
    top = (u[..., 0] * (grid - h + 1)).floor()[..., None, None]  # [n, K, 1, 1]
    left = (u[..., 1] * (grid - w + 1)).floor()[..., None, None]
    r = torch.arange(grid).view(1, 1, grid, 1)
    c = torch.arange(grid).view(1, 1, 1, grid)
    h, w = h[..., None, None], w[..., None, None]
    inside = ((r >= top) & (r < top + h) & (c >= left) & (c < left + w)).flatten(2)  # [n, K, L]
    # Masking order: block 0's patches, then block 1's new ones, ... (raster order inside a
    # block); a patch no block covers comes last, in random order (a rare fallback).
    first = torch.where(inside.any(1), inside.int().argmax(1), blocks)  # [n, L]
    within = torch.where(first == blocks, torch.rand(n, L, generator=gen) * L, torch.arange(L))
    return torch.argsort(first * L + within, 1, descending=True)  # masked (lowest) last


def grid_masking(n: int, grid: int, ratio: float, gen: torch.Generator) -> torch.Tensor:
    """Keep one patch of every s x s cell (s = 2 for 75%), at a random phase per sample."""
    L, s = grid * grid, round((1 - ratio) ** -0.5)
    if s < 2 or grid % s or num_masked(L, ratio) != L - (grid // s) ** 2:
        raise ConfigError(
            f"--mask-type grid keeps one patch of every s x s (s dividing the {grid} x {grid} "
            f"grid): --mask-ratio must be 1 - 1/s^2 (0.75 for s=2), got {ratio}"
        )
    phase = torch.randint(0, s, (n, 2, 1, 1), generator=gen)
    r = torch.arange(grid).view(1, grid, 1)
    c = torch.arange(grid).view(1, 1, grid)
    keep = ((r - phase[:, 0]) % s == 0) & ((c - phase[:, 1]) % s == 0)  # [n, grid, grid]
    key = (~keep).flatten(1).float() + 0.5 * torch.rand(n, L, generator=gen)
    return torch.argsort(key, 1)  # visible first


MASKINGS = dict(zip(MASK_TYPES, (random_masking, block_masking, grid_masking)))


def split_mask(ids_shuffle: torch.Tensor, n_keep: int):
    """-> ids_keep [n, n_keep], ids_restore [n, L] (each patch's place in the shuffle, which
    un-shuffles the decoder's tokens), mask [n, L] float (1 = masked)."""
    ids_restore = torch.argsort(ids_shuffle, 1)
    return ids_shuffle[:, :n_keep], ids_restore, (ids_restore >= n_keep).float()


def make_mask(kind: str, n: int, grid: int, ratio: float, gen: torch.Generator) -> torch.Tensor:
    """ids_shuffle [n, grid^2] (on the CPU, from `gen`: a pure function of the step)."""
    return MASKINGS[kind](n, grid, ratio, gen)


# ------------------------------------------------------------------------------------ model
class MAEDecoder(nn.Module):
    """Encoder tokens + mask tokens -> predicted pixels of every patch [B, L, p*p*C]."""

    def __init__(self, enc_dim, dim, depth, heads, grid, patch_size, in_chans=3):
        super().__init__()
        self.embed = nn.Linear(enc_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("pos_embed", sincos_pos_embed(dim, grid)[None])  # [1, 1+L, dim]
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pred = nn.Linear(dim, patch_size**2 * in_chans)
        init_weights(self)

    def forward(self, tokens: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        # tokens [B, 1 + n_keep, enc_dim] (class token first); ids_restore [B, L]
        x = self.embed(tokens)  # [B, 1 + n_keep, dim]
        B, L, dim = len(x), ids_restore.shape[1], x.shape[-1]
        x_ = torch.cat([x[:, 1:], self.mask_token.expand(B, L + 1 - x.shape[1], dim)], 1)
        x_ = x_.gather(1, ids_restore[..., None].expand(-1, -1, dim))  # shuffled -> raster order
        x = torch.cat([x[:, :1], x_], 1) + self.pos_embed  # [B, 1 + L, dim]
        for blk in self.blocks:
            x = blk(x)
        return self.pred(self.norm(x))[:, 1:]  # drop the class token: [B, L, p*p*C]


def patch_targets(imgs: torch.Tensor, p: int, norm_pix: bool) -> torch.Tensor:
    """[B, C, H, W] -> [B, L, p*p*C] targets; norm_pix: per patch (x - mean) / sqrt(var + 1e-6)."""
    t = patchify(imgs.float(), p)
    if norm_pix:
        t = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6).sqrt()
    return t


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error per patch [B, L], averaged over the masked patches (mask 1) only."""
    return (((pred - target) ** 2).mean(-1) * mask).sum() / mask.sum()


class MAE(nn.Module):
    def __init__(self, encoder: nn.Module, decoder: MAEDecoder, norm_pix_loss: bool):
        super().__init__()
        self.encoder, self.decoder, self.norm_pix_loss = encoder, decoder, norm_pix_loss

    def forward(self, imgs: torch.Tensor, ids_shuffle: torch.Tensor, n_keep: int):
        """imgs [B, C, H, W], ids_shuffle [B, L] -> (loss, pred [B, L, p*p*C], mask [B, L])."""
        ids_keep, ids_restore, mask = split_mask(ids_shuffle, n_keep)
        latent = self.encoder.forward_tokens(imgs, ids_keep)  # the visible patches only
        pred = self.decoder(latent, ids_restore).float()  # the loss in fp32
        target = patch_targets(imgs, self.encoder.patch_size, self.norm_pix_loss)
        return masked_mse(pred, target, mask), pred, mask


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on weight matrices only: not on norms, biases, class/mask tokens."""
    decay, rest = [], []
    for name, p in model.named_parameters():
        (rest if p.ndim <= 1 or name.endswith("token") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0}]


def build_mae(args: argparse.Namespace) -> MAE:
    encoder = vit_from_config(vars(args))
    decoder = MAEDecoder(
        encoder.feat_dim,
        args.decoder_dim,
        args.decoder_depth,
        args.decoder_heads,
        encoder.grid,
        args.patch_size,
    )
    return MAE(encoder, decoder, args.norm_pix_loss)


# ------------------------------------------------------------------------------------- eval
@torch.no_grad()
def reconstruction_losses(model: MAE, images, mean, std, args, device) -> dict:
    """Test loss (the training objective, fixed masks from --seed), the same loss for
    predicting each image's mean colour, both through the same target normalisation, and the
    loss under one shared random 75% mask (recon_loss_random75). (With
    norm_pix the mean-colour image normalised per patch keeps only its channel pattern; a flat
    prediction, 0 there, would score ~1.)"""
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(args.seed)
    # The masking ablation compares models trained with different masks on one task: random
    # 75% masks from a generator seeded 0, the same for every run whatever its --seed.
    gen_shared = torch.Generator().manual_seed(0)
    p, grid = model.encoder.patch_size, model.encoder.grid
    n_keep = grid * grid - num_masked(grid * grid, args.mask_ratio)
    n_keep_shared = grid * grid - num_masked(grid * grid, 0.75)
    tot = {"recon_loss": 0.0, "mean_color_loss": 0.0, "recon_loss_random75": 0.0}
    for chunk in images.split(500):
        x = normalize(chunk.to(device), mean, std)  # [n, 3, H, W]
        ids = make_mask(args.mask_type, len(x), grid, args.mask_ratio, gen).to(device)
        shared = make_mask("random", len(x), grid, 0.75, gen_shared).to(device)
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            loss, _, mask = model(x, ids, n_keep)
            loss_shared = model(x, shared, n_keep_shared)[0]
        color = x.mean((2, 3), keepdim=True).expand_as(x)  # each image's mean colour
        target = patch_targets(x, p, args.norm_pix_loss)
        base = masked_mse(patch_targets(color, p, args.norm_pix_loss), target, mask)
        tot["recon_loss"] += loss.item() * len(x)  # every image has the same masked count
        tot["mean_color_loss"] += base.item() * len(x)
        tot["recon_loss_random75"] += loss_shared.item() * len(x)
    model.train(was_training)
    return {k: v / len(images) for k, v in tot.items()}


@torch.no_grad()
def save_reconstructions(model: MAE, images, mean, std, args, device, path: Path) -> None:
    """PNG, one row per image: original | masked input | reconstruction | + visible patches."""
    from torchvision.utils import save_image

    model.eval()
    p, grid = model.encoder.patch_size, model.encoder.grid
    x = normalize(images.to(device), mean, std)
    gen = torch.Generator().manual_seed(args.seed)
    ids = make_mask(args.mask_type, len(x), grid, args.mask_ratio, gen).to(device)
    _, pred, mask = model(x, ids, grid * grid - num_masked(grid * grid, args.mask_ratio))
    target = patchify(x.float(), p)
    if args.norm_pix_loss:  # for display only: undo the normalisation with each patch's stats
        pred = pred * (target.var(-1, keepdim=True) + 1e-6).sqrt() + target.mean(-1, keepdim=True)
    m = unpatchify(mask[..., None].expand_as(pred), p)  # [n, 3, H, W], 1 = masked
    mean_t = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=device).view(1, 3, 1, 1)
    orig, rec = [(y * std_t + mean_t).clamp(0, 1) for y in (x.float(), unpatchify(pred, p))]
    cols = [orig, orig * (1 - m) + 0.5 * m, rec, orig * (1 - m) + rec * m]
    tiles = torch.stack(cols, 1).flatten(0, 1)  # [4n, 3, H, W], row-major: image by image
    tiles = nn.functional.interpolate(tiles, scale_factor=4, mode="nearest")
    save_image(tiles.cpu(), path, nrow=4, padding=2, pad_value=1.0)
    model.train()


# ------------------------------------------------------------------------------------ train
def check_mae_args(args: argparse.Namespace) -> None:
    """Reject bad MAE settings (after the crop size is known) before any work starts."""
    if not 0 < args.mask_ratio < 1:
        raise ConfigError(f"--mask-ratio must be in (0, 1), got {args.mask_ratio}")
    if args.patch_size <= 0 or args.crop_size % args.patch_size:
        raise ConfigError(f"--patch-size {args.patch_size} must divide the crop {args.crop_size}")
    L = (args.crop_size // args.patch_size) ** 2
    if not 0 < num_masked(L, args.mask_ratio) < L:
        raise ConfigError(f"--mask-ratio {args.mask_ratio} of {L} patches masks none or all")
    make_mask(args.mask_type, 1, args.crop_size // args.patch_size, args.mask_ratio, None)
    dim, heads = args.decoder_dim, args.decoder_heads
    if dim % heads or dim % 4 or args.decoder_depth < 1:
        raise ConfigError(f"--decoder-dim {dim} must be a multiple of 4 and of --decoder-heads")


def step_loss(model, aug, images, gen, mask_gen, args, grid: int, n_keep: int):
    """One step's loss, with no host sync: images uint8 [n, H, W, 3] on the device."""
    x = aug(images, gen)  # [n, 3, S, S]
    ids = make_mask(args.mask_type, len(x), grid, args.mask_ratio, mask_gen)  # [n, L] (CPU)
    if x.is_cuda:  # an asynchronous copy from pinned memory, not a blocking one
        ids = ids.pin_memory().to(x.device, non_blocking=True)
    with torch.autocast(x.device.type, torch.bfloat16, enabled=x.is_cuda):
        loss, _, _ = model(x, ids, n_keep)
    return loss


def main(args):
    device, out = setup_run(args)
    rank = dist.get_rank()
    train = load_split(args.data, "train", include_unlabeled=True).subset(
        args.limit_train, args.seed
    )
    test = load_split(args.data, "test").subset(args.limit_test, args.seed)
    args.image_size = train.image_size
    args.crop_size = args.crop_size or train.image_size
    dec = VIT_SIZES[args.backbone][1]  # the size's default decoder, unless given
    args.decoder_dim = args.decoder_dim or dec[0]
    args.decoder_depth = args.decoder_depth or dec[1]
    args.decoder_heads = args.decoder_heads or dec[2]
    check_mae_args(args)
    # MAE's augmentation: RandomResizedCrop(scale 0.2-1) + flip, normalised; no colour ops.
    aug_cfg = AugConfig(args.crop_size, scale=(0.2, 1.0), jitter_p=0.0, gray_p=0.0)
    aug = BatchAugment(aug_cfg, train.mean, train.std)

    model = build_mae(args).to(device)
    grid = model.encoder.grid
    n_keep = grid * grid - num_masked(grid * grid, args.mask_ratio)
    peak_lr = args.lr * args.batch_size / 256
    groups = param_groups(model, args.weight_decay)
    opt = torch.optim.AdamW(groups, lr=peak_lr, betas=(0.9, 0.95), fused=device.type == "cuda")
    feed = BatchFeed(train.images, args.batch_size, device, args.seed)
    run = TrainRun(
        args,
        out,
        "mae",
        backbone=model.encoder,
        head=model.decoder,
        optimizer=opt,
        steps_per_epoch=feed.steps_per_epoch,
        peak_lr=peak_lr,
    )
    ddp = dist.wrap_ddp(model, device)
    bank, recon_set = (
        labelled(train).subset(args.knn_bank, args.seed),
        test.subset(args.recon_images),
    )

    def evaluate(epoch):
        res = {"knn_top1": knn_top1(model.encoder, bank, test, device)}
        res |= reconstruction_losses(model, recon_set.images, train.mean, train.std, args, device)
        run.log.write({"step": run.step, "epoch": epoch, **res})
        if dist.is_main():
            print(f"epoch {epoch} " + " ".join(f"{k} {v:.4g}" for k, v in res.items()), flush=True)
        return res

    for images in run.batches(feed, evaluate):
        # Crops and masks from generators seeded by (seed, rank, step): resumable, per rank.
        # The crops are drawn on the device, the masks on the CPU (one generator on a CPU).
        gen = step_generator(args.seed, rank, run.step, device)
        mask_gen = gen if device.type == "cpu" else step_generator(args.seed, rank, run.step)
        lr = run.set_lr(opt)
        loss = step_loss(ddp, aug, images, gen, mask_gen, args, grid, n_keep)
        if run.nonfinite(loss):  # stops the run, or skips this update with --skip-nonfinite
            continue
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        run.step_done(loss, lr=lr)
    if run.stopped:
        return run.finish()
    if dist.is_main():
        show = test.subset(8, args.seed + 1).images
        save_reconstructions(
            model, show, train.mean, train.std, args, device, out / "mae_reconstruction.png"
        )
    return run.finish(**evaluate(args.epochs))


if __name__ == "__main__":
    run_cli(main, apply_preset(get_args_parser().parse_args(), PRESETS))
