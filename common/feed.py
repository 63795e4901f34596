"""The training data feed: per-rank batches of uint8 images on the device, and the per-step
random generator the augmentations draw from.

Owns: how a step gets its images (the shuffle and shard of DistributedSampler, the copy to
the device) and its randomness (a pure function of seed, rank and step, so that a resumed run
draws exactly what an uninterrupted one would). What the images become is each script's.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DistributedSampler

from common import dist
from common.cli import SEED_MODULUS, ConfigError


def step_generator(
    seed: int, rank: int, step: int, device: torch.device | str | None = None
) -> torch.Generator:
    """Augmentation randomness as a pure function of (seed, rank, step): resumes reproduce it
    with no generator state to save, and no two ranks or steps share a stream. `device`: the
    generator's device (default CPU); a CUDA generator draws the parameters on the GPU, with
    no host work or copy per step (its seed is set on the host, no sync)."""
    mixed = (seed * 1_000_003 + rank) * 1_000_000_007 + step
    return torch.Generator(device=device or "cpu").manual_seed(mixed % SEED_MODULUS)


class BatchFeed:
    """Per-rank batches of uint8 images [b, H, W, 3] on the device, by epoch and step.

    Small datasets (CIFAR: 150 MB) move to the GPU once; indexing replaces a DataLoader. The
    shuffle is DistributedSampler's (seeded, `set_epoch`), so every rank sees a disjoint shard.
    """

    def __init__(self, images: torch.Tensor, global_batch: int, device: torch.device, seed: int):
        ws, rank = dist.get_world_size(), dist.get_rank()
        self.local_batch = global_batch // ws
        self.steps_per_epoch = len(images) // global_batch
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"--batch-size {global_batch} is larger than the training set ({len(images)})"
            )
        on_device = device.type == "cuda" and images.numel() < (4 << 30)
        self.images = images.to(device) if on_device else images
        self.pin = device.type == "cuda" and not on_device
        self.device = device
        self.sampler = DistributedSampler(
            range(len(images)), num_replicas=ws, rank=rank, shuffle=True, seed=seed, drop_last=True
        )

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[torch.Tensor]:
        self.sampler.set_epoch(epoch)
        order = torch.tensor(list(self.sampler))  # [len / world] this rank's shuffle (CPU)
        if self.images.is_cuda:  # one asynchronous copy per epoch, none per step
            order = order.pin_memory().to(self.images.device, non_blocking=True)
        for i in range(start_step, self.steps_per_epoch):
            idx = order[i * self.local_batch : (i + 1) * self.local_batch]
            x = self.images[idx]
            if self.pin:
                x = x.pin_memory()
            yield x.to(self.device, non_blocking=True)
