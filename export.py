"""Export a run's backbone as a plain torchvision ResNet (or a timm ViT for MAE), with the
preprocessing it was trained with, so that another project can use it without this repo.

    python export.py runs/cpu_simclr --out simclr_backbone.pt     # any method's run or checkpoint

The file is a dict that `torch.load(path, weights_only=True)` reads (tensors and plain values):
  state_dict        the backbone's weights under torchvision's (ResNet) or timm's (ViT) names
  family, arch      "resnet" / "vit"; "resnet18", "resnet50" or a ViT size ("vit_nano", ...)
  width, stem, in_chans      ResNets: stem/layer1 channels (64 = torchvision's resnet18),
                    "cifar" (3x3 stride-1 conv, no max-pool) or "imagenet"; input channels
  vit               ViTs: timm.models.VisionTransformer keyword arguments
  feat_dim          size of the pooled features the model returns (its `fc` / head is Identity)
  mean, std, input_size, input      the preprocessing: RGB in [0, 1], minus mean, over std, at
                    input_size x input_size; "input" is "rgb" (else "lab_l": colorization's
                    L channel; "rgb_project": context's projected colours, see common/color.py)
  method, source, step              where it came from

`load_backbone(path)` turns the file back into a model and needs torch and torchvision only
(timm for a ViT, else this repo's common/vit.py): copy this file into your project. A ResNet is
an instance of `torchvision.models.ResNet` itself: at width 64 built by
`torchvision.models.resnet18()` (or resnet50) with the stem swapped, narrower widths by the same
class with every stage rebuilt by its own `_make_layer`. The repo's backbones keep torchvision's
and timm's parameter names, so the weights load with `strict=True`
(tests/test_export.py checks that the features equal the repo backbone's).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torchvision
from torchvision.models.resnet import BasicBlock, Bottleneck

FORMAT = "ssl-backbone-1"


# ------------------------------------------------------------ load (torch + torchvision only)
def torchvision_resnet(
    arch: str = "resnet18", width: int = 64, stem: str = "cifar", in_chans: int = 3
) -> torchvision.models.ResNet:
    """An untrained torchvision ResNet returning pooled features [B, 8 * width * expansion]."""
    model = getattr(torchvision.models, arch)()  # torchvision's class, names and block code
    if width != 64:  # narrower stages: the same class, rebuilt with its own _make_layer
        block = BasicBlock if arch == "resnet18" else Bottleneck
        model.inplanes = width
        for i, n in enumerate((2, 2, 2, 2) if arch == "resnet18" else (3, 4, 6, 3)):
            layer = model._make_layer(block, width * 2**i, n, stride=1 if i == 0 else 2)
            setattr(model, f"layer{i + 1}", layer)
    if stem == "cifar":  # 32 px inputs: 3x3 stride 1, no max-pool (SimCLR appendix B.9)
        model.conv1 = nn.Conv2d(in_chans, width, 3, 1, 1, bias=False)
        model.maxpool = nn.Identity()
    else:
        model.conv1 = nn.Conv2d(in_chans, width, 7, 2, 3, bias=False)
    model.bn1 = nn.BatchNorm2d(width)
    model.fc = nn.Identity()  # features, not ImageNet logits
    return model


def load_backbone(path: str | Path, use_timm: bool | None = None) -> tuple[nn.Module, dict]:
    """(model in eval mode, preprocessing dict) from an exported file. A ViT is timm's
    VisionTransformer when timm is installed (use_timm None) or asked for, else this repo's."""
    ex = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ex, dict) or ex.get("format") != FORMAT:
        raise ValueError(f"{path} is not a backbone written by export.py")
    if ex["family"] == "resnet":
        model = torchvision_resnet(ex["arch"], ex["width"], ex["stem"], ex["in_chans"])
    elif use_timm is not False and (use_timm or _has_timm()):
        import timm

        model = timm.models.VisionTransformer(**ex["vit"])
    else:  # the repo's ViT: the same blocks, its patch embedding not wrapped in a `.proj`
        from common.vit import VisionTransformer

        v = ex["vit"]
        model = VisionTransformer(
            v["img_size"], v["patch_size"], v["embed_dim"], v["depth"], v["num_heads"],
            "cls" if v["global_pool"] == "token" else "mean", v["in_chans"],
        )  # fmt: skip
        ex["state_dict"] = {_from_timm(k): t for k, t in ex["state_dict"].items()}
    model.load_state_dict(ex["state_dict"])
    pre = {k: ex[k] for k in ("mean", "std", "input_size", "input")}
    return model.eval(), pre


