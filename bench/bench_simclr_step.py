"""SimCLR train-step throughput (images/s; each image = 2 views), side by side in one run:
the full step (augment + forward + backward + LARS) fed by our batched on-device augmentation
vs. fed by torchvision per-image transforms in DataLoader workers.

  python bench/bench_simclr_step.py --data ../shared/data/cifar10-jpeg.tar.gz --width 16
  python bench/bench_simclr_step.py --data ./data --width 64 --batch-size 512   # GPU
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
from common.backbones import build_backbone  # noqa: E402
from common.data import load_split  # noqa: E402
from common.losses import nt_xent_loss  # noqa: E402
from common_bench import torchvision_loader  # noqa: E402
from simclr import LARS, SimCLR, param_groups  # noqa: E402


def make_step(model, opt, device):
    def step(views):
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            z = model(views)
        z1, z2 = z.float().chunk(2)
        loss = nt_xent_loss(z1, z2, 0.5)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    return step


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data", default="./data")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args()
    device = torch.device(args.device)
    data = load_split(args.data, "train").subset(20000)
    size = data.image_size
    model = SimCLR(
        build_backbone(args.backbone, "cifar" if size <= 64 else "imagenet", args.width), 128
    ).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    opt = LARS(param_groups(model), 0.1, 0.9, 1e-6, 1e-3)
    step = make_step(model, opt, device)
    B = args.batch_size
    results = []

    # ours: uint8 batch on the device, augmented there
    aug = BatchAugment(AugConfig(size), data.mean, data.std)
    imgs = data.images.to(device) if device.type == "cuda" else data.images
    gen = torch.Generator().manual_seed(0)

    def ours():
        x = imgs[torch.randint(0, len(imgs), (B,))].to(device)
        step(torch.cat([aug(x, gen), aug(x, gen)]))

    # baseline: torchvision per-image transforms in DataLoader workers
    it = iter(torchvision_loader(data.images, size, data.mean, data.std, B, args.workers))

    def torchvision_fed():
        v1, v2 = next(it)
        step(torch.cat([v1, v2]).to(device, non_blocking=True))

    for name, fn in [
        (f"torchvision per-image, {args.workers} workers", torchvision_fed),
        ("batched on-device aug (ours)", ours),
    ]:
        for _ in range(2):
            fn()  # warm-up (cudnn autotune, worker start-up)
        sync(device)
        t = time.perf_counter()
        for _ in range(args.steps):
            fn()
        sync(device)
        results.append((name, B * args.steps / (time.perf_counter() - t)))
    print(
        f"\nSimCLR train step, {args.backbone} width {args.width}, {size}x{size}, batch {B}, "
        f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads\n"
    )
    print("| data pipeline | images/s | vs first row |")
    print("|---|---:|---:|")
    for name, ips in results:
        print(f"| {name} | {ips:,.1f} | {ips / results[0][1]:.2f}x |")


if __name__ == "__main__":
    main()
