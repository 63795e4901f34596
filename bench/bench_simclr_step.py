"""SimCLR train-step throughput (images/s; each image = 2 views), side by side in one run:
the full step (augment + forward + backward + LARS) fed by our batched on-device augmentation
vs. fed by torchvision per-image transforms in DataLoader workers.

--compare-step instead times our step three ways, interleaved round by round (so that a
machine whose load changes affects every row alike; the median round is reported): the
per-parameter LARS this repo had before (tests/test_lars.py's reference), the multi-tensor
LARS (eager, as the cpu presets train), and the model under torch.compile (--compile).

  python bench/bench_simclr_step.py --data ../shared/data/cifar10-jpeg.tar.gz --width 16
  python bench/bench_simclr_step.py --data ../shared/data/cifar10-jpeg.tar.gz --width 16 \
      --batch-size 128 --compare-step
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
from common_bench import torchvision_loader  # noqa: E402
from simclr import LARS, SimCLR, nt_xent_loss, param_groups  # noqa: E402


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
    p.add_argument("--compare-step", action="store_true", help="old vs eager vs compiled step")
    p.add_argument("--rounds", type=int, default=5, help="--compare-step: interleaved rounds")
    p.add_argument(
        "--lars-reps", type=int, default=200, help="--compare-step: optimizer-only timings"
    )
    args = p.parse_args()
    if args.compare_step:
        return compare_step(args)
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


def compare_step(args) -> None:
    """Old per-parameter LARS (eager) vs multi-tensor LARS (eager) vs compiled, same data."""
    import statistics

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from test_lars import ReferenceLARS  # the per-parameter LARS this repo had before

    from common.train import compile_model

    device = torch.device(args.device)
    data = load_split(args.data, "train").subset(20000)
    size, B = data.image_size, args.batch_size
    aug = BatchAugment(AugConfig(size), data.mean, data.std)
    imgs = data.images.to(device) if device.type == "cuda" else data.images
    variants = {}
    for name, opt_cls, compiled in [
        ("eager, per-parameter LARS (before)", ReferenceLARS, False),
        ("eager, multi-tensor LARS (now, --no-compile)", LARS, False),
        ("torch.compile, multi-tensor LARS (--compile)", LARS, True),
    ]:
        torch.manual_seed(0)
        stem = "cifar" if size <= 64 else "imagenet"
        model = SimCLR(build_backbone(args.backbone, stem, args.width), 128).to(device)
        opt = opt_cls(param_groups(model), 0.1, 0.9, 1e-6, 1e-3)
        variants[name] = make_step(compile_model(model, compiled), opt, device)
    gen = torch.Generator(device=device).manual_seed(0)

    def run(step, n):
        for _ in range(n):
            x = imgs[torch.randint(0, len(imgs), (B,), device=imgs.device)].to(device)
            step(torch.cat([aug(x, gen), aug(x, gen)]))
        sync(device)

    t0 = time.perf_counter()
    for step in variants.values():
        run(step, 2)  # warm-up; compilation happens here
    print(f"warm-up (incl. compilation) {time.perf_counter() - t0:.0f} s", flush=True)
    times = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, step in variants.items():
            t = time.perf_counter()
            run(step, args.steps)
            times[name].append(time.perf_counter() - t)
    load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else "?"
    print(
        f"\nSimCLR train step, {args.backbone} width {args.width}, {size}x{size}, batch {B}, "
        f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"{args.rounds} interleaved rounds of {args.steps} steps, median; load average {load}\n"
    )
    ips = {k: B * args.steps / statistics.median(v) for k, v in times.items()}
    first = next(iter(ips.values()))
    print("| step | images/s | vs first row |")
    print("|---|---:|---:|")
    for name, v in ips.items():
        print(f"| {name} | {v:,.1f} | {v / first:.3f}x |")
    # The only CPU difference between the first two rows is the optimizer: time it alone,
    # alternating call by call (a short call samples the load far more often than a step).
    torch.manual_seed(0)
    model = SimCLR(build_backbone(args.backbone, "cifar", args.width), 128).to(device)
    for p_ in model.parameters():
        p_.grad = torch.randn_like(p_) * 1e-3
    opts = {
        "per-parameter LARS (before)": ReferenceLARS(param_groups(model), 0.1, 0.9, 1e-6, 1e-3),
        "multi-tensor LARS (now)": LARS(param_groups(model), 0.1, 0.9, 1e-6, 1e-3),
    }
    lars_t = {k: [] for k in opts}
    for _ in range(args.lars_reps):
        for k, opt in opts.items():
            t = time.perf_counter()
            opt.step()
            sync(device)
            lars_t[k].append(time.perf_counter() - t)
    step_s = B / ips[next(iter(ips))]
    print(
        f"\n| optimizer step alone ({args.lars_reps} alternating calls) | median ms | % of a step |"
    )
    print("|---|---:|---:|")
    for k, v in lars_t.items():
        ms = 1e3 * statistics.median(v)
        print(f"| {k} | {ms:.2f} | {100 * ms / 1e3 / step_s:.2f}% |")


if __name__ == "__main__":
    main()
