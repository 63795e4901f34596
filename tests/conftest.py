"""Shared fixtures: the CIFAR-10 tarball, a writable decode cache, tiny image folders."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

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


def quick_probe(run_dir, monkeypatch, *flags, epochs: int = 5) -> dict:
    """linear_probe.main on a run, on 2000 train and 1000 test images (for speed)."""
    import linear_probe

    load = linear_probe.load_split
    monkeypatch.setattr(
        linear_probe,
        "load_split",
        lambda data, split: load(data, split).subset(1000 if split == "test" else None, 0),
    )
    argv = [str(run_dir), "--limit-train", "2000", "--epochs", str(epochs), "--lrs", "0.1"]
    argv += ["--wds", "0", *flags]
    return linear_probe.main(linear_probe.get_args_parser().parse_args(argv))


def probe_vs_untrained(run_dir, monkeypatch, *flags, epochs: int = 5) -> tuple[dict, dict]:
    """quick_probe of a run's checkpoint and of the same architecture untrained (--random-init):
    the same layer, input (flags) and probe, for tests that must fail when nothing is learned.
    Batches of 128 (14 steps an epoch on the 1,800 images the classifier fits, not 1): with
    quick_probe's default 1024, 5 epochs are 5 SGD steps and the linear accuracy is noise."""
    import linear_probe

    load = linear_probe.load_split
    flags = ("--batch-size", "128", "--no-save", *flags)
    trained = quick_probe(run_dir, monkeypatch, *flags, epochs=epochs)
    monkeypatch.setattr(linear_probe, "load_split", load)  # quick_probe wraps it: not twice
    rand = quick_probe(run_dir, monkeypatch, *flags, "--random-init", epochs=epochs)
    print("probe", flags, "trained", _top1(trained), "untrained", _top1(rand))
    return trained, rand


def _top1(res: dict) -> tuple[float, float]:
    return round(res["linear_top1"], 1), round(res["knn_top1"], 1)
