"""sRGB <-> CIE Lab in torch (batched, any device, differentiable), and colorization's input.

The conversion is the standard one (sRGB IEC 61966-2-1 with the D65 white point, 2-degree
observer, CIE 1976 L*a*b*), the same formulas as skimage.color.rgb2lab / lab2rgb, which
tests/test_color.py uses as the independent reference:
  sRGB [0, 1] --(inverse gamma)--> linear RGB --(3x3 matrix)--> XYZ --(/ white, cube root)--> Lab
L is in [0, 100]; a and b in about [-86, 98] and [-108, 95] for sRGB colours.

`lab_l_input` is the network input of colorize.py, (L - 50) / 50 in [-1, 1] (Zhang et al. feed
L centred at 50); linear_probe.py gets it through common.eval.input_transform ("lab_l").
"""

from __future__ import annotations

import torch

from common.augment import normalize, to_float

# sRGB primaries -> XYZ (D65), as in the sRGB specification and skimage; rows: X, Y, Z.
XYZ_FROM_RGB = (
    (0.412453, 0.357580, 0.180423),
    (0.212671, 0.715160, 0.072169),
    (0.019334, 0.119193, 0.950227),
)
WHITE_D65 = (0.95047, 1.0, 1.08883)  # XYZ of the reference white (Y = 1)
_EPS = 0.008856  # (6/29)^3: below it CIE's f(t) is linear, not a cube root
_KAPPA = 7.787  # slope of that linear part, 1 / (3 (6/29)^2)


def _matrix(m, x: torch.Tensor) -> torch.Tensor:
    """Apply a 3x3 matrix to the channel dim of [B, 3, H, W]."""
    w = torch.tensor(m, dtype=x.dtype, device=x.device)
    return torch.einsum("ij,bjhw->bihw", w, x)


def _f(t: torch.Tensor) -> torch.Tensor:
    # clamp_min keeps the cube root's gradient finite in the unused branch of the where
    return torch.where(t > _EPS, t.clamp_min(_EPS).pow(1 / 3), _KAPPA * t + 16 / 116)


def _f_inv(t: torch.Tensor) -> torch.Tensor:
    return torch.where(t > 0.2068966, t.pow(3), (t - 16 / 116) / _KAPPA)  # 0.2068966 = 6/29


def srgb_to_linear(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x > 0.04045, ((x.clamp_min(0.04045) + 0.055) / 1.055).pow(2.4), x / 12.92)


def linear_to_srgb(x: torch.Tensor) -> torch.Tensor:
    hi = 1.055 * x.clamp_min(0.0031308).pow(1 / 2.4) - 0.055
    return torch.where(x > 0.0031308, hi, 12.92 * x)


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] sRGB in [0, 1] -> [B, 3, H, W] Lab (L in [0, 100]), computed in float32."""
    x = srgb_to_linear(rgb.float())
    xyz = _matrix(XYZ_FROM_RGB, x)
    white = torch.tensor(WHITE_D65, device=x.device).view(1, 3, 1, 1)
    fx, fy, fz = _f(xyz / white).unbind(1)
    return torch.stack([116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)], 1)


def lab_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] Lab -> sRGB in [0, 1]. Out-of-gamut colours are clipped to [0, 1] per
    channel, and a negative Z to 0, as skimage does."""
    L, a, b = lab.float().unbind(1)
    fy = (L + 16) / 116
    f = torch.stack([fy + a / 500, fy, (fy - b / 200).clamp_min(0)], 1)
    white = torch.tensor(WHITE_D65, device=lab.device).view(1, 3, 1, 1)
    xyz = _f_inv(f) * white
    rgb_from_xyz = torch.linalg.inv(torch.tensor(XYZ_FROM_RGB, dtype=torch.float64))
    lin = _matrix(rgb_from_xyz.tolist(), xyz)
    return linear_to_srgb(lin).clamp(0, 1)


def rgb_to_l(rgb: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] sRGB in [0, 1] -> [B, 1, H, W] L in [0, 100]: rgb_to_lab's L, which
    depends on Y only (Y's white is 1), without computing X and Z."""
    lin = srgb_to_linear(rgb.float())
    y = _matrix(XYZ_FROM_RGB[1:2], lin)  # [B, 1, H, W]
    return 116 * _f(y) - 16


def lab_l_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B, H, W, 3] (the cache layout) or float [B, 3, H, W] in [0, 1] ->
    [B, 1, H, W] float, (L - 50) / 50: the lightness channel colorize.py's network sees."""
    return (rgb_to_l(to_float(images)) - 50) / 50


def project_green_magenta(x: torch.Tensor) -> torch.Tensor:
    """Context prediction's "projection" (Doersch et al. 2015) against chromatic aberration:
    remove each pixel's component along B = [-1, 2, -1] (green vs magenta) with
    A = I - B^T B / (B B^T). x: [m, 3, h, w] -> same shape."""
    b = torch.tensor([-1.0, 2.0, -1.0], device=x.device)
    a = torch.eye(3, device=x.device) - torch.outer(b, b) / b.dot(b)
    return torch.einsum("ij,mjhw->mihw", a, x)


def projected_input(images: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> green-magenta projected, then normalised with the training set's
    mean/std: what context.py's trunk sees (input "rgb_project" in its checkpoint config)."""
    return normalize(project_green_magenta(to_float(images)), mean, std)
