"""Write scikit-learn's handwritten digits as an ImageFolder: the repo's second transfer target.

The digits (UCI "Optical Recognition of Handwritten Digits": 1,797 greyscale 8x8 images of
0-9, 17 grey levels, white ink on black) ship inside scikit-learn, so they need no download:
a transfer target far from CIFAR-10's photographs (strokes, not objects) that any machine
with this repo's requirements has. Each image is scaled to 32x32 (bicubic) and stored as an
RGB PNG in OUT/{train,test}/<digit>/<index>.png; a third of every class (seeded, so the split
never changes) is the test split.

Run:
  python scripts/digits_folder.py runs/data/digits
  python evaluate.py transfer runs/simclr --data runs/data/digits
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits


def write_digits(out: Path, size: int = 32, test_frac: float = 1 / 3, seed: int = 0) -> dict:
    """-> {"train": n, "test": n}; writes nothing if OUT already holds the full set."""
    digits = load_digits()
    images = (digits.images * (255 / 16)).round().astype(np.uint8)  # [1797, 8, 8], 0..255
    rng = np.random.default_rng(seed)
    counts = {"train": 0, "test": 0}
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(digits.target == c))
        n_test = round(len(idx) * test_frac)
        for rank, i in enumerate(idx):
            split = "test" if rank < n_test else "train"
            path = out / split / str(c) / f"{i:04d}.png"
            counts[split] += 1
            if path.exists():
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            img = Image.fromarray(images[i]).resize((size, size), Image.Resampling.BICUBIC)
            img.convert("RGB").save(path)
    return counts


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("out", help="folder to write (an ImageFolder root)")
    p.add_argument("--size", type=int, default=32, help="image side in pixels")
    args = p.parse_args()
    print(write_digits(Path(args.out), args.size))
