"""SimCLR's augmentations, applied per sample to a whole batch on the training device.

Why not torchvision's transforms: they draw one set of random parameters per call, so a batch
needs a Python loop over images, usually in CPU DataLoader workers, and a few CPU workers cannot
feed a GPU at CIFAR's ~10k+ images/s. Here every image gets its own parameters, drawn from the
same distributions as torchvision's `RandomResizedCrop`, `RandomHorizontalFlip`,
`RandomApply(ColorJitter)`, `RandomGrayscale` and `GaussianBlur` (tests/test_augment.py checks
the distributions and the per-image maths against torchvision), and the ops run batched.

Pipeline (SimCLR, Chen et al. 2020, appendix A and B.9), all on [B, 3, H, W] floats in [0, 1]:
  random resized crop (scale 0.08-1, ratio 3/4-4/3) -> horizontal flip (p 0.5) ->
  colour jitter (0.8s, 0.8s, 0.8s, 0.2s; p 0.8; s = 1 for ImageNet, 0.5 for CIFAR) in a random
  order per image -> grayscale (p 0.2) -> Gaussian blur (p 0.5 on ImageNet, off for CIFAR) ->
  normalise with the dataset's mean and std.

The paper's other augmentations (its Figure 4, for the composition study of Figure 5; off
unless their probability is set, and then drawn after the ones above, so that the default
pipeline's random stream is unchanged): rotation by 90, 180 or 270 degrees (after the flip),
Sobel filtering (the grey image's gradient magnitude, after the blur), Gaussian noise (then),
cutout (last, after normalising: a square filled with the dataset's mean colour). The paper
gives no parameters for these; ours are in AugConfig.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align


@dataclass
class AugConfig:
    size: int  # output side in pixels
    scale: tuple[float, float] = (0.08, 1.0)  # crop area as a fraction of the image
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # crop aspect ratio w/h
    flip_p: float = 0.5
    jitter_strength: float = 0.5  # s: ColorJitter(0.8s, 0.8s, 0.8s, 0.2s)
    jitter_p: float = 0.8
    gray_p: float = 0.2
    blur_p: float = 0.0  # SimCLR: 0.5 on ImageNet, off on CIFAR
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    rotate_p: float = 0.0  # rotate by 90, 180 or 270 degrees (equally likely)
    sobel_p: float = 0.0  # replace the image by its Sobel gradient magnitude (grey)
    noise_p: float = 0.0  # add Gaussian noise of std noise_sigma (in [0, 1] pixel units)
    noise_sigma: tuple[float, float] = (0.05, 0.15)
    cutout_p: float = 0.0  # one square of side cutout_side x size, centre anywhere (DeVries 2017)
    cutout_side: tuple[float, float] = (0.25, 0.5)

    @property
    def jitter(self) -> tuple[float, float, float, float]:
        s = self.jitter_strength
        return (0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)


def sample_crop_boxes(
    n: int,
    height: int,
    width: int,
    scale,
    ratio,
    gen: torch.Generator | None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Integer crop boxes [n, 4] = (top, left, h, w), as torchvision's RandomResizedCrop.get_params.

    torchvision tries up to 10 (area, log-ratio) draws and takes the first that fits, else falls
    back to a central crop; we draw all 10 tries for every sample at once and pick the first fit.
    Everything is drawn and computed on `device` (gen's device): no host sync, no copy.
    """
    area = height * width
    target = area * torch.empty(n, 10, device=device).uniform_(scale[0], scale[1], generator=gen)
    log_r = torch.empty(n, 10, device=device)
    log_r.uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=gen)
    aspect = torch.exp(log_r)
    w = torch.round(torch.sqrt(target * aspect))  # [n, 10]; round half to even, as Python's
    h = torch.round(torch.sqrt(target / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.float().argmax(1)  # index of the first try that fits (0 if none does)
    w = w.gather(1, first[:, None])[:, 0]
    h = h.gather(1, first[:, None])[:, 0]
    u = torch.rand(n, 2, generator=gen, device=device)
    top = torch.floor(u[:, 0] * (height - h + 1))  # uniform integer in [0, H - h]
    left = torch.floor(u[:, 1] * (width - w + 1))
    # Central-crop fallback for samples where no try fitted (rare at scale >= 0.08).
    in_ratio = width / height
    if in_ratio < min(ratio):
        fw, fh = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        fw, fh = int(round(height * max(ratio))), height
    else:
        fw, fh = width, height
    none = ~fits.any(1)
    h = torch.where(none, torch.full_like(h, fh), h)
    w = torch.where(none, torch.full_like(w, fw), w)
    top = torch.where(none, torch.full_like(top, (height - fh) // 2), top)
    left = torch.where(none, torch.full_like(left, (width - fw) // 2), left)
    return torch.stack([top, left, h, w], 1).long()


def sample_params(
    cfg: AugConfig,
    n: int,
    height: int,
    width: int,
    gen: torch.Generator | None,
    device: torch.device | str | None = None,
) -> dict:
    """Every random choice for n images (a few numbers per image), drawn on `device` from
    `gen` (a generator of that device): on a GPU nothing is drawn on the host or copied."""
    b, c, s, hue = cfg.jitter

    def uniform(lo, hi):
        return torch.empty(n, device=device).uniform_(lo, hi, generator=gen)

    def rand(*shape):
        return torch.rand(*shape, generator=gen, device=device)

    p = {
        "boxes": sample_crop_boxes(n, height, width, cfg.scale, cfg.ratio, gen, device),
        "flip": rand(n) < cfg.flip_p,
        "jitter": rand(n) < cfg.jitter_p,
        # ColorJitter's factor ranges [max(0, 1 - x), 1 + x]
        "brightness": uniform(max(0.0, 1 - b), 1 + b),
        "contrast": uniform(max(0.0, 1 - c), 1 + c),
        "saturation": uniform(max(0.0, 1 - s), 1 + s),
        "hue": uniform(-hue, hue),
        # ColorJitter applies its 4 ops in a random order: one permutation per image.
        "order": torch.argsort(rand(n, 4), 1),
        "gray": rand(n) < cfg.gray_p,
        "blur": rand(n) < cfg.blur_p,
        "sigma": uniform(*cfg.blur_sigma),
    }
    # The optional ops draw after the rest, and only when on: the default stream is unchanged.
    if cfg.rotate_p > 0:  # quarter turns k in {1, 2, 3} where drawn, else 0
        k = torch.randint(1, 4, (n,), generator=gen, device=device)
        p["rot_k"] = k * (rand(n) < cfg.rotate_p)
    if cfg.sobel_p > 0:
        p["sobel"] = rand(n) < cfg.sobel_p
    if cfg.noise_p > 0:
        p["noise"] = rand(n) < cfg.noise_p
        p["noise_sigma"] = uniform(*cfg.noise_sigma)
        p["noise_field"] = torch.randn(n, 3, cfg.size, cfg.size, generator=gen, device=device)
    if cfg.cutout_p > 0:
        p["cutout"] = rand(n) < cfg.cutout_p
        p["cut_centre"] = rand(n, 2)  # (y, x) as fractions of the side
        p["cut_side"] = uniform(*cfg.cutout_side)
    return p


def resized_crop(x: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """[B, C, H, W] float -> [B, C, size, size], crop b = boxes[b] (top, left, h, w), bilinear.

    torchvision's roi_align does a batched crop-and-resize; with sampling_ratio=-1 it averages
    ceil(h/size) x ceil(w/size) bilinear samples per output pixel, i.e. it antialiases when the
    crop is larger than the output (a box filter, where torchvision's antialias=True resize uses
    a triangle filter) and equals torchvision's bilinear resize when upsampling, except for the
    output pixels whose sample point falls outside the crop (a ring of at most size/(2h) pixels):
    roi_align reads the neighbouring image pixels there, torchvision clamps to the crop's edge.
    """
    boxes = boxes.to(x.device, torch.float32)
    top, left, h, w = boxes.unbind(1)
    idx = torch.arange(len(x), device=x.device, dtype=torch.float32)
    rois = torch.stack([idx, left, top, left + w, top + h], 1)  # [B, 5] = (b, x1, y1, x2, y2)
    return roi_align(x, rois, (size, size), spatial_scale=1.0, sampling_ratio=-1, aligned=True)


def rgb_to_gray(x: torch.Tensor) -> torch.Tensor:
    """[..., 3, H, W] -> [..., 1, H, W] with ITU-R 601 weights, as torchvision."""
    r, g, b = x.unbind(-3)
    return (0.2989 * r + 0.587 * g + 0.114 * b).unsqueeze(-3)


def _blend(a: torch.Tensor, b: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    f = f.view(-1, 1, 1, 1)
    return (f * a + (1 - f) * b).clamp_(0, 1)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate hue by shift[b] (in turns, [-0.5, 0.5]) via HSV, per image; x: [B, 3, H, W]."""
    r, g, b = x.unbind(1)
    maxc = x.max(1).values
    minc = x.min(1).values
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    sat = delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc))
    # Hue in sixths of a turn, by which channel is the max (ties: r before g before b).
    h = torch.where(
        maxc == r, (g - b) / safe, torch.where(maxc == g, 2 + (b - r) / safe, 4 + (r - g) / safe)
    )
    h = torch.where(delta > 0, h, torch.zeros_like(h))
    h = torch.remainder(h / 6 + shift.view(-1, 1, 1), 1.0)
    # HSV -> RGB: each channel k is v - v*s*clamp(min(m, 4 - m), 0, 1), m = (n_k + 6h) mod 6.
    out = []
    for n in (5.0, 3.0, 1.0):
        m = torch.remainder(n + h * 6, 6)
        out.append(maxc - maxc * sat * torch.clamp(torch.minimum(m, 4 - m), 0, 1))
    return torch.stack(out, 1)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Separable Gaussian blur with a per-image sigma, reflect padding (as torchvision)."""
    B, C, H, W = x.shape
    half = (kernel_size - 1) / 2
    t = torch.linspace(-half, half, kernel_size, device=x.device)
    k = torch.exp(-0.5 * (t[None] / sigma.to(x.device)[:, None]) ** 2)  # [B, K]
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(C, 0)  # [B*C, K], one filter per channel
    p = kernel_size // 2
    y = F.pad(x.reshape(1, B * C, H, W), (p, p, p, p), mode="reflect")
    y = F.conv2d(y, k[:, None, None, :], groups=B * C)  # horizontal pass
    y = F.conv2d(y, k[:, None, :, None], groups=B * C)  # vertical pass
    return y.view(B, C, H, W)


def sobel_magnitude(x: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] -> [B, 1, H, W]: the grey image's Sobel gradient magnitude (edge pixels
    replicated, as scipy.ndimage.sobel's mode="nearest"), scaled by each image's maximum to
    [0, 1] (a flat image gives 0)."""
    g = F.pad(rgb_to_gray(x), (1, 1, 1, 1), mode="replicate")
    kx = torch.tensor([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]], device=x.device, dtype=x.dtype)
    k = torch.stack([kx, kx.T])[:, None]  # [2, 1, 3, 3]: d/dx, d/dy
    mag = F.conv2d(g, k).square().sum(1, keepdim=True).sqrt()  # [B, 1, H, W]
    return mag / mag.amax((-2, -1), keepdim=True).clamp_min(1e-6)


def cutout_mask(p: dict, size: int) -> torch.Tensor:
    """[B, 1, size, size] bool: each drawing image's square (side round(cut_side x size),
    centred at cut_centre, clipped at the border); all False for the others."""
    device = p["cutout"].device
    side = torch.round(p["cut_side"] * size).clamp_min(1)  # [B]
    start = torch.floor(p["cut_centre"] * size) - torch.floor(side / 2)[:, None]  # [B, 2] (y, x)
    idx = torch.arange(size, device=device, dtype=start.dtype)
    rows = (idx >= start[:, :1]) & (idx < start[:, :1] + side[:, None])  # [B, size]
    cols = (idx >= start[:, 1:]) & (idx < start[:, 1:] + side[:, None])
    return (rows[:, :, None] & cols[:, None, :] & p["cutout"].view(-1, 1, 1))[:, None]


def _jitter_op(op: int, x: torch.Tensor, p: dict, sel=slice(None)) -> torch.Tensor:
    """ColorJitter's op number `op` on x (the images `sel` of the batch), with their factors."""
    if op == 0:  # brightness: blend with black
        return (x * p["brightness"][sel].view(-1, 1, 1, 1)).clamp(0, 1)
    if op == 1:  # contrast: blend with the mean grey level of the image
        mean = rgb_to_gray(x).mean((-3, -2, -1), keepdim=True)
        return _blend(x, mean, p["contrast"][sel])
    if op == 2:  # saturation: blend with the grey image
        return _blend(x, rgb_to_gray(x), p["saturation"][sel])
    return adjust_hue(x, p["hue"][sel])


def apply_params(
    x: torch.Tensor, p: dict, cfg: AugConfig, masked: bool | None = None
) -> torch.Tensor:
    """x: [B, 3, H, W] float in [0, 1] -> augmented [B, 3, size, size] in [0, 1].

    masked (default: on CUDA): every op runs on the whole batch and torch.where keeps it for
    the images that draw it, so that the step needs no host sync (torch.nonzero, and a size
    that depends on the data, wait for the GPU). Elsewhere the images that draw an op are
    gathered and only those computed (the CPU has no such wait, and the work is 4x smaller
    in the colour jitter). Both give the same images (tests/test_augment.py)."""
    if masked is None:
        masked = x.is_cuda
    p = {k: v.to(x.device, non_blocking=True) for k, v in p.items()}  # (no-ops when drawn there)
    x = resized_crop(x, p["boxes"], cfg.size)
    x = torch.where(p["flip"].view(-1, 1, 1, 1), x.flip(-1), x)
    if "rot_k" in p:  # counter-clockwise quarter turns (as torchvision's rotate(90 k))
        k = p["rot_k"].view(-1, 1, 1, 1)
        for r in (1, 2, 3):
            x = torch.where(k == r, torch.rot90(x, r, (-2, -1)), x)
    # Colour jitter: at step k, each jittered image runs the op its own permutation names there.
    for k in range(4):
        for op in range(4):
            pick = p["jitter"] & (p["order"][:, k] == op)  # [B] bool
            if masked:
                x = torch.where(pick.view(-1, 1, 1, 1), _jitter_op(op, x, p), x)
                continue
            sel = torch.nonzero(pick).flatten()
            if sel.numel():
                x = x.index_copy(0, sel, _jitter_op(op, x[sel], p, sel))
    x = torch.where(p["gray"].view(-1, 1, 1, 1), rgb_to_gray(x).expand_as(x), x)
    if cfg.blur_p > 0:
        ks = int(0.1 * cfg.size) // 2 * 2 + 1  # 10% of the side, odd (SimCLR appendix A)
        if masked:
            blurred = gaussian_blur(x, p["sigma"], ks)
            x = torch.where(p["blur"].view(-1, 1, 1, 1), blurred, x)
        else:
            sel = torch.nonzero(p["blur"]).flatten()
            if sel.numel():
                x = x.index_copy(0, sel, gaussian_blur(x[sel], p["sigma"][sel], ks))
    if "sobel" in p:
        x = torch.where(p["sobel"].view(-1, 1, 1, 1), sobel_magnitude(x).expand_as(x), x)
    if "noise" in p:
        noisy = (x + p["noise_sigma"].view(-1, 1, 1, 1) * p["noise_field"]).clamp(0, 1)
        x = torch.where(p["noise"].view(-1, 1, 1, 1), noisy, x)
    return x  # (cutout comes after normalising: BatchAugment)


class BatchAugment:
    """Callable: uint8 [B, H, W, 3] (or [B, 3, H, W] float) -> normalised float [B, 3, S, S]."""

    def __init__(self, cfg: AugConfig, mean, std):
        self.cfg = cfg
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)
        self._consts: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, images: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
        """images on the training device; gen: a generator of that device (common.feed.
        step_generator), from which every random parameter is drawn there."""
        x = to_float(images)
        p = sample_params(self.cfg, x.shape[0], x.shape[2], x.shape[3], gen, x.device)
        x = apply_params(x, p, self.cfg)
        if x.device not in self._consts:  # copied to the device once, not every step
            self._consts[x.device] = (self.mean.to(x.device), self.std.to(x.device))
        mean, std = self._consts[x.device]
        x = (x - mean) / std
        if "cutout" in p:  # 0 after normalising: the dataset's mean colour
            x = x.masked_fill(cutout_mask(p, x.shape[-1]), 0.0)
        return x


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B, H, W, C] (the cache's layout) -> float [B, C, H, W] in [0, 1]."""
    if images.dtype == torch.uint8:
        return images.permute(0, 3, 1, 2).float().div_(255)
    return images


def normalize(images: torch.Tensor, mean, std) -> torch.Tensor:
    """Evaluation transform: no augmentation, just [0, 1] floats normalised."""
    x = to_float(images)
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s
