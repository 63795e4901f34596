import pytest
import torch
import torchvision

from common.backbones import backbone_from_config, build_backbone, feature_layers


@pytest.mark.parametrize("arch,mult", [("resnet18", 8), ("resnet50", 32)])
@pytest.mark.parametrize("width", [8, 16, 64])
def test_feature_dim_and_shapes(arch, mult, width):
    m = build_backbone(arch, "cifar", width)
    assert m.feat_dim == mult * width
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, mult * width)


def test_cifar_stem_keeps_resolution():
    m = build_backbone("resnet18", "cifar", 8)
    x = torch.randn(1, 3, 32, 32)
    stem = m.maxpool(m.relu(m.bn1(m.conv1(x))))
    assert stem.shape[-1] == 32 and m.conv1.kernel_size == (3, 3) and m.conv1.stride == (1, 1)
    imnet = build_backbone("resnet18", "imagenet", 8)
    assert imnet.maxpool(imnet.conv1(torch.randn(1, 3, 96, 96))).shape[-1] == 24


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_standard_width_is_torchvisions_network(arch):
    """At width 64 with the ImageNet stem, torchvision's pretrained weights load unchanged."""
    ours = build_backbone(arch, "imagenet", 64)
    ref = getattr(torchvision.models, arch)()
    sd = {k: v for k, v in ref.state_dict().items() if not k.startswith("fc.")}
    ours.load_state_dict(sd)  # raises on any name or shape mismatch
    ref.fc = torch.nn.Identity()
    ours.eval(), ref.eval()
    x = torch.randn(2, 3, 64, 64)
    assert torch.allclose(ours(x), ref(x), atol=1e-5)


def test_layers_and_config_rebuild():
    m = backbone_from_config({"backbone": "resnet18", "width": 8, "image_size": 32, "in_chans": 1})
    feats = feature_layers(m, torch.randn(2, 1, 32, 32))
    assert [f.shape[1] for f in feats] == [8, 16, 32, 64]
    with pytest.raises(ValueError, match="unknown backbone"):
        build_backbone("vgg", "cifar", 8)
