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
from common.cli import apply_preset
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
        (["--lr", "-1"], "--lr must be in [0, inf)"),
        (["--temperature", "0"], "--temperature must be in (0, inf)"),
        (["--batch-size", "4096"], "larger than the training set"),
        (["--blur", "2"], "--blur must be in [0, 1]"),
    ],
)
def test_bad_input_stops_with_one_clear_message(cifar_tar, tmp_path, argv, msg):
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable,
        "simclr.py",
        "--preset",
        "tiny",
        "--data",
        cifar_tar,
        "--out",
        str(run_dir),
    ]
    out = subprocess.run(cmd + argv, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert msg in out.stderr and "Traceback" not in out.stderr
    # Nothing before the error: no run folder left behind, no config printed.
    assert not run_dir.exists() and out.stdout == ""


def test_official_lr_rules_zero_jitter_and_huge_seeds(cifar_tar, tmp_path):
    """sqrt scaling with the paper's base 0.075 when --lr is not given; --jitter-strength 0 is
    kept (not replaced by the default); a seed past 2^64 is reduced, not an overflow."""
    seed = 2**70 + 5
    res = run_simclr(
        cifar_tar, tmp_path, "--lr-scaling", "sqrt", "--jitter-strength", "0",
        "--seed", str(seed), "--max-steps", "1",
    )  # fmt: skip
    assert res["steps"] == 1
    state = load_checkpoint(tmp_path)
    cfg = state["config"]
    assert cfg["lr"] == 0.075 and cfg["jitter_strength"] == 0.0 and cfg["seed"] == seed % 2**63
    assert state["scheduler"]["peak_lr"] == pytest.approx(0.075 * 128**0.5)
    linear = simclr.get_args_parser().parse_args(["--preset", "tiny"])
    linear = apply_preset(linear, simclr.PRESETS)
    assert linear.lr is None and simclr.BASE_LR[linear.lr_scaling] == 1.0  # 1.0 x N/256


def test_one_host_sync_per_step(cifar_tar, tmp_path, monkeypatch):
    """Every training step, logging ones included, reads the device at most once (the
    non-finite check, the stop signal, the timed checkpoint and the logged loss share it)."""
    from common.train import TrainRun

    syncs = []
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        real = getattr(torch.Tensor, name)

        def counted(self, *a, _real=real, **k):
            syncs.append(1)
            return _real(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    per_step = []
    real_step_done = TrainRun.step_done

    def step_done(self, loss, **metrics):
        real_step_done(self, loss, **metrics)
        per_step.append(len(syncs))
        syncs.clear()

    monkeypatch.setattr(TrainRun, "step_done", step_done)
    run_simclr(cifar_tar, tmp_path, "--log-every", "1", "--max-steps", "4", "--epochs", "1")
    assert len(per_step) == 4
    assert per_step[1:] == [1, 1, 1]  # (the first step's count includes the set-up)


def test_stl10_like_data_with_unlabelled_images(tmp_path, monkeypatch):
    """STL-10's train split carries its unlabelled images (label -1): training uses them, the
    k-NN bank is drawn from the labelled ones, and the final checkpoint is written before the final evaluation."""
    from common.data import ImageSet

    g = torch.Generator().manual_seed(0)

    def fake(n, labelled):
        labels = torch.arange(n) % 10 if labelled else torch.full((n,), -1)
        images = torch.randint(0, 256, (n, 48, 48, 3), dtype=torch.uint8, generator=g)
        return ImageSet(images, labels.long(), [str(c) for c in range(10)], (0.5,) * 3,
                        (0.25,) * 3, "stl10")  # fmt: skip

    def load_split(path, split, include_unlabeled=False, **kw):
        if split == "test":
            return fake(100, True)
        train = fake(200, True)
        if include_unlabeled:  # STL-10: labelled train images, then the unlabelled ones
            extra = fake(312, False)
            train.images = torch.cat([train.images, extra.images])
            train.labels = torch.cat([train.labels, extra.labels])
        return train

    monkeypatch.setattr(simclr, "load_split", load_split)
    saved_before_eval = []
    real_knn = simclr.knn_top1

    def knn_top1(model, bank, test, device, **kw):
        saved_before_eval.append((tmp_path / "checkpoint.pt").exists())
        assert (bank.labels >= 0).all() and len(bank) == 200  # every labelled image, no other
        return real_knn(model, bank, test, device, **kw)

    monkeypatch.setattr(simclr, "knn_top1", knn_top1)
    res = run_simclr("unused", tmp_path, "--knn-bank", "400", "--limit-train", "512")
    assert res["steps"] == 2 * 512 // 128  # all 512 images, labelled or not, were trained on
    assert saved_before_eval == [True] and 0 <= res["knn_top1"] <= 100


def test_a_copied_script_runs_without_the_op(cifar_tar, tmp_path):
    """Copying simclr.py and common/ into another project, without the fused op's Python file
    or its built extension: the tiny preset runs on the reference loss, with one warning."""
    import shutil

    shutil.copy(ROOT / "simclr.py", tmp_path / "simclr.py")
    shutil.copytree(
        ROOT / "common",
        tmp_path / "common",
        ignore=shutil.ignore_patterns("_C*.so", "nt_xent_op.py", "__pycache__"),
    )
    cmd = [sys.executable, "simclr.py", "--preset", "tiny", "--data", cifar_tar, "--device",
           "cpu", "--epochs", "1", "--limit-test", "500", "--knn-bank", "500"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SSL_NT_XENT")}
    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stderr.count("using the pure-PyTorch reference") == 1
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["steps"] == 8 and (tmp_path / "runs/simclr/checkpoint.pt").exists()


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


def test_short_run_beats_random_init(cifar_tar, tmp_path):
    """A minute of SimCLR (the `fast` preset's recipe) gives clearly better k-NN features than
    the untrained network."""
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
        *["--temperature", "0.2", "--crop-frac", "0.75", "--crop-scale-min", "0.2"],  # `fast`
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


def test_gpu_preset_is_the_official_recipe_and_flags_work_everywhere():
    """run.py's num_proj_layers=3 head and its ResNet's zero-initialised last BN per block in
    the gpu preset; --proj-layers / --zero-init-residual / --compile for every preset."""
    gpu = apply_preset(simclr.get_args_parser().parse_args(["--preset", "gpu"]), simclr.PRESETS)
    assert (gpu.proj_layers, gpu.zero_init_residual, gpu.compile) == (3, True, True)
    assert (gpu.batch_size, gpu.epochs, gpu.temperature, gpu.weight_decay) == (512, 1000, 0.5, 1e-4)
    argv = ["--preset", "tiny", "--proj-layers", "3", "--zero-init-residual", "--compile"]
    tiny = apply_preset(simclr.get_args_parser().parse_args(argv), simclr.PRESETS)
    assert (tiny.proj_layers, tiny.zero_init_residual, tiny.compile) == (3, True, True)
    argv = ["--preset", "gpu", "--no-zero-init-residual", "--no-compile"]
    off = apply_preset(simclr.get_args_parser().parse_args(argv), simclr.PRESETS)
    assert (off.zero_init_residual, off.compile) == (False, False)

    backbone = simclr.build_backbone("resnet18", "cifar", 8, zero_init_residual=True)
    model = simclr.SimCLR(backbone, 16, proj_layers=3)
    linears = [m for m in model.head if isinstance(m, torch.nn.Linear)]
    bns = [m for m in model.head if isinstance(m, torch.nn.BatchNorm1d)]
    assert [(m.in_features, m.out_features) for m in linears] == [(64, 64), (64, 64), (64, 16)]
    assert len(bns) == 3 and all(m.bias is None for m in linears)
    for block in (*backbone.layer1, *backbone.layer2, *backbone.layer3, *backbone.layer4):
        assert torch.count_nonzero(block.bn2.weight) == 0 and torch.all(block.bn1.weight == 1)
    x = torch.randn(4, 8, 8, 8)
    block = backbone.layer1[0].eval()
    assert torch.equal(block(x), torch.relu(x))  # each block starts as the identity (+ ReLU)


@pytest.mark.slow
def test_tiny_run_compiled_on_cpu(cifar_tar, tmp_path):
    """--compile on CPU (inductor's C++ backend): a tiny run trains, with no fallback."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="torch.compile")
        res = run_simclr(cifar_tar, tmp_path, "--compile", "--max-steps", "4")
    assert res["steps"] == 4 and res["stopped"] == "max_steps"
