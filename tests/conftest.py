"""Shared fixtures: the CIFAR-10 tarball, a writable decode cache, tiny image folders, the two
checkpoints that evaluate.py's and finetune.py's tests work on, and how those tests run a script."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# Decoded datasets are cached once per checkout (git-ignored), not per test.
os.environ.setdefault("SSL_CACHE_DIR", str(ROOT / ".cache"))


@pytest.fixture(scope="session")
def cifar_tar() -> str:
    """CIFAR-10 as a tarball of JPEGs ($SSL_TEST_DATA, default ../shared/data/...)."""
    path = Path(os.environ.get("SSL_TEST_DATA", ROOT.parent / "shared/data/cifar10-jpeg.tar.gz"))
    if not path.exists():
        if os.environ.get("SSL_REQUIRE_DATA") == "1":
            pytest.fail(f"SSL_REQUIRE_DATA=1 but no CIFAR-10 tarball at {path}")
        pytest.skip(f"no CIFAR-10 tarball at {path} (set SSL_TEST_DATA)")
    return str(path)


@pytest.fixture(scope="session")
def nette_tar(cifar_tar) -> str:
    """Imagenette (224 px JPEGs) as a tarball: $SSL_TEST_NETTE, default next to CIFAR-10's."""
    default = Path(cifar_tar).parent / "imagenette2-224.tar.gz"
    path = Path(os.environ.get("SSL_TEST_NETTE", default))
    if not path.exists():
        if os.environ.get("SSL_REQUIRE_DATA") == "1":
            pytest.fail(f"SSL_REQUIRE_DATA=1 but no Imagenette tarball at {path}")
        pytest.skip(f"no Imagenette tarball at {path} (set SSL_TEST_NETTE)")
    return str(path)


def write_image(path: Path, size=(40, 30), mode="RGB", seed=0) -> None:
    """A random image file; mode may be RGB, L, RGBA, P or CMYK (saved as JPEG or PNG)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    img = Image.fromarray(arr).convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


@pytest.fixture
def image_folder(tmp_path) -> Path:
    """train/ and test/ with 2 classes, mixed modes, sizes and formats, and a stray text file."""
    root = tmp_path / "folder"
    modes = [("RGB", ".jpg"), ("L", ".png"), ("RGBA", ".png"), ("P", ".png"), ("CMYK", ".jpg")]
    for split, n in (("train", 5), ("test", 2)):
        for c, cls in enumerate(("cat", "dog")):
            for i in range(n):
                mode, ext = modes[i % len(modes)]
                size = (32, 32) if i % 2 == 0 else (48, 40)
                write_image(root / split / cls / f"{i}{ext}", size, mode, seed=100 * c + i)
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    return root


def quick_probe(
    run_dir, monkeypatch, *flags, epochs: int = 5, num_train: int = 2000, num_test: int = 1000
) -> dict:
    """linear_probe.main on a run, on num_train train and num_test test images (for speed)."""
    import linear_probe

    load = linear_probe.load_split
    monkeypatch.setattr(
        linear_probe,
        "load_split",
        lambda data, split, **kw: load(data, split, **kw).subset(
            num_test if split == "test" else None, 0
        ),
    )
    argv = [str(run_dir), "--limit-train", str(num_train), "--epochs", str(epochs), "--lrs", "0.1"]
    argv += ["--wds", "0", *flags]
    try:
        return linear_probe.main(linear_probe.get_args_parser().parse_args(argv))
    finally:
        monkeypatch.setattr(linear_probe, "load_split", load)  # not wrapped twice by a 2nd call


def probe_vs_untrained(
    run_dir, monkeypatch, *flags, epochs: int = 5, untrained_seeds=(0,), **sizes
) -> tuple[dict, dict]:
    """quick_probe of a run's checkpoint and of the same architecture untrained (--random-init):
    the same layer, input (flags) and probe, for tests that must fail when nothing is learned.
    Batches of 128 (14 steps an epoch on the 1,800 images the classifier fits, not 1): with
    quick_probe's default 1024, 5 epochs are 5 SGD steps and the linear accuracy is noise.
    With several untrained_seeds the baseline is their mean (random networks differ by seed:
    on Imagenette by up to 4 points of k-NN); sizes: quick_probe's num_train, num_test."""
    flags = ("--batch-size", "128", "--no-save", *flags)
    trained = quick_probe(run_dir, monkeypatch, *flags, epochs=epochs, **sizes)
    rands = [
        quick_probe(
            run_dir, monkeypatch, *flags, "--random-init", "--seed", str(s), epochs=epochs, **sizes
        )
        for s in untrained_seeds
    ]
    rand = dict(rands[0])
    for key in ("linear_top1", "knn_top1"):
        rand[key] = sum(r[key] for r in rands) / len(rands)
    each = [_top1(r) for r in rands]
    print("probe", flags, "trained", _top1(trained), "untrained", _top1(rand), "by seed", each)
    return trained, rand


