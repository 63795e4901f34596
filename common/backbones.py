"""ResNet backbones from torchvision, with the CIFAR stem and a width option.

- `stem="cifar"`: 3x3 conv, stride 1, no max-pool, for 32x32 inputs (SimCLR appendix B.9): the
  ImageNet stem (7x7 stride 2 + max-pool) would shrink a 32x32 image to 8x8 before layer1.
- `stem="imagenet"`: torchvision's stem, for 96 px and up.
- `width`: channels of the stem and layer1 (64 in the paper; 8-16 makes CPU tests fast). Every
  stage scales with it, so the feature dimension is 8 * width (ResNet-18) or 32 * width (-50).
- `in_chans`: 3 for RGB, 1 for colorization's L channel.

The classifier `fc` is replaced by Identity: the backbone returns pooled features [B, feat_dim].
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

ARCHS = {"resnet18": (BasicBlock, [2, 2, 2, 2]), "resnet50": (Bottleneck, [3, 4, 6, 3])}


class _ScaledResNet(ResNet):
    """torchvision's ResNet with every stage's width multiplied by width/64.

    torchvision hard-codes 64/128/256/512 planes; scaling inside `_make_layer` keeps all of its
    block code (and its state-dict names) while allowing narrow networks.
    """

    def __init__(self, block, layers, width: int, zero_init_residual: bool = False):
        self._width = width
        super().__init__(block, layers, zero_init_residual=zero_init_residual)

    def _make_layer(self, block, planes, blocks, stride=1, dilate=False):
        if planes == 64:  # first stage: the stem (rebuilt below) outputs `width` channels
            self.inplanes = self._width
        return super()._make_layer(block, planes * self._width // 64, blocks, stride, dilate)


def build_backbone(
    arch: str = "resnet18",
    stem: str = "cifar",
    width: int = 64,
    in_chans: int = 3,
    zero_init_residual: bool = False,
) -> nn.Module:
    """A ResNet trunk returning pooled features; `model.feat_dim` gives their dimension.
    zero_init_residual: the last BN of every residual block starts with weight 0, so that each
    block starts as the identity (Goyal et al. 2017; SimCLR's ResNet, `init_zero=True`)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown backbone {arch!r}; choose one of {sorted(ARCHS)}")
    if stem not in ("cifar", "imagenet"):
        raise ValueError(f"unknown stem {stem!r}; choose 'cifar' or 'imagenet'")
    if width < 4 or width % 4:
        raise ValueError(f"width must be a positive multiple of 4, got {width}")
    block, layers = ARCHS[arch]
    model = _ScaledResNet(block, layers, width, zero_init_residual)
    if stem == "cifar":
        model.conv1 = nn.Conv2d(in_chans, width, 3, 1, 1, bias=False)
        model.maxpool = nn.Identity()
    else:
        model.conv1 = nn.Conv2d(in_chans, width, 7, 2, 3, bias=False)
    model.bn1 = nn.BatchNorm2d(width)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    model.feat_dim = 8 * width * block.expansion  # 512 (ResNet-18) or 2048 (ResNet-50) at width 64
    model.fc = nn.Identity()
    return model


def stem_for(image_size: int) -> str:
    """The stem a given input size calls for: CIFAR's up to 64 px, ImageNet's above."""
    return "cifar" if image_size <= 64 else "imagenet"


def backbone_from_config(cfg: dict) -> nn.Module:
    """Rebuild the backbone a checkpoint was trained with, from its saved config
    (cfg["backbone"], and "width", "stem" or "image_size", "in_chans" for ResNets)."""
    if cfg["backbone"].startswith("vit"):
        from common.vit import vit_from_config  # MAE's encoder

        return vit_from_config(cfg)
    return build_backbone(
        cfg["backbone"],
        cfg.get("stem") or stem_for(cfg["image_size"]),
        cfg["width"],
        cfg.get("in_chans", 3),
    )


def feature_layers(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Pooled features after each of the 4 stages (for probing intermediate blocks)."""
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    out = []
    for stage in (model.layer1, model.layer2, model.layer3, model.layer4):
        x = stage(x)
        out.append(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))
    return out
