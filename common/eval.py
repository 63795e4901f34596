"""Feature extraction and the weighted k-NN classifier shared by training scripts and probes.

Unlabelled images (label < 0: STL-10's unlabeled split, which pre-training appends to the train
split) take part in no evaluation: `extract_features` skips them by default, so every protocol's
train, bank and test features hold labelled images only, and `knn_predict` drops bank entries
with label < 0 whatever its caller passes (a -1 would index out of bounds in the vote).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F

from common import dist
from common.augment import normalize
from common.backbones import feature_layers
from common.data import DataError, ImageSet


def input_transform(cfg: dict, mean, std) -> Callable[[torch.Tensor], torch.Tensor]:
    """uint8 images [B, H, W, 3] -> the backbone's input, as the method trained it.

    cfg["input"] (from the checkpoint's config): "rgb" (default; normalised with the training
    set's mean/std), "lab_l" (colorization: the L channel of Lab) or "rgb_project" (context
    prediction: green-magenta projected, then normalised); see common/color.py.
    """
    kind = cfg.get("input", "rgb")
    if kind == "rgb":
        return partial(normalize, mean=mean, std=std)
    if kind == "lab_l":
        from common.color import lab_l_input

        return lab_l_input
    if kind == "rgb_project":
        from common.color import projected_input

        return partial(projected_input, mean=mean, std=std)
    raise ValueError(f"unknown input kind {kind!r} in the checkpoint config")


def labelled(data: ImageSet) -> ImageSet:
    """`data` without its unlabelled images (label < 0), in the same order; `data` itself when
    every image has a label. Mean/std stay those of the full split (the inputs' normalisation
    must not change with the filter)."""
    keep = data.labels >= 0
    if bool(keep.all()):
        return data
    idx = torch.nonzero(keep).flatten()
    return ImageSet(
        data.images[idx], data.labels[idx], data.classes, data.mean, data.std, data.name
    )


@torch.no_grad()
def extract_features(
    model: torch.nn.Module,
    data: ImageSet,
    device: torch.device,
    batch_size: int = 512,
    prepare: Callable[[torch.Tensor], torch.Tensor] | None = None,
    layer: int | None = None,
    labelled_only: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen features [N, D] and labels [N] for a whole split, no augmentation.

    prepare: uint8 batch -> model input (default: normalise with the data's mean/std).
    layer: for ResNets, pool the output of stage 1-4 instead of the final features.
    labelled_only: skip images with label < 0 before embedding them (the default: no k-NN bank,
    classifier, clustering or test accuracy can use them, and STL-10's 100k unlabelled images
    would cost 20x the labelled ones' time); N counts the images kept.
    Each rank embeds a contiguous shard and the shards are all-gathered, so N GPUs take 1/N of
    the time and every rank ends with the same full tensors (in the data's order).
    """
    if labelled_only:
        data = labelled(data)  # the same labels on every rank: the same shards
    was_training = model.training
    model.eval()
    prepare = prepare or partial(normalize, mean=data.mean, std=data.std)
    ws, rank = dist.get_world_size(), dist.get_rank()
    lo, hi = rank * len(data) // ws, (rank + 1) * len(data) // ws
    feats = []
    for i in range(lo, hi, batch_size):
        x = prepare(data.images[i : min(i + batch_size, hi)].to(device))
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            f = model(x) if layer is None else feature_layers(model, x)[layer - 1]
        feats.append(f.float())
    local = torch.cat(feats) if feats else torch.zeros(0, 1, device=device)
    model.train(was_training)
    return dist.all_gather_cat(local), data.labels.to(device)


@torch.no_grad()
def knn_predict(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
    chunk: int = 1024,
) -> torch.Tensor:
    """Weighted k-NN (Wu et al. 2018, InstDisc): cosine similarity, top-k neighbours vote with
    weight exp(sim / T). Returns predicted labels [M].

    Bank entries with label < 0 (unlabelled) are dropped first: they cannot vote, and keeping
    them as neighbours would crowd labelled ones out of the top k. A bank without a labelled
    entry is an error."""
    if k < 1 or not temperature > 0:
        raise ValueError(f"k-NN needs k >= 1 and temperature > 0, got k={k}, T={temperature}")
    keep = train_labels >= 0
    if not bool(keep.all()):
        train_feats, train_labels = train_feats[keep], train_labels[keep]
    if len(train_labels) == 0:
        raise DataError("the k-NN bank has no labelled sample (every label is < 0)")
    bank = F.normalize(train_feats, dim=1)
    k = min(k, len(bank))
    preds = []
    for q in F.normalize(test_feats, dim=1).split(chunk):
        sim, idx = (q @ bank.t()).topk(k, dim=1)  # [m, k]
        votes = torch.zeros(len(q), num_classes, device=q.device)
        votes.scatter_add_(1, train_labels[idx], (sim / temperature).exp())
        preds.append(votes.argmax(1))
    return torch.cat(preds)


def knn_top1(
    model: torch.nn.Module,
    train: ImageSet,
    test: ImageSet,
    device: torch.device,
    k: int = 200,
    temperature: float = 0.1,
    prepare: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> float:
    """k-NN top-1 (%) on `test` with `train` as the memory bank (inputs prepared alike); both
    without their unlabelled images (extract_features skips them)."""
    prepare = prepare or partial(normalize, mean=train.mean, std=train.std)
    ftr, ytr = extract_features(model, train, device, prepare=prepare)
    fte, yte = extract_features(model, test, device, prepare=prepare)
    if len(yte) == 0:
        raise DataError(f"{test.name}: no labelled test image to score k-NN on")
    pred = knn_predict(ftr, ytr, fte, len(train.classes), k, temperature)
    return 100.0 * (pred == yte).float().mean().item()
