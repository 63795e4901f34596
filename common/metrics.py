"""Metrics and data tools for the evaluation protocols (evaluate.py), all in torch.

- `kmeans`: Lloyd's algorithm with greedy k-means++ seeding (scikit-learn's) and several
  restarts, on any device (chunked distances, so 50k x 2048 features and k = 1000 fit a GPU).
- `nmi`, `ari`, `cluster_accuracy`: agreement of a clustering with the labels. NMI and ARI
  follow scikit-learn's definitions (arithmetic-mean normalisation; the adjusted Rand index of
  Hubert & Arabie) including its limit cases; cluster accuracy maps clusters to classes one to
  one with the Hungarian algorithm (scipy's `linear_sum_assignment`), as in DEC / SCAN.
- `balanced_subset`: the few-label subsets of SimCLR's Table 7 (1% / 10% of the labels):
  floor(fraction * n_c) images of every class c (at least one), drawn with a fixed seed.
- `corrupt`: common corruptions in the spirit of CIFAR-10-C / ImageNet-C (Hendrycks &
  Dietterich, ICLR 2019): Gaussian noise, Gaussian blur, contrast and JPEG at severities 1-5
  with their parameters (CIFAR-10-C's for images up to 64 px, ImageNet-C's above).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

Labels = torch.Tensor | np.ndarray | Sequence[int]


# ------------------------------------------------------------------------------------ k-means
@dataclass
class KMeansResult:
    labels: torch.Tensor  # [N] int64 cluster of each point
    centroids: torch.Tensor  # [k, D]
    inertia: float  # sum of squared distances of the points to their centroids
    iterations: int  # Lloyd iterations of the best restart


def _sq_dists_min(
    x: torch.Tensor, c: torch.Tensor, chunk: int = 16384
) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared distance of every row of x [N, D] to its nearest centroid c [k, D], and which
    centroid: ([N], [N]). ||x||^2 - 2 x.c + ||c||^2, chunked over N to bound the [n, k] block."""
    c_sq = (c * c).sum(1)  # [k]
    d_min, idx = [], []
    for xs in x.split(chunk):
        d = (xs * xs).sum(1, keepdim=True) - 2 * xs @ c.t() + c_sq  # [n, k]
        m, i = d.min(1)
        d_min.append(m.clamp_min_(0))  # rounding can make it slightly negative
        idx.append(i)
    return torch.cat(d_min), torch.cat(idx)


