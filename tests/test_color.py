"""common/color.py: sRGB <-> Lab against skimage (an independent implementation), the round
trip, known colours, gradients, and the L input that colorize.py and linear_probe.py share."""

import warnings

import numpy as np
import pytest
import torch

from common.color import lab_l_input, lab_to_rgb, rgb_to_l, rgb_to_lab

skcolor = pytest.importorskip("skimage.color")


def _rgb_samples() -> torch.Tensor:
    """[1, 3, 1, N]: every colour of a 16-level RGB cube (corners and edges included) and
    random ones, as float64 in [0, 1]."""
    v = torch.linspace(0, 1, 16, dtype=torch.float64)
    cube = torch.stack(torch.meshgrid(v, v, v, indexing="ij")).reshape(3, -1)
    rand = torch.rand(3, 4000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return torch.cat([cube, rand], 1).view(1, 3, 1, -1)


def _nhwc(x: torch.Tensor) -> np.ndarray:
    return x.permute(0, 2, 3, 1).numpy()


def test_rgb_to_lab_matches_skimage():
    x = _rgb_samples()
    ours = _nhwc(rgb_to_lab(x).double())
    ref = skcolor.rgb2lab(_nhwc(x))
    assert np.abs(ours - ref).max() < 2e-3  # float32 maths vs float64; L, a, b span ~100-200


def test_lab_to_rgb_matches_skimage_including_out_of_gamut():
    g = torch.Generator().manual_seed(1)
    lab = torch.stack(
        [
            torch.rand(2000, generator=g) * 100,
            torch.rand(2000, generator=g) * 220 - 110,  # the whole ab grid: many out of gamut
            torch.rand(2000, generator=g) * 220 - 110,
        ]
    ).view(1, 3, 1, -1)
    ours = _nhwc(lab_to_rgb(lab).double())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # skimage warns about the negative-Z colours it clips
        ref = skcolor.lab2rgb(_nhwc(lab.double()))
    assert np.abs(ours - ref).max() < 1e-4
    assert ours.min() >= 0 and ours.max() <= 1


def test_round_trip_is_exact_to_float32():
    x = _rgb_samples().float()
    back = lab_to_rgb(rgb_to_lab(x))
    assert (back - x).abs().max() < 1e-4  # about 0.03 of an 8-bit level
    # and the other way round, for in-gamut Lab (converted from RGB by skimage)
    lab = torch.from_numpy(skcolor.rgb2lab(_nhwc(x.double()))).permute(0, 3, 1, 2).float()
    assert (rgb_to_lab(lab_to_rgb(lab)) - lab).abs().max() < 2e-2


def test_known_colours():
    rgb = torch.tensor([[0, 0, 0], [1, 1, 1], [0.5, 0.5, 0.5], [1, 0, 0]], dtype=torch.float32)
    lab = rgb_to_lab(rgb.T.reshape(1, 3, 1, 4))[0, :, 0].T
    assert torch.allclose(lab[0], torch.zeros(3), atol=1e-4)  # black
    assert torch.allclose(lab[1], torch.tensor([100.0, 0, 0]), atol=1e-2)  # D65 white
    assert abs(lab[2, 1]) < 1e-2 and abs(lab[2, 2]) < 1e-2  # greys have a = b = 0
    assert torch.allclose(lab[3], torch.tensor([53.24, 80.09, 67.20]), atol=0.05)  # sRGB red


def test_batched_shapes_dtypes_and_finite_gradients():
    x = torch.rand(2, 3, 5, 7)
    x[0, :, 0, 0] = 0  # the linear and cube-root branches' edges
    x[0, :, 0, 1] = 1
    x.requires_grad_(True)
    lab = rgb_to_lab(x)
    assert lab.shape == (2, 3, 5, 7) and lab.dtype == torch.float32
    lab_to_rgb(lab).sum().backward()
    assert torch.isfinite(x.grad).all()
    assert rgb_to_lab(x.detach().to(torch.bfloat16)).dtype == torch.float32  # computed in fp32


def test_lab_l_input_uint8_and_float_agree_with_skimage_l():
    g = torch.Generator().manual_seed(2)
    u8 = torch.randint(0, 256, (3, 6, 5, 3), generator=g, dtype=torch.uint8)  # cache layout
    a = lab_l_input(u8)
    b = lab_l_input(u8.permute(0, 3, 1, 2).float() / 255)
    assert a.shape == (3, 1, 6, 5) and torch.equal(a, b)
    ref_l = skcolor.rgb2lab(u8.numpy().astype(np.float64) / 255)[..., 0]  # [3, 6, 5]
    assert np.abs(a[:, 0].double().numpy() - (ref_l - 50) / 50).max() < 1e-4
    assert a.min() >= -1 and a.max() <= 1
    # rgb_to_l is rgb_to_lab's L, not an approximation of it
    x = torch.rand(2, 3, 4, 4, generator=g)
    assert torch.allclose(rgb_to_l(x), rgb_to_lab(x)[:, :1], atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    x = torch.rand(2, 3, 8, 8)
    assert torch.allclose(rgb_to_lab(x.cuda()).cpu(), rgb_to_lab(x), atol=1e-3)
    assert torch.allclose(lab_l_input(x.cuda()).cpu(), lab_l_input(x), atol=1e-5)
