"""The knobs of SimCLR's design ablations (scripts/simclr_ablations.sh): --aug builds the named
composition (and the default is the pipeline every earlier result used), --proj-layers 0 puts
the loss on h, `linear_probe.py --head` probes z = g(h) of the checkpoint's own head, and
`results_table.py --seeds` reports mean ± std over a setting's seed folders."""

import json
import statistics

import pytest
import torch

import linear_probe
import results_table
import simclr
from common.augment import AugConfig
from common.backbones import build_backbone
from common.checkpoint import load_checkpoint
from common.cli import ConfigError, apply_preset
from conftest import quick_probe


def parsed(*argv):
    args = simclr.get_args_parser().parse_args(["--preset", "fast", *argv])
    args = apply_preset(args, simclr.PRESETS)
    simclr.check_simclr_args(args)
    args.crop_size, args.jitter_strength = 24, 0.5
    return args


def test_default_aug_is_the_pipeline_of_every_earlier_result():
    args = parsed()
    old = AugConfig(24, scale=(args.crop_scale_min, 1.0), jitter_strength=0.5, blur_p=0.0)
    assert simclr.aug_config(args, big=False) == old
    # ImageNet-sized images still get the paper's blur (p 0.5) by default
    assert simclr.aug_config(parsed(), big=True).blur_p == 0.5


@pytest.mark.parametrize(
    "aug,expect",
    [
        ("crop", dict(scale=(0.2, 1.0), flip_p=0.5, jitter_p=0.0, gray_p=0.0, blur_p=0.0)),
        ("color", dict(scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0, jitter_p=0.8, gray_p=0.2)),
        ("crop,color,blur", dict(jitter_p=0.8, blur_p=0.5, rotate_p=0.0)),
        ("crop,rotate", dict(rotate_p=0.5, jitter_p=0.0, sobel_p=0.0)),
        ("crop,cutout", dict(cutout_p=0.5, noise_p=0.0)),
        ("crop,noise", dict(noise_p=0.5, cutout_p=0.0)),
        ("crop,sobel", dict(sobel_p=0.5, rotate_p=0.0, gray_p=0.0)),
    ],
)
def test_aug_flag_builds_the_named_composition(aug, expect):
    cfg = simclr.aug_config(parsed("--aug", aug), big=False)
    for k, v in expect.items():
        assert getattr(cfg, k) == v, k


