"""simclr.py end to end on CPU: the tiny preset, resume, the linear probe's JSON, bad input,
and a short run whose k-NN accuracy beats the same backbone at random init."""

import json
import os
import subprocess
import sys

import pytest
import torch

import linear_probe
import simclr
from common.checkpoint import load_checkpoint
from common.train import ConfigError, apply_preset, check_args
from conftest import ROOT


def run_simclr(cifar_tar, out, *extra):
    args = simclr.get_args_parser().parse_args(
        ["--preset", "tiny", "--data", cifar_tar, "--out", str(out), "--device", "cpu"]
        + ["--limit-test", "2000", *extra]
    )
    return simclr.main(apply_preset(args, simclr.PRESETS))


def test_tiny_run_writes_checkpoint_and_log(cifar_tar, tmp_path):
    res = run_simclr(cifar_tar, tmp_path)
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert state["method"] == "simclr" and state["step"] == res["steps"] == 16
    assert state["config"]["width"] == 8 and state["config"]["image_size"] == 32
    assert {"backbone", "head", "optimizer", "scheduler", "rng", "epoch"} <= state.keys()
    lines = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    steps = [x for x in lines if "loss" in x]
    assert {"step", "epoch", "loss", "lr", "img_per_s", "eta_s"} <= steps[0].keys()
    assert steps[-1]["loss"] < steps[0]["loss"]  # it learns something even in 16 steps
    assert [x for x in lines if "knn_top1" in x][-1]["knn_top1"] == res["knn_top1"]
    assert lines[-1]["result"] == res


def test_resume_continues_exactly(cifar_tar, tmp_path):
    run_simclr(cifar_tar, tmp_path / "full")
    run_simclr(cifar_tar, tmp_path / "part", "--max-steps", "6")
    assert load_checkpoint(tmp_path / "part")["step"] == 6
    run_simclr(cifar_tar, tmp_path / "part", "--resume")
    a = load_checkpoint(tmp_path / "full")["backbone"]
    b = load_checkpoint(tmp_path / "part")["backbone"]
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_linear_probe_cli_prints_json(cifar_tar, tmp_path):
    run_simclr(cifar_tar, tmp_path)
    out = subprocess.run(
        [
            sys.executable,
            "linear_probe.py",
            str(tmp_path),
            "--limit-train",
            "2000",
            "--epochs",
            "5",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["method"] == "simclr" and not res["random_init"]
    assert 10 < res["linear_top1"] <= 100 and 10 < res["knn_top1"] <= 100  # above chance (10%)


@pytest.mark.parametrize(
    "argv,msg",
    [
        (["--data", "/definitely/missing"], "does not exist"),
        (["--bogus-flag"], "unrecognized arguments: --bogus-flag"),
        (["--batch-size", "0"], "--batch-size must be > 0"),
        (["--lr", "-1"], "--lr must be >= 0"),
        (["--temperature", "0"], "--temperature must be > 0"),
        (["--batch-size", "4096"], "larger than the training set"),
    ],
)
def test_bad_input_stops_with_one_clear_message(cifar_tar, tmp_path, argv, msg):
    cmd = [
        sys.executable,
        "simclr.py",
        "--preset",
        "tiny",
        "--data",
        cifar_tar,
        "--out",
        str(tmp_path),
    ]
    out = subprocess.run(cmd + argv, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert msg in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "checkpoint.pt").exists()


def test_unreadable_image_is_named(image_folder, tmp_path):
    (image_folder / "train" / "dog" / "bad.png").write_bytes(b"\x89PNG garbage")
    cmd = [
        sys.executable,
        "simclr.py",
        "--preset",
        "tiny",
        "--data",
        str(image_folder),
        "--out",
        str(tmp_path),
    ]
    out = subprocess.run(
        cmd,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "SSL_CACHE_DIR": str(tmp_path / "c")},
    )
    assert out.returncode == 2 and "bad.png" in out.stderr and "Traceback" not in out.stderr


def test_batch_not_divisible_by_world_size():
    args = apply_preset(
        simclr.get_args_parser().parse_args(["--preset", "tiny", "--batch-size", "100"]),
        simclr.PRESETS,
    )
    check_args(args, 4)  # 100 / 4 is fine
    with pytest.raises(ConfigError, match="not divisible by the world size 3"):
        check_args(args, 3)


def test_short_run_beats_random_init(cifar_tar, tmp_path):
    """A few minutes of SimCLR give clearly better k-NN features than the untrained network."""
    run_simclr(
        cifar_tar,
        tmp_path,
        "--epochs",
        "6",
        "--limit-train",
        "4096",
        "--width",
        "16",
        "--batch-size",
        "256",
        "--warmup-epochs",
        "1",
    )
    probe = ["--limit-train", "10000", "--epochs", "10", "--lrs", "0.1", "--wds", "0"]
    args = linear_probe.get_args_parser().parse_args([str(tmp_path), *probe])
    trained = linear_probe.main(args)
    rand = linear_probe.main(
        linear_probe.get_args_parser().parse_args([str(tmp_path), *probe, "--random-init"])
    )
    print("trained", trained, "random", rand)
    assert trained["knn_top1"] > rand["knn_top1"] + 5


def test_torchrun_two_processes(cifar_tar, tmp_path):
    """The script itself under torchrun (2 CPU ranks, gloo): DDP, sharded sampler, global BN,
    rank-0 logging and checkpointing, the distributed k-NN feature gather."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--standalone",
        "simclr.py",
        "--preset",
        "tiny",
        "--data",
        cifar_tar,
        "--out",
        str(tmp_path),
        "--device",
        "cpu",
        "--epochs",
        "1",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "world_size 2" in out.stdout
    assert out.stdout.count("k-NN top-1") == 1  # printed by rank 0 only
    state = load_checkpoint(tmp_path)
    assert state["step"] == 1024 // 128  # the global batch is split, not duplicated
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["steps"] == 8 and 10 < res["knn_top1"] < 100