def _has_timm() -> bool:
    try:
        import timm  # noqa: F401
    except ImportError:
        return False
    return True


def _to_timm(name: str) -> str:  # timm wraps the patch embedding's conv in a PatchEmbed module
    return name.replace("patch_embed.", "patch_embed.proj.", 1)


def _from_timm(name: str) -> str:
    return name.replace("patch_embed.proj.", "patch_embed.", 1)


# ------------------------------------------------------------------- export (needs the repo)
def export_backbone(
    run: str | Path, out: str | Path | None = None, data: str | None = None
) -> dict:
    """The exported dict for a run folder or checkpoint (written to `out` when given). `data`:
    where the training data now is, for checkpoints from before the preprocessing was stored
    (the mean and std are then recomputed from it, as the probes do)."""
    from common.backbones import backbone_from_config
    from common.checkpoint import load_checkpoint, preprocess_of

    state = load_checkpoint(run)
    cfg = state["config"]
    backbone = backbone_from_config(cfg)
    backbone.load_state_dict(state["backbone"])  # the repo's own names: a check on its own
    pre = preprocess_of(state, data)
    ex = {"format": FORMAT, "method": state["method"], "source": str(run), "step": state["step"]}
    ex |= {"arch": cfg["backbone"], "feat_dim": int(backbone.feat_dim), **pre}
    sd = {k: v.detach().clone() for k, v in backbone.state_dict().items()}
    if cfg["backbone"].startswith("vit"):
        p = backbone.patch_size
        if pre["input_size"] % p:
            raise ValueError(f"input size {pre['input_size']} is not a multiple of patch {p}")
        # The sin-cos table of the grid the model will see (the repo's ViT computes it per
        # grid; timm's pos_embed is a fixed-size parameter).
        from common.vit import sincos_pos_embed

        sd["pos_embed"] = sincos_pos_embed(backbone.feat_dim, pre["input_size"] // p)[None]
        ex["family"], ex["state_dict"] = "vit", {_to_timm(k): v for k, v in sd.items()}
        ex["vit"] = {
            "img_size": pre["input_size"],
            "patch_size": p,
            "in_chans": backbone.patch_embed.in_channels,
            "embed_dim": backbone.feat_dim,
            "depth": len(backbone.blocks),
            "num_heads": backbone.blocks[0].attn.heads,
            "num_classes": 0,  # features
            "global_pool": "token" if backbone.pool == "cls" else "avg",
            "fc_norm": False,  # the final norm on every token, then the pool (as MAE's probe)
        }
    else:
        ex["family"], ex["state_dict"] = "resnet", sd
        ex |= {"width": backbone.conv1.out_channels, "in_chans": backbone.conv1.in_channels}
        ex["stem"] = "cifar" if backbone.conv1.kernel_size == (3, 3) else "imagenet"
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        torch.save(ex, out)
    return ex


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("run", help="run directory or checkpoint file (any method)")
    p.add_argument("--out", help="output file (default RUN/backbone.pt)")
    p.add_argument("--data", help="the training data, for checkpoints that predate stored stats")
    return p


def main(args: argparse.Namespace) -> dict:
    run = Path(args.run)
    out = Path(args.out) if args.out else (run if run.is_dir() else run.parent) / "backbone.pt"
    ex = export_backbone(args.run, out, args.data)
    kind = "timm VisionTransformer" if ex["family"] == "vit" else "torchvision ResNet"
    print(
        f"{out}: {ex['method']} {ex['arch']} as a {kind}, {ex['feat_dim']}-d features; "
        f"input {ex['input']} {ex['input_size']} px, mean {[round(m, 4) for m in ex['mean']]}, "
        f"std {[round(s, 4) for s in ex['std']]}",
        flush=True,
    )
    return ex


if __name__ == "__main__":
    try:
        main(get_args_parser().parse_args())
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
