"""finetune.py end to end on CPU, on conftest.py's two checkpoints (a tiny SimCLR run and
an MAE-format ViT): the few-label subsets and their files, full fine-tuning's own result file,
the recipe by architecture (SimCLR's for ResNets, MAE's for ViTs), layer-wise lr decay groups,
two ranks agreeing, and the command line's exit codes (2: bad input, 3: a diverged run)."""

import json

import pytest
import torch
import torch.nn as nn

import evaluate
import finetune
from common.backbones import build_backbone
from common.cli import run_cli
from common.data import ImageSet
from conftest import run_main, run_script

pytestmark = pytest.mark.usefixtures("one_thread")


def ft(*argv):
    return run_main(finetune, *argv)


def test_finetune_few_labels_subsets_and_random_init(tiny_run, tmp_path):
    subsets = tmp_path / "subsets"
    common = ["--epochs", 1, "--batch-size", 50, "--limit-test", 200, "--subset-dir", subsets]
    res = ft(tiny_run, "--pcts", 0.2, 0.4, *common)
    assert res["optimizer"] == "sgd" and res["layer_decay"] is None  # ResNet: SimCLR's recipe
    for pct, per_class in (("0.2", 10), ("0.4", 20)):  # 0.2% / 0.4% of 5000 images a class
        assert 0 <= res[f"finetune_{pct}pct_top1"] <= 100
        run = res["runs"][pct]
        assert run["num_labels"] == 10 * per_class and run["steps"] == 10 * per_class // 50
        saved = json.loads((subsets / f"subset_{pct}pct_seed0.json").read_text())
        assert list(saved["per_class"].values()) == [per_class] * 10
        assert saved["split"] == "train" and len(saved["indices"]) == 10 * per_class
    # The baseline reads the same index lists (every method sees the same images).
    before = (subsets / "subset_0.2pct_seed0.json").stat().st_mtime_ns
    base = ft(tiny_run, "--pcts", 0.2, *common, "--random-init")
    assert base["random_init"] and (tiny_run / "eval_finetune_random_init.json").exists()
    assert (subsets / "subset_0.2pct_seed0.json").stat().st_mtime_ns == before
    assert base["runs"]["0.2"]["num_labels"] == 100
    # A list drawn from another training set is refused, not silently re-used.
    other = ImageSet(
        torch.zeros(10, 4, 4, 3, dtype=torch.uint8),
        torch.arange(10) % 2,
        ["a", "b"],
        (0.5,) * 3,
        (0.2,) * 3,
        "other",
    )
    with pytest.raises(ValueError, match="another training set"):
        finetune.few_label_subset(other, 0.2, 0, subsets)


def test_full_finetune_uses_every_label_and_its_own_file(tiny_run, tmp_path, monkeypatch):
    """--pcts 100: every training image, saved as eval_finetune_full.json beside (not over) the
    few-label results. The training itself is stubbed: this checks the subset and the file."""
    seen = {}

    def fake_train(model, subset, *a, **kw):
        seen["n"] = len(subset.labels)
        return {"steps": 0}

    monkeypatch.setattr(finetune, "train_classifier", fake_train)
    few = tiny_run / "eval_finetune.json"
    before = few.read_bytes() if few.exists() else None
    few.write_text('{"protocol": "finetune", "finetune_1pct_top1": 12.5}')
    flags = ["--epochs", 1, "--limit-test", 100, "--subset-dir", tmp_path]
    res = ft(tiny_run, "--pcts", 100, *flags)
    assert seen["n"] == 50_000 and res["runs"]["100"]["num_labels"] == 50_000
    saved = json.loads((tiny_run / "eval_finetune_full.json").read_text())
    assert saved["finetune_100pct_top1"] == res["finetune_100pct_top1"]
    assert json.loads(few.read_text())["finetune_1pct_top1"] == 12.5  # untouched
    few.write_bytes(before) if before is not None else few.unlink()  # as the other tests left it
    (tiny_run / "eval_finetune_full.json").unlink()


def test_finetune_vit_uses_the_mae_recipe(vit_run, tmp_path):
    flags = "--pcts 0.2 --epochs 2 --batch-size 50 --warmup-epochs 1 --limit-test 100"
    res = ft(vit_run, *flags.split(), "--subset-dir", tmp_path)
    assert res["method"] == "mae" and res["optimizer"] == "adamw"
    assert res["layer_decay"] == 0.75 and res["label_smoothing"] == 0.1
    assert res["runs"]["0.2"]["steps"] == 4 and 0 <= res["finetune_0.2pct_top1"] <= 100


