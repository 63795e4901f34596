"""The batched augmentation draws the same per-sample distributions as torchvision's per-image
transforms, and with the same parameters computes the same images."""

import math

import pytest
import torch
from scipy import stats
from torchvision import transforms as T
from torchvision.transforms.v2 import functional as TF

from common.augment import AugConfig, BatchAugment, apply_params, sample_crop_boxes, sample_params

N = 4000
P_MIN = 1e-3  # a KS/binomial p-value below this means the distributions differ


def tv_boxes(n, h, w, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    img = torch.zeros(3, h, w)
    torch.manual_seed(1)
    return torch.tensor(
        [T.RandomResizedCrop.get_params(img, list(scale), list(ratio)) for _ in range(n)]
    )


@pytest.mark.parametrize("hw", [(32, 32), (24, 60)])
def test_crop_boxes_match_torchvision_distribution(hw):
    h, w = hw
    ours = sample_crop_boxes(N, h, w, (0.08, 1.0), (3 / 4, 4 / 3), torch.Generator().manual_seed(0))
    ref = tv_boxes(N, h, w)
    top, left, bh, bw = ours.T
    assert (
        (top >= 0).all() and (left >= 0).all() and (top + bh <= h).all() and (left + bw <= w).all()
    )
    assert (bh > 0).all() and (bw > 0).all()
    feats = {
        "area": lambda b: (b[:, 2] * b[:, 3]).float() / (h * w),
        "aspect": lambda b: b[:, 3].float() / b[:, 2],
        "top": lambda b: b[:, 0].float(),
        "left": lambda b: b[:, 1].float(),
    }
    for name, f in feats.items():
        p = stats.ks_2samp(f(ours).numpy(), f(ref).numpy()).pvalue
        assert p > P_MIN, f"crop {name} distribution differs from torchvision (p={p:.2g})"


def test_crop_boxes_detect_a_wrong_scale():
    """The KS check above has power: a crop scale of (0.2, 1) is told apart from (0.08, 1)."""
    ours = sample_crop_boxes(
        N, 32, 32, (0.2, 1.0), (3 / 4, 4 / 3), torch.Generator().manual_seed(0)
    )
    ref = tv_boxes(N, 32, 32)
    area = lambda b: (b[:, 2] * b[:, 3]).float().numpy()  # noqa: E731
    assert stats.ks_2samp(area(ours), area(ref)).pvalue < P_MIN


def test_jitter_and_probabilities_match_torchvision():
    cfg = AugConfig(32, jitter_strength=0.5, blur_p=0.5)
    p = sample_params(cfg, N, 32, 32, torch.Generator().manual_seed(0))
    b, c, s, h = cfg.jitter
    assert (b, c, s, h) == pytest.approx((0.4, 0.4, 0.4, 0.1))  # SimCLR's CIFAR strength
    torch.manual_seed(0)
    ref = [
        T.ColorJitter.get_params([1 - b, 1 + b], [1 - c, 1 + c], [1 - s, 1 + s], [-h, h])
        for _ in range(N)
    ]
    for k, name in enumerate(["brightness", "contrast", "saturation", "hue"], start=1):
        r = torch.tensor([float(x[k]) for x in ref])
        pv = stats.ks_2samp(p[name].numpy(), r.numpy()).pvalue
        assert pv > P_MIN, f"{name} factor distribution differs (p={pv:.2g})"
    # Order: each op is equally likely at each position, as with torch.randperm(4).
    counts = torch.stack([torch.bincount(p["order"][:, k], minlength=4) for k in range(4)])
    assert stats.chisquare(counts.flatten().numpy()).pvalue > P_MIN
    assert (p["order"].sort(1).values == torch.arange(4)).all()  # each row is a permutation
    for name, prob in [("flip", 0.5), ("jitter", 0.8), ("gray", 0.2), ("blur", 0.5)]:
        k = int(p[name].sum())
        assert stats.binomtest(k, N, prob).pvalue > P_MIN, f"{name}: {k}/{N} vs p={prob}"
    sig = p["sigma"].numpy()
    assert stats.kstest(sig, "uniform", args=(0.1, 1.9)).pvalue > P_MIN


def _tv_reference(img, p, i, cfg):
    """torchvision's functional ops on one image with the parameters we drew for it."""
    top, left, h, w = p["boxes"][i].tolist()
    x = TF.resized_crop(img, top, left, h, w, [cfg.size, cfg.size], antialias=False)
    if p["flip"][i]:
        x = TF.horizontal_flip(x)
    if p["jitter"][i]:
        for op in p["order"][i].tolist():
            if op == 0:
                x = TF.adjust_brightness(x, float(p["brightness"][i]))
            elif op == 1:
                x = TF.adjust_contrast(x, float(p["contrast"][i]))
            elif op == 2:
                x = TF.adjust_saturation(x, float(p["saturation"][i]))
            else:
                x = TF.adjust_hue(x, float(p["hue"][i]))
    if p["gray"][i]:
        x = TF.rgb_to_grayscale(x, num_output_channels=3)
    if cfg.blur_p and p["blur"][i]:
        k = int(0.1 * cfg.size) // 2 * 2 + 1
        s = float(p["sigma"][i])
        x = TF.gaussian_blur(x, [k, k], [s, s])
    return x


@pytest.mark.parametrize("size", [32, 64])
def test_crop_and_flip_match_torchvision_per_image(size):
    cfg = AugConfig(size, jitter_p=0.0, gray_p=0.0)
    imgs = torch.rand(48, 3, size, size)
    p = sample_params(cfg, len(imgs), size, size, torch.Generator().manual_seed(3))
    ours = apply_params(imgs, p, cfg)
    for i in range(len(imgs)):
        ref = _tv_reference(imgs[i], p, i, cfg)
        # roi_align reads neighbouring pixels where the sample point falls outside the crop;
        # compare the pixels whose sample point lies inside it (all but a thin ring).
        top, left, h, w = p["boxes"][i].tolist()
        ring = math.ceil(size / (2 * min(h, w)))
        inner = slice(ring, size - ring)
        diff = (ours[i] - ref)[:, inner, inner].abs().max().item()
        assert diff < 1e-5, f"image {i}: max diff {diff}"


@pytest.mark.parametrize("masked", [False, True])  # the CPU path and the CUDA (torch.where) one
@pytest.mark.parametrize("size,blur", [(32, 0.0), (64, 1.0)])
def test_jitter_gray_blur_match_torchvision_per_image(size, blur, masked):
    cfg = AugConfig(size, blur_p=blur, jitter_p=0.9, gray_p=0.3)
    imgs = torch.rand(48, 3, size, size)
    p = sample_params(cfg, len(imgs), size, size, torch.Generator().manual_seed(3))
    p["boxes"][:] = torch.tensor([0, 0, size, size])  # identity crop: isolate the colour ops
    ours = apply_params(imgs, p, cfg, masked=masked)
    for i in range(len(imgs)):
        diff = (ours[i] - _tv_reference(imgs[i], p, i, cfg)).abs().max().item()
        assert diff < 1e-4, f"image {i}: max diff {diff}"  # fp32 rounding of the HSV maths


def test_full_pipeline_shapes_and_determinism():
    aug = BatchAugment(AugConfig(24), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    u8 = torch.randint(0, 256, (16, 32, 32, 3), dtype=torch.uint8)
    a = aug(u8, torch.Generator().manual_seed(7))
    b = aug(u8, torch.Generator().manual_seed(7))
    c = aug(u8, torch.Generator().manual_seed(8))
    assert a.shape == (16, 3, 24, 24) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    # Two views of one image differ (different per-sample params), as SimCLR needs.
    g = torch.Generator().manual_seed(0)
    v1, v2 = aug(u8, g), aug(u8, g)
    assert (v1 - v2).abs().flatten(1).max(1).values.min() > 0


def test_masked_path_equals_the_gathering_path():
    """The sync-free path (every op on the whole batch, torch.where) gives the same images."""
    cfg = AugConfig(32, blur_p=0.5, jitter_p=0.8, gray_p=0.2)
    imgs = torch.rand(64, 3, 40, 40)
    p = sample_params(cfg, len(imgs), 40, 40, torch.Generator().manual_seed(5))
    a = apply_params(imgs, p, cfg, masked=False)
    b = apply_params(imgs, p, cfg, masked=True)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# ----------------------------------------- the paper's other augmentations (its Figure 4)
def _new_ops_cfg(size=32, **kw):
    return AugConfig(size, jitter_p=0.0, gray_p=0.0, flip_p=0.0, **kw)


def test_optional_ops_leave_the_default_random_stream_unchanged():
    """Turning on rotation, Sobel, noise and cutout draws after everything else: every default
    parameter (hence the default pipeline's images, and every earlier result) stays the same."""
    base = sample_params(AugConfig(32, blur_p=0.5), 64, 40, 40, torch.Generator().manual_seed(1))
    cfg = AugConfig(32, blur_p=0.5, rotate_p=0.5, sobel_p=0.5, noise_p=0.5, cutout_p=0.5)
    more = sample_params(cfg, 64, 40, 40, torch.Generator().manual_seed(1))
    assert set(more) - set(base) == {
        "rot_k", "sobel", "noise", "noise_sigma", "noise_field", "cutout", "cut_centre", "cut_side"
    }  # fmt: skip
    for k, v in base.items():
        assert torch.equal(v, more[k]), k


def test_rotation_matches_torchvision_and_draws_each_quarter_turn():
    cfg = _new_ops_cfg(rotate_p=0.75)
    p = sample_params(cfg, N, 32, 32, torch.Generator().manual_seed(2))
    k = p["rot_k"]
    assert abs((k > 0).float().mean().item() - 0.75) < 0.03
    counts = torch.bincount(k[k > 0], minlength=4)[1:].float()
    assert stats.chisquare(counts.numpy()).pvalue > P_MIN  # 90, 180, 270 equally likely
    imgs = torch.rand(24, 3, 32, 32)
    q = {key: v[:24] for key, v in p.items()}
    q["boxes"][:] = torch.tensor([0, 0, 32, 32])  # identity crop: isolate the rotation
    ours = apply_params(imgs, q, cfg)
    for i in range(24):
        ref = TF.rotate(imgs[i], 90.0 * int(q["rot_k"][i]))  # counter-clockwise, as ours
        torch.testing.assert_close(ours[i], ref, atol=1e-5, rtol=0)


def test_sobel_matches_scipy():
    from scipy import ndimage

    cfg = _new_ops_cfg(sobel_p=0.5)
    imgs = torch.rand(16, 3, 32, 32)
    p = sample_params(cfg, 16, 32, 32, torch.Generator().manual_seed(4))
    p["boxes"][:] = torch.tensor([0, 0, 32, 32])
    ours = apply_params(imgs, p, cfg)
    for i in range(16):
        if not p["sobel"][i]:
            torch.testing.assert_close(ours[i], imgs[i], atol=1e-5, rtol=0)
            continue
        gray = (0.2989 * imgs[i, 0] + 0.587 * imgs[i, 1] + 0.114 * imgs[i, 2]).double().numpy()
        mag = torch.from_numpy(
            (
                ndimage.sobel(gray, 0, mode="nearest") ** 2
                + ndimage.sobel(gray, 1, mode="nearest") ** 2
            )
            ** 0.5
        ).float()
        ref = (mag / mag.max()).expand(3, -1, -1)
        torch.testing.assert_close(ours[i], ref, atol=1e-5, rtol=0)


def test_noise_has_the_drawn_std_and_only_where_drawn():
    cfg = _new_ops_cfg(size=64, noise_p=0.5)
    imgs = torch.full((64, 3, 64, 64), 0.5)  # mid-grey: sigma <= 0.15 is (almost) never clipped
    p = sample_params(cfg, 64, 64, 64, torch.Generator().manual_seed(6))
    p["boxes"][:] = torch.tensor([0, 0, 64, 64])
    delta = apply_params(imgs, p, cfg) - imgs
    std = delta.flatten(1).std(1)
    on = p["noise"]
    assert on.any() and (~on).any()
    torch.testing.assert_close(std[on], p["noise_sigma"][on], rtol=0.05, atol=0)
    assert (std[~on] == 0).all()


def test_cutout_matches_torchvision_erase():
    """Each drawing image gets one square (clipped at the border) of the mean colour (0 after
    normalising), as torchvision's erase of the same box; the others are untouched."""
    size = 32
    cfg = _new_ops_cfg(cutout_p=0.5)
    aug = BatchAugment(cfg, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    u8 = torch.randint(0, 256, (64, size, size, 3), dtype=torch.uint8)
    no_cut = BatchAugment(_new_ops_cfg(), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    ours = aug(u8, torch.Generator().manual_seed(9))
    plain = no_cut(u8, torch.Generator().manual_seed(9))  # same crops (drawn first)
    p = sample_params(cfg, 64, size, size, torch.Generator().manual_seed(9))
    for i in range(64):
        ref = plain[i]
        if p["cutout"][i]:
            side = max(1, round(float(p["cut_side"][i]) * size))
            cy, cx = (math.floor(float(c) * size) for c in p["cut_centre"][i])
            top, left = cy - side // 2, cx - side // 2
            t, lf = max(top, 0), max(left, 0)
            h, w = min(top + side, size) - t, min(left + side, size) - lf
            ref = TF.erase(ref, t, lf, h, w, torch.tensor(0.0))
            assert h > 0 and w > 0
        torch.testing.assert_close(ours[i], ref, atol=0, rtol=0)
    assert (ours == 0).all(1).flatten(1).sum(1)[p["cutout"]].min() > 0
