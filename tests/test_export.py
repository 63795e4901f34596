"""export.py: a run's backbone as a plain torchvision ResNet / timm ViT with its preprocessing.

Each exported model is compared with the repo's own backbone (rebuilt from the checkpoint by
common.backbones.backbone_from_config, as linear_probe.py does) on the same images; the
stored mean/std with statistics computed here from the images themselves; and the README's
"use your backbone" snippet is cut out of README.md and run, so it cannot rot.
"""

import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

import export
import mae
import simclr
from common.backbones import backbone_from_config, build_backbone
from common.checkpoint import load_checkpoint
from common.cli import apply_preset
from conftest import ROOT, write_image

TOL = 1e-6


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A 32 px ImageFolder, 2 classes x 6 train / 2 test images (no CIFAR tarball needed)."""
    root = tmp_path_factory.mktemp("data") / "folder"
    for split, n in (("train", 6), ("test", 2)):
        for c, cls in enumerate(("cat", "dog")):
            for i in range(n):
                write_image(root / split / cls / f"{i}.png", (32, 32), seed=100 * c + i + 7 * n)
    return root


def _train(module, folder, out, *extra):
    argv = ["--preset", "tiny", "--data", str(folder), "--out", str(out), "--device", "cpu"]
    argv += ["--epochs", "1", "--batch-size", "4", *extra]
    module.main(apply_preset(module.get_args_parser().parse_args(argv), module.PRESETS))
    return out


@pytest.fixture(scope="module")
def resnet_run(folder, tmp_path_factory):
    return _train(simclr, folder, tmp_path_factory.mktemp("runs") / "simclr")


@pytest.fixture(scope="module")
def vit_run(folder, tmp_path_factory):
    return _train(mae, folder, tmp_path_factory.mktemp("runs") / "mae")


def _images(n=6, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g)


def _repo_backbone(run):
    state = load_checkpoint(run)
    model = backbone_from_config(state["config"])
    model.load_state_dict(state["backbone"])
    return model.eval()


def _pixel_stats(folder):
    """Channel mean/std of the train images, computed here from the PNGs (independently of
    common/data.py's cache)."""
    from PIL import Image

    x = np.stack([np.asarray(Image.open(f)) for f in sorted(folder.glob("train/*/*.png"))])
    x = x.astype(np.float64) / 255
    return x.mean((0, 1, 2)), x.std((0, 1, 2), ddof=1)


def test_checkpoint_stores_the_preprocessing(resnet_run, folder):
    pre = load_checkpoint(resnet_run)["preprocess"]
    mean, std = _pixel_stats(folder)
    assert np.allclose(pre["mean"], mean, atol=1e-5) and np.allclose(pre["std"], std, atol=1e-5)
    assert pre["input_size"] == 32 and pre["input"] == "rgb"


def test_resnet_export_is_torchvision_with_the_same_features(resnet_run, tmp_path):
    out = tmp_path / "b.pt"
    export.main(export.get_args_parser().parse_args([str(resnet_run), "--out", str(out)]))
    model, pre = export.load_backbone(out)
    assert type(model) is torchvision.models.ResNet  # the class itself, not the repo's subclass
    x = _images()
    with torch.no_grad():
        ours, theirs = _repo_backbone(resnet_run)(x), model(x)
    assert theirs.shape == (6, 64) and (ours - theirs).abs().max() <= TOL
    assert pre == {k: load_checkpoint(resnet_run)["preprocess"][k] for k in pre}


@pytest.mark.parametrize(
    "arch,width,stem",
    [("resnet18", 64, "cifar"), ("resnet18", 16, "imagenet"), ("resnet50", 8, "cifar")],
)
def test_torchvision_resnet_holds_any_repo_resnet(arch, width, stem):
    """Every width and stem the repo builds loads strictly into torchvision's class; at width
    64 the model is torchvision.models.resnet18() with only the stem and fc swapped."""
    torch.manual_seed(0)
    repo = build_backbone(arch, stem, width).eval()
    for m in repo.modules():  # non-trivial BN statistics, so eval mode is really compared
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    tv = export.torchvision_resnet(arch, width, stem).eval()
    tv.load_state_dict(repo.state_dict())  # strict: the same names and shapes
    x = _images(2, 64)
    with torch.no_grad():
        assert (repo(x) - tv(x)).abs().max() <= TOL
    if width == 64:
        ref = {k: v.shape for k, v in torchvision.models.resnet18().state_dict().items()}
        got = {k: v.shape for k, v in tv.state_dict().items()}
        assert set(ref) - set(got) == {"fc.weight", "fc.bias"} and set(got) <= set(ref)
        assert all(got[k] == ref[k] for k in got if k != "conv1.weight")


def test_vit_export_repo_vit_has_the_same_features(vit_run, tmp_path):
    ex = export.export_backbone(vit_run, tmp_path / "v.pt")
    assert ex["family"] == "vit" and "patch_embed.proj.weight" in ex["state_dict"]
    model, pre = export.load_backbone(tmp_path / "v.pt", use_timm=False)
    x = _images()
    with torch.no_grad():
        assert (_repo_backbone(vit_run)(x) - model(x)).abs().max() <= TOL
    assert pre["input_size"] == 32


def test_vit_export_loads_into_timm(vit_run, tmp_path):
    timm = pytest.importorskip("timm")
    export.export_backbone(vit_run, tmp_path / "v.pt")
    model, _ = export.load_backbone(tmp_path / "v.pt")
    assert isinstance(model, timm.models.VisionTransformer)
    x = _images()
    with torch.no_grad():
        assert (_repo_backbone(vit_run)(x) - model(x)).abs().max() <= TOL


def test_older_checkpoint_recomputes_the_preprocessing(resnet_run, folder, tmp_path):
    """A checkpoint from before the field: the stats come from the data, as the probes'."""
    state = load_checkpoint(resnet_run)
    stored = state.pop("preprocess")
    torch.save(state, tmp_path / "old.pt")
    ex = export.export_backbone(tmp_path / "old.pt", data=str(folder))
    assert {k: ex[k] for k in stored} == stored


def test_readme_snippet_runs(resnet_run, tmp_path, monkeypatch):
    """The README's "use your backbone" block, run as written on an exported tiny run."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- snippet: backbone -->\s*```python\n(.*?)```", text, re.S)
    assert block, "README.md lost its <!-- snippet: backbone --> python block"
    code = block[1]
    path = re.search(r'"(runs/[^"]+/backbone\.pt)"', code)[1]
    monkeypatch.chdir(tmp_path)  # the snippet's relative paths, in a scratch folder
    (tmp_path / path).parent.mkdir(parents=True)
    export.export_backbone(resnet_run, tmp_path / path)
    ns: dict = {}
    exec(compile(code, "README.md", "exec"), ns)
    feats = ns["features"]
    assert feats.shape[1] == 64 and torch.isfinite(feats).all()
    pre = load_checkpoint(resnet_run)["preprocess"]
    x = (ns["images"] - torch.tensor(pre["mean"]).view(1, 3, 1, 1)) / torch.tensor(pre["std"]).view(
        1, 3, 1, 1
    )
    with torch.no_grad():
        assert (_repo_backbone(resnet_run)(x) - feats).abs().max() <= TOL


def test_results_table_narrow_pairs_each_run_with_its_baseline(tmp_path):
    """results_table.py --narrow (the README's summary): a run's own random-init row, else the
    first one of the same backbone and width; deeper-layer and upsampled probes stay out."""
    import json

    import results_table

    def run(name, method, minutes, probes, width=16):
        d = tmp_path / name
        d.mkdir()
        (d / "log.jsonl").write_text(
            "not json\n" + json.dumps({"result": {"method": method, "train_minutes": minutes}})
        )
        for i, (ri, lin, knn, extra) in enumerate(probes):
            rec = {
                "checkpoint": str(d),
                "method": method,
                "random_init": ri,
                "backbone": "resnet18",
            }
            rec |= {"width": width, "linear_top1": lin, "knn_top1": knn, **extra}
            (d / f"eval_linear_{i}.json").write_text(json.dumps(rec))
        return str(d)

    a = run("a", "simclr", 8.04, [(False, 49.0, 44.4, {}), (True, 34.3, 29.0, {})])
    b = run("b", "rotnet", 6.3, [(False, 36.6, 32.9, {}), (False, 99.0, 99.0, {"layer": 2})])
    c = run("c", "context", 5.7, [(False, 29.2, 22.9, {}), (True, 32.8, 28.5, {})])
    d = run("d", "jigsaw", 5.9, [(False, 35.6, 30.6, {})], width=8)  # no baseline of width 8
    table = results_table.main(results_table.get_args_parser().parse_args([a, b, c, d, "--narrow"]))
    assert table.splitlines()[2:] == [
        "| simclr | 8.0 | 49.0 / 34.3 | 44.4 / 29.0 |",
        "| rotnet | 6.3 | 36.6 / 34.3 | 32.9 / 29.0 |",
        "| context | 5.7 | 29.2 / 32.8 | 22.9 / 28.5 |",
        "| jigsaw | 5.9 | 35.6 / - | 30.6 / - |",
    ]
    # Full fine-tuning (--pcts 100) adds a column, paired with the baseline the same way; the
    # few-label results (eval_finetune.json) stay out of it.
    for folder, ri, top1 in ((a, False, 60.1), (a, True, 52.3), (c, False, 55.0)):
        rec = {"protocol": "finetune", "method": "x", "random_init": ri}
        name = "eval_finetune_full" + ("_random_init" if ri else "")
        (Path(folder) / f"{name}.json").write_text(json.dumps(rec | {"finetune_100pct_top1": top1}))
    few = {"protocol": "finetune", "random_init": False, "finetune_10pct_top1": 1.0}
    (Path(b) / "eval_finetune.json").write_text(json.dumps(few))
    table = results_table.main(results_table.get_args_parser().parse_args([a, b, c, d, "--narrow"]))
    assert table.splitlines()[0].endswith("| fine-tune 100% (trained / untrained) |")
    assert table.splitlines()[2:] == [
        "| simclr | 8.0 | 49.0 / 34.3 | 44.4 / 29.0 | 60.1 / 52.3 |",
        "| rotnet | 6.3 | 36.6 / 34.3 | 32.9 / 29.0 | - / 52.3 |",
        "| context | 5.7 | 29.2 / 32.8 | 22.9 / 28.5 | 55.0 / - |",
        "| jigsaw | 5.9 | 35.6 / - | 30.6 / - | - / - |",
    ]