class StandIn(nn.Module):
    """The shape of a ViT: embeddings, a `blocks` ModuleList, a final norm."""

    def __init__(self, depth=3, dim=8):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, 4, 4)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = nn.ModuleList(nn.Linear(dim, dim) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.feat_dim = dim


def scales(model, decay=0.5, wd=0.05):
    groups = finetune.finetune_param_groups(model, wd, decay)
    ids = {id(p): n for n, p in model.named_parameters()}
    return {ids[id(p)]: (g["lr_scale"], g["weight_decay"]) for g in groups for p in g["params"]}


def test_layer_wise_lr_decay_groups():
    s = scales(finetune.Classifier(StandIn(depth=3), 5))  # L = 3: head and norm at depth 4
    assert s["backbone.patch_embed.weight"] == (0.5**4, 0.05)
    assert s["backbone.cls_token"] == (0.5**4, 0.0)  # no decay on tokens, biases, norms
    assert s["backbone.blocks.0.weight"] == (0.5**3, 0.05)
    assert s["backbone.blocks.2.bias"] == (0.5, 0.0)
    assert s["backbone.norm.weight"] == (1.0, 0.0) and s["head.weight"] == (1.0, 0.05)
    resnet = scales(finetune.Classifier(build_backbone("resnet18", "cifar", 8), 5))
    assert {v[0] for v in resnet.values()} == {1.0}  # no blocks, no decay


def test_layer_depths_agree_with_the_vit():
    vit = pytest.importorskip("common.vit").VisionTransformer(dim=32, depth=3, heads=2)
    depths, n_blocks = finetune.layer_depths(vit)
    assert n_blocks == 3 and max(depths.values()) == 4
    if hasattr(vit, "layer_id"):
        assert depths == {n: vit.layer_id(n) for n, _ in vit.named_parameters()}


def _ranks_evaluate(rank, world, run, subsets):
    flags = "--pcts 0.2 --epochs 1 --batch-size 50 --limit-test 100 --no-save"
    ft_res = ft(run, *flags.split(), "--subset-dir", subsets)
    cl = run_main(evaluate, "cluster", run, "--limit-test", 100, "--restarts", 1, "--no-save")
    return ft_res["finetune_0.2pct_top1"], ft_res["runs"]["0.2"]["loss_last_epoch"], cl["nmi"]


def test_two_ranks_agree(tiny_run, tmp_path):
    """Under torchrun (here 2 CPU processes, gloo): DDP fine-tuning on sharded batches, global
    BN, gathered features; every rank ends with the same numbers, one subset file is written."""
    from dist_utils import run_distributed

    subsets = tmp_path / "subsets"
    r0, r1 = run_distributed(_ranks_evaluate, 2, tmp_path, run=str(tiny_run), subsets=subsets)
    assert r0 == r1 and 0 <= r0[0] <= 100
    assert [p.name for p in subsets.iterdir()] == ["subset_0.2pct_seed0.json"]


def test_cli_fails_cleanly_and_evaluate_finetune_names_finetune_py(tmp_path, capsys):
    bad = run_script("finetune.py", tmp_path / "nothing")
    assert bad.returncode == 2 and "error: no checkpoint" in bad.stderr
    assert "Traceback" not in bad.stderr
    # The old subcommand says where fine-tuning went, in one line, before anything else runs.
    with pytest.raises(SystemExit) as stop:
        evaluate.get_args_parser().parse_args(["finetune", str(tmp_path), "--pcts", "10"])
    out = capsys.readouterr()
    assert stop.value.code == 2 and out.out == "" and len(out.err.splitlines()) == 1
    assert out.err.startswith("error: fine-tuning moved to finetune.py")


def test_a_diverged_finetuning_exits_3(tiny_run, tmp_path, monkeypatch, capsys):
    """A non-finite loss stops fine-tuning with exit 3 (run_cli), as it stops training."""

    def diverge(*a, **kw):
        raise FloatingPointError("fine-tuning diverged (loss nan) at step 1")

    monkeypatch.setattr(finetune, "train_classifier", diverge)
    argv = [tiny_run, "--pcts", 0.2, "--limit-test", 100, "--subset-dir", tmp_path, "--no-save"]
    args = finetune.get_args_parser().parse_args([str(a) for a in argv])
    with pytest.raises(SystemExit) as stop:
        run_cli(finetune.main, args)
    assert stop.value.code == 3
    assert capsys.readouterr().err == "error: fine-tuning diverged (loss nan) at step 1\n"