def _kmeans_pp(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """Greedy k-means++ seeding, scikit-learn's: the first centre is uniform; each next one is
    the best of 2 + int(ln k) candidates drawn with probability proportional to the squared
    distance to the nearest centre so far, "best" meaning the one whose addition leaves the
    lowest potential (sum of those squared distances). Arthur & Vassilvitskii (2007) mention
    this variant in their conclusion; plain k-means++ (one candidate) ends, after the same
    number of restarts, in local optima up to tens of percent worse on clustered data.

    The random numbers come from `gen` (a CPU generator: the same seed gives the same draws on
    any device); the distances, the cumulative sum that turns the draws into point indices and
    the choice of the best candidate stay on x's device. Memory: O(N * candidates)."""
    n_trials = 2 + int(math.log(k))
    x_sq = (x * x).sum(1)  # [N]

    def sq_dists_to(idx: torch.Tensor) -> torch.Tensor:  # [len(idx), N], no [N, D] temporary
        return (x_sq - 2 * (x[idx] @ x.t()) + x_sq[idx, None]).clamp_min_(0)

    first = torch.randint(len(x), (1,), generator=gen).to(x.device)
    centres, d2 = [first], sq_dists_to(first)[0]
    for _ in range(1, k):
        # Inverse-CDF sampling: the first point whose cumulative D^2 exceeds u * total. With
        # right=True a point at distance 0 (already a centre) is never drawn; if every distance
        # is 0 (fewer distinct points than k) the clamp picks the last point, a duplicate that
        # Lloyd's empty-cluster re-seeding then handles.
        cum = d2.double().cumsum(0)
        u = torch.rand(n_trials, generator=gen, dtype=torch.float64).to(x.device)
        cand = torch.searchsorted(cum, u * cum[-1], right=True).clamp_max_(len(x) - 1)
        d2_cand = torch.minimum(d2, sq_dists_to(cand))  # [n_trials, N]
        best = d2_cand.sum(1, dtype=torch.float64).argmin()
        centres.append(cand[best, None])
        d2 = d2_cand[best]
    return x[torch.cat(centres)]  # advanced indexing: a copy


def kmeans(
    x: torch.Tensor,
    k: int,
    restarts: int = 10,
    iters: int = 300,
    tol: float = 1e-4,
    seed: int = 0,
) -> KMeansResult:
    """k-means of x [N, D] (any device): `restarts` greedy k-means++ seedings, Lloyd iterations until
    the centroids move less than tol * (mean per-dimension variance of x) in squared norm
    (scikit-learn's criterion) or `iters` is reached; returns the restart of lowest inertia.
    An empty cluster is re-seeded with the point farthest from its centroid."""
    if not 1 <= k <= len(x):
        raise ValueError(f"k must be in [1, {len(x)}], got {k}")
    if restarts < 1 or iters < 1:
        raise ValueError(f"restarts and iters must be >= 1, got {restarts}, {iters}")
    x = x.float()
    gen = torch.Generator().manual_seed(seed)
    thresh = tol * x.var(0).mean().item()
    best: KMeansResult | None = None
    for _ in range(restarts):
        c = _kmeans_pp(x, k, gen)
        n_iter = 0
        while n_iter < iters:
            n_iter += 1
            d2, assign = _sq_dists_min(x, c)
            counts = torch.bincount(assign, minlength=k)  # [k]
            sums = torch.zeros_like(c).index_add_(0, assign, x)  # [k, D]
            new = sums / counts.clamp_min(1)[:, None]
            empty = torch.nonzero(counts == 0).flatten()
            if len(empty):
                far = d2.topk(len(empty)).indices  # the worst-served points become centres
                new[empty] = x[far]
            shift = ((new - c) ** 2).sum().item()
            c = new
            if shift <= thresh and not len(empty):
                break
        d2, assign = _sq_dists_min(x, c)
        inertia = d2.sum().item()
        if best is None or inertia < best.inertia:
            best = KMeansResult(assign, c, inertia, n_iter)
    return best


# ------------------------------------------------------------------------ clustering metrics
def _as_labels(a: Labels) -> torch.Tensor:
    t = a if isinstance(a, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(a))
    t = t.flatten()
    return t.long().cpu()


def contingency(labels_a: Labels, labels_b: Labels) -> torch.Tensor:
    """Counts [Ka, Kb]: entry (i, j) is how many points have the i-th distinct value of a and the
    j-th distinct value of b (distinct values in sorted order)."""
    a, b = _as_labels(labels_a), _as_labels(labels_b)
    if a.shape != b.shape:
        raise ValueError(f"label arrays differ in length: {len(a)} vs {len(b)}")
    ua, ia = torch.unique(a, return_inverse=True)
    ub, ib = torch.unique(b, return_inverse=True)
    flat = torch.bincount(ia * len(ub) + ib, minlength=len(ua) * len(ub))
    return flat.view(len(ua), len(ub))


def _entropy(counts: torch.Tensor) -> float:
    p = counts[counts > 0].double() / counts.sum()
    return float(-(p * p.log()).sum())


def nmi(labels_true: Labels, labels_pred: Labels) -> float:
    """Normalised mutual information, MI / mean(H(true), H(pred)) in nats (scikit-learn's
    default, average_method="arithmetic"). 1 for identical partitions (up to renaming)."""
    c = contingency(labels_true, labels_pred).double()
    ka, kb = c.shape
    if ka == kb == 1 or ka == kb == 0:  # neither labelling splits the data: a perfect match
        return 1.0
    n = c.sum()
    pij = c / n
    pi, pj = pij.sum(1, keepdim=True), pij.sum(0, keepdim=True)  # marginals [Ka, 1], [1, Kb]
    nz = pij > 0
    mi = float((pij[nz] * (pij[nz] / (pi @ pj)[nz]).log()).sum().clamp_min(0))
    if mi == 0:
        return 0.0
    h = (_entropy(c.sum(1)) + _entropy(c.sum(0))) / 2
    return mi / max(h, np.finfo(np.float64).eps)


def ari(labels_true: Labels, labels_pred: Labels) -> float:
    """Adjusted Rand index (Hubert & Arabie 1985) from pair counts: (index - expected) /
    (max - expected). 1 for identical partitions, ~0 for independent ones (can be < 0).
    Exact integer pair counts (Python ints), so large N does not overflow."""
    c = contingency(labels_true, labels_pred)

    def pairs(t: torch.Tensor) -> int:  # sum over entries of C(n, 2)
        t = t.long()
        return int((t * (t - 1) // 2).sum())

    n = int(c.sum())
    index, sum_a, sum_b = pairs(c), pairs(c.sum(1)), pairs(c.sum(0))
    total = n * (n - 1) // 2
    expected = sum_a * sum_b / total if total else 0.0
    max_index = (sum_a + sum_b) / 2
    if max_index == expected:  # both trivial (one cluster each, or all singletons): scikit's 1
        return 1.0
    return (index - expected) / (max_index - expected)


def cluster_accuracy(labels_true: Labels, labels_pred: Labels) -> float:
    """Accuracy in [0, 1] under the best one-to-one map of clusters to classes (Hungarian
    algorithm on the contingency table); clusters left unmatched count as errors."""
    from scipy.optimize import linear_sum_assignment

    c = contingency(labels_pred, labels_true).numpy()  # [clusters, classes]
    rows, cols = linear_sum_assignment(c, maximize=True)
    return float(c[rows, cols].sum() / c.sum())


# --------------------------------------------------------------------------- few-label subsets
def balanced_subset(labels: Labels, fraction: float, seed: int = 0) -> torch.Tensor:
    """Indices (sorted, int64) of a class-balanced subset: from every class c with n_c images,
    floor(fraction * n_c) of them (at least 1), drawn at random with a fixed seed. Labels < 0
    (unlabelled) are never drawn. Same labels, fraction and seed -> the same indices."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    y = _as_labels(labels)
    gen = torch.Generator().manual_seed(seed)
    picked = []
    for c in torch.unique(y[y >= 0]).tolist():  # sorted classes: a fixed order of draws
        idx = torch.nonzero(y == c).flatten()
        # + 1e-9: 0.29 * 100 is 28.999999999999996 in floating point; floor should give 29
        n = max(1, math.floor(fraction * len(idx) + 1e-9))
        picked.append(idx[torch.randperm(len(idx), generator=gen)[:n]])
    return torch.cat(picked).sort().values if picked else torch.zeros(0, dtype=torch.long)


# -------------------------------------------------------------------------------- corruptions
CORRUPTIONS = ("gaussian_noise", "gaussian_blur", "contrast", "jpeg")
# Severity 1..5 parameters of make_cifar_c.py / make_imagenet_c.py (hendrycks/robustness):
# noise std (images in [0, 1]), blur sigma (pixels), contrast factor, JPEG quality.
SEVERITIES = {
    "cifar": {  # images up to 64 px (CIFAR-10-C)
        "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),
        "gaussian_blur": (0.4, 0.6, 0.7, 0.8, 1.0),
        "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),
        "jpeg": (80, 65, 58, 50, 40),
    },
    "imagenet": {  # larger images (ImageNet-C, 224 px)
        "gaussian_noise": (0.08, 0.12, 0.18, 0.26, 0.38),
        "gaussian_blur": (1.0, 2.0, 3.0, 4.0, 6.0),
        "contrast": (0.4, 0.3, 0.2, 0.1, 0.05),
        "jpeg": (25, 18, 15, 10, 7),
    },
}


def corruption_param(name: str, severity: int, image_size: int) -> float:
    """The parameter of corruption `name` at `severity` (1-5) for images of side image_size."""
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; choose from {CORRUPTIONS}")
    if severity not in (1, 2, 3, 4, 5):
        raise ValueError(f"severity must be 1..5, got {severity}")
    return SEVERITIES["cifar" if image_size <= 64 else "imagenet"][name][severity - 1]


def gaussian_noise(
    x: torch.Tensor, std: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """x [B, 3, H, W] in [0, 1] plus i.i.d. N(0, std^2) per pixel and channel, clipped."""
    dev = generator.device if generator is not None else x.device
    noise = torch.randn(x.shape, generator=generator, device=dev).to(x.device)
    return (x + std * noise).clamp(0, 1)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of x [B, C, H, W]: kernel radius round(4 sigma), edges extended
    (skimage.filters.gaussian's defaults, which CIFAR-10-C used: truncate 4, mode 'nearest')."""
    B, C, H, W = x.shape
    r = int(4 * sigma + 0.5)
    t = torch.arange(-r, r + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = (k / k.sum()).view(1, 1, 1, -1)  # [1, 1, 1, 2r+1]
    y = x.reshape(B * C, 1, H, W)
    # "replicate" needs the pad smaller than the image; a larger radius only adds edge pixels.
    y = F.pad(y, (r, r, 0, 0), mode="replicate") if r < W else _edge_pad(y, r, -1)
    y = F.conv2d(y, k)  # horizontal pass
    y = F.pad(y, (0, 0, r, r), mode="replicate") if r < H else _edge_pad(y, r, -2)
    y = F.conv2d(y, k.transpose(-1, -2))  # vertical pass
    return y.reshape(B, C, H, W).clamp(0, 1)


def _edge_pad(y: torch.Tensor, r: int, dim: int) -> torch.Tensor:
    first, last = y.narrow(dim, 0, 1), y.narrow(dim, y.shape[dim] - 1, 1)
    reps = [1] * y.dim()
    reps[dim] = r
    return torch.cat([first.repeat(reps), y, last.repeat(reps)], dim)


def contrast(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Pull every pixel towards its image's per-channel mean: (x - mean) * factor + mean."""
    mean = x.mean((-2, -1), keepdim=True)
    return ((x - mean) * factor + mean).clamp(0, 1)


def jpeg(images: torch.Tensor, quality: int) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> JPEG-encoded and decoded at `quality`, uint8 [B, 3, H, W] (CPU
    codec, libjpeg through torchvision; the result goes back to the input's device)."""
    with warnings.catch_warnings():  # torchvision 0.29 points to TorchCodec; this still works
        warnings.simplefilter("ignore", DeprecationWarning)
        from torchvision.io import decode_jpeg, encode_jpeg

        cpu = list(images.cpu().contiguous())
        out = decode_jpeg(encode_jpeg(cpu, quality=int(quality)))
    return torch.stack(out).to(images.device)


def corrupt(
    images: torch.Tensor,
    name: str,
    severity: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Corrupt a batch, keeping its layout, dtype and range: uint8 [B, H, W, 3] (the dataset
    cache's layout) -> uint8 [B, H, W, 3]; float [B, 3, H, W] in [0, 1] -> the same.
    `generator` draws the noise (pass one per corruption and severity for reproducibility)."""
    is_uint8 = images.dtype == torch.uint8
    x = images.permute(0, 3, 1, 2) if is_uint8 else images  # [B, 3, H, W]
    p = corruption_param(name, severity, x.shape[-1])
    if name == "jpeg":
        q = x if is_uint8 else (x * 255).round().clamp(0, 255).to(torch.uint8)
        y = jpeg(q, p)
        return y.permute(0, 2, 3, 1) if is_uint8 else y.to(images.dtype) / 255
    xf = x.float() / 255 if is_uint8 else x
    if name == "gaussian_noise":
        y = gaussian_noise(xf, p, generator)
    elif name == "gaussian_blur":
        y = gaussian_blur(xf, p)
    else:
        y = contrast(xf, p)
    if is_uint8:
        return (y * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    return y.to(images.dtype)