def _top1(res: dict) -> tuple[float, float]:
    return round(res["linear_top1"], 1), round(res["knn_top1"], 1)


# ---------------------------------------- evaluate.py / finetune.py: two checkpoints, run_main
@pytest.fixture(scope="module")
def one_thread():
    """(test_evaluate.py, test_finetune.py) One intra-op thread: on a shared, loaded 2-core
    machine two OpenMP threads are ~10x slower than one (they spin waiting for each other); tiny models gain nothing from two."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny_run(cifar_tar, tmp_path_factory):
    """A SimCLR run of the tiny preset cut to 2 steps: a real checkpoint and log.jsonl."""
    import simclr
    from common.cli import apply_preset

    out = tmp_path_factory.mktemp("simclr_tiny")
    argv = ["--preset", "tiny", "--data", cifar_tar, "--out", str(out), "--device", "cpu"]
    argv += ["--epochs", "1", "--limit-train", "256", "--knn-bank", "256", "--limit-test", "200"]
    simclr.main(apply_preset(simclr.get_args_parser().parse_args(argv), simclr.PRESETS))
    return out


@pytest.fixture(scope="module")
def vit_run(cifar_tar, tmp_path_factory):
    """An MAE-format checkpoint with an untrained ViT-pico encoder (mae.py's own tiny run is
    tests/test_mae.py's): what fine-tuning needs to pick the MAE recipe."""
    from common.checkpoint import save_checkpoint

    vit = pytest.importorskip("common.vit")
    out = tmp_path_factory.mktemp("mae_vit")
    cfg = {"backbone": "vit_pico", "image_size": 32, "patch_size": 4, "pool": "cls"}
    cfg |= {"data": cifar_tar, "epochs": 0}
    save_checkpoint(
        out / "checkpoint.pt",
        method="mae",
        backbone=vit.vit_from_config(cfg),
        head=None,
        optimizer=None,
        scheduler=None,
        step=0,
        epoch=0,
        config=cfg,
    )
    return out


def run_main(script, *argv):
    """script.main (evaluate or finetune) on argv as the shell runs it: parsed by the script's
    parser, with sys.argv the script's own (the "command" a result records comes from it)."""
    argv = [str(a) for a in argv]
    with mock.patch.object(sys, "argv", [f"{script.__name__}.py", *argv]):
        (result,) = script.main(script.get_args_parser().parse_args(argv))
    return result


def run_script(*argv) -> subprocess.CompletedProcess:
    """`python ARGV...` from the repo root with one intra-op thread, as a user runs it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, *map(str, argv)]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)


def bookkeeping_run(args, out, steps_per_epoch: int):
    """A TrainRun on a 1-parameter model (no data, no network): the loop's bookkeeping only
    (test_schedule.py's time budget, test_train.py's checkpoint cadence)."""
    from common.train import TrainRun

    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)
    return TrainRun(
        args,
        out,
        "simclr",
        backbone=torch.nn.Linear(1, 1),
        head=None,
        optimizer=opt,
        steps_per_epoch=steps_per_epoch,
        peak_lr=1.0,
    )
