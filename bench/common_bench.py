"""Helpers shared by the benchmarks: the torchvision per-image baseline pipeline."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2 as T


def torchvision_simclr_transform(size: int, mean, std, strength: float = 0.5, blur: float = 0.0):
    """SimCLR's augmentation as torchvision per-image transforms (the usual implementation)."""
    s = strength
    ops = [
        T.RandomResizedCrop(size, scale=(0.08, 1.0), antialias=True),
        T.RandomHorizontalFlip(),
        T.RandomApply([T.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)], p=0.8),
        T.RandomGrayscale(p=0.2),
    ]
    if blur:
        ops.append(
            T.RandomApply([T.GaussianBlur(int(0.1 * size) // 2 * 2 + 1, (0.1, 2.0))], p=blur)
        )
    ops += [T.ToDtype(torch.float32, scale=True), T.Normalize(mean, std)]
    return T.Compose(ops)


class TwoViews(Dataset):
    """uint8 [N, H, W, 3] images -> (view1, view2) through a per-image transform."""

    def __init__(self, images: torch.Tensor, transform):
        self.images, self.transform = images, transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        x = self.images[i].permute(2, 0, 1)  # [3, H, W] uint8
        return self.transform(x), self.transform(x)


def torchvision_loader(images, size, mean, std, batch_size, workers, strength=0.5, blur=0.0):
    ds = TwoViews(images, torchvision_simclr_transform(size, mean, std, strength, blur))
    return DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        drop_last=True,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=workers > 0,
    )
