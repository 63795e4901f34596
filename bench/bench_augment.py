"""Augmentation throughput: our batched per-sample pipeline vs torchvision per-image transforms
in DataLoader workers, measured side by side in one run.

  python bench/bench_augment.py --data ../shared/data/cifar10-jpeg.tar.gz [--device cuda]

Prints a Markdown table of views/s (one view = one augmented image) and the ratio to the
torchvision baseline. On a GPU the batched pipeline runs on the device, which is the point: a
few CPU workers cannot keep up with a GPU at CIFAR's image rates.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common.augment import AugConfig, BatchAugment  # noqa: E402
from common.data import load_split  # noqa: E402
from common_bench import torchvision_loader  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_batched(images, aug, device, batch, steps):
    gen = torch.Generator().manual_seed(0)
    imgs = images.to(device)
    n = len(imgs)
    for _ in range(3):  # warm-up
        aug(imgs[:batch], gen)
    sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        x = imgs[torch.randint(0, n, (batch,), device=device)]
        aug(x, gen), aug(x, gen)
    sync(device)
    return 2 * batch * steps / (time.perf_counter() - t)


def bench_torchvision(images, size, mean, std, batch, steps, workers, device):
    loader = torchvision_loader(images, size, mean, std, batch, workers)
    it = iter(loader)
    next(it)  # start the workers
    t = time.perf_counter()
    for _ in range(steps):
        v1, v2 = next(it)
        v1, v2 = v1.to(device, non_blocking=True), v2.to(device, non_blocking=True)
    sync(device)
    return 2 * batch * steps / (time.perf_counter() - t)


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data", default="./data")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    args = p.parse_args()
    device = torch.device(args.device)
    data = load_split(args.data, "train").subset(20000)
    size = data.image_size
    aug = BatchAugment(AugConfig(size), data.mean, data.std)
    rows = []
    base = None
    for w in args.workers:
        vps = bench_torchvision(
            data.images, size, data.mean, data.std, args.batch_size, args.steps, w, device
        )
        rows.append((f"torchvision v2 per-image, DataLoader workers={w}", vps))
        base = base or vps
    rows.append(
        (
            f"batched per-sample (ours) on {device.type}",
            bench_batched(data.images, aug, device, args.batch_size, args.steps),
        )
    )
    print(
        f"\nAugmentation throughput, {size}x{size}, batch {args.batch_size}, device {device}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads\n"
    )
    print("| pipeline | views/s | vs first row |")
    print("|---|---:|---:|")
    for name, vps in rows:
        print(f"| {name} | {vps:,.0f} | {vps / base:.2f}x |")


if __name__ == "__main__":
    main()