@pytest.mark.parametrize(
    "argv,msg",
    [
        (["--aug", "crop,colour"], "unknown colour"),
        (["--aug", ","], "unknown (empty)"),
        (["--aug", "crop,blur", "--blur", "0"], "--blur is 0"),
        (["--proj-layers", "-1"], "--proj-layers must be >= 0"),
    ],
)
def test_bad_ablation_flags_are_refused(argv, msg):
    with pytest.raises(ConfigError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        parsed(*argv)


def test_no_head_puts_the_loss_on_h():
    torch.manual_seed(0)
    model = simclr.SimCLR(build_backbone("resnet18", "cifar", 8), 128, proj_layers=0).eval()
    x = torch.randn(4, 3, 32, 32)
    assert torch.equal(model(x), model.backbone(x))
    assert sum(p.numel() for p in model.head.parameters()) == 0


def test_head_probe_sees_z_of_the_checkpoints_own_head(cifar_tar, tmp_path, monkeypatch):
    args = simclr.get_args_parser().parse_args(
        ["--preset", "tiny", "--epochs", "1", "--proj-layers", "3", "--proj-dim", "32"]
        + ["--data", cifar_tar, "--out", str(tmp_path), "--device", "cpu", "--limit-test", "500"]
    )
    simclr.main(apply_preset(args, simclr.PRESETS))
    state = load_checkpoint(tmp_path)
    # The features --head probes: the trained head on the trained trunk, rebuilt independently.
    ref = simclr.SimCLR(build_backbone("resnet18", "cifar", 8), 32, proj_layers=3)
    ref.backbone.load_state_dict(state["backbone"])
    ref.head.load_state_dict(state["head"])
    ours = linear_probe.with_head(build_backbone("resnet18", "cifar", 8), state, False)
    ours[0].load_state_dict(state["backbone"])  # (main loads the trunk before the head)
    x = torch.randn(6, 3, 32, 32)
    torch.testing.assert_close(ours.eval()(x), ref.eval()(x), rtol=0, atol=0)
    assert ours(x).shape == (6, 32)
    res = quick_probe(tmp_path, monkeypatch, "--head", epochs=1)
    assert res["head"] is True
    assert json.loads((tmp_path / "eval_linear_head.json").read_text())["head"] is True
    with pytest.raises(ValueError, match="without --layer"):
        quick_probe(tmp_path, monkeypatch, "--head", "--layer", "2", epochs=1)


def test_seeds_table_is_mean_and_std_over_seed_folders(tmp_path):
    values = {"base": 40.0, "base_s1": 43.0, "base_s2": 41.5, "other": 30.0}
    for name, v in values.items():
        (tmp_path / name).mkdir()
        rec = {"method": "simclr", "linear_top1": v, "knn_top1": v - 5, "epochs": 100}
        (tmp_path / name / "eval_linear.json").write_text(json.dumps(rec))
        # time-budgeted pre-training: each seed ends at its own epoch count (a range in the row)
        pre = {"result": {"method": "simclr", "epochs": 1.5 + v / 100}}
        (tmp_path / name / "log.jsonl").write_text(json.dumps(pre) + "\n")
    table = results_table.main(
        results_table.get_args_parser().parse_args(
            [str(tmp_path / n) for n in values] + ["--seeds"]
        )
    )
    rows = {line.split(" | ")[0].lstrip("| "): line for line in table.splitlines()[2:]}
    trio = [40.0, 43.0, 41.5]
    mean, std = statistics.mean(trio), statistics.stdev(trio)
    assert f"| 3 | {mean:.1f} ± {std:.1f} | {mean - 5:.1f} ± {std:.1f} |" in rows[
        str(tmp_path / "base")
    ].replace(str(tmp_path), "")  # fmt: skip
    assert "| simclr | 1.9-1.93 | 3 |" in rows[str(tmp_path / "base")]
    assert "| simclr | 1.8 | 1 |" in rows[str(tmp_path / "other")]
    assert len(rows) == 2
    # Equal values (a config column, the parameter count) are shown once, not as "x ± 0".
    assert results_table.format_cell([128, 128], "{}") == "128"
    assert results_table.format_cell(["crop", "crop"], "{}") == "crop"


def test_mark_puts_a_note_in_the_table_itself(tmp_path):
    for name in ("old", "new"):
        (tmp_path / name).mkdir()
        rec = {"method": "simclr", "linear_top1": 40.0, "knn_top1": 35.0}
        (tmp_path / name / "eval_linear.json").write_text(json.dumps(rec))
    table = results_table.main(
        results_table.get_args_parser().parse_args(
            [str(tmp_path / "old"), str(tmp_path / "new"), "--mark", f"{tmp_path / 'old'}=stale"]
        )
    )
    lines = table.splitlines()[2:]
    assert "| simclr (stale) |" in lines[0] and "| simclr |" in lines[1]


def test_brief_table_is_setting_seeds_and_probe(tmp_path, monkeypatch):
    for name, v in {"b": 40.0, "b_s1": 42.0}.items():
        (tmp_path / name).mkdir()
        rec = {"method": "simclr", "linear_top1": v, "knn_top1": 30.0, "train_minutes": 2}
        (tmp_path / name / "eval_linear.json").write_text(json.dumps(rec))
        rand = {**rec, "linear_top1": 34.0, "random_init": True}
        (tmp_path / name / "eval_linear_random_init.json").write_text(json.dumps(rand))
    # (the setting comes from each checkpoint's config: faked here)
    monkeypatch.setattr(
        results_table, "run_config", lambda *a: {"protocol": "config", "batch_size": 256}
    )
    for name in ("b", "b_s1"):  # a result line, so that collect() asks for the config
        (tmp_path / name / "log.jsonl").write_text(
            json.dumps({"result": {"method": "simclr", "train_minutes": 2}}) + "\n"
        )
    paths = [str(tmp_path / "b"), str(tmp_path / "b_s1")]
    table = results_table.main(
        results_table.get_args_parser().parse_args(
            [*paths, "--seeds", "--brief", "--config", "batch_size"]
        )
    )
    assert table.splitlines()[0] == "| batch | seeds | linear | k-NN |"
    assert table.splitlines()[2] == "| 256 | 2 | 41.0 ± 1.4 | 30.0 |"
    assert table.splitlines()[3] == "| untrained | 2 | 34.0 | 30.0 |"
