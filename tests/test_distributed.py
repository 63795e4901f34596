"""Distributed correctness: one SimCLR step on 2 processes x N/2 images gives the parameter
gradients of 1 process x N images (DDP averaging, global BN, the gather's backward, the
positives' placement), on data that differs between ranks so a symmetric bug cannot hide."""

import pytest
import torch

from common import dist
from common.backbones import build_backbone
from dist_utils import run_distributed
from simclr import nt_xent_loss

N, SIZE = 8, 16


def _views():
    g = torch.Generator().manual_seed(123)
    # Rank-asymmetric: the second half of the batch has another scale and offset.
    v = torch.randn(2, N, 3, SIZE, SIZE, generator=g)
    v[:, N // 2 :] = v[:, N // 2 :] * 3 + 1
    return v[0], v[1]


def simclr_step_grads(rank, world, broken_gather=False):
    from simclr import SimCLR

    if broken_gather:  # the classic bug: gathered copies carry no gradient back to their owner

        def local_only(x):
            cols = dist.all_gather_cat(x.detach())
            n = len(x)
            return torch.cat([cols[: rank * n], x, cols[(rank + 1) * n :]])

        dist.all_gather_with_grad = local_only
    torch.manual_seed(0)
    model = SimCLR(build_backbone("resnet18", "cifar", 8), 16)
    model = dist.convert_global_bn(model, torch.device("cpu"))
    ddp = dist.wrap_ddp(model, torch.device("cpu"))
    v1, v2 = _views()
    lo, hi = rank * N // world, (rank + 1) * N // world
    z = ddp(torch.cat([v1[lo:hi], v2[lo:hi]]))
    z1, z2 = z.chunk(2)
    loss = nt_xent_loss(z1, z2, 0.5)
    loss.backward()
    return {
        "loss": dist.all_reduce_mean(loss.detach()).item(),
        "grads": {k: p.grad.clone() for k, p in model.named_parameters()},
        "running_mean": model.backbone.bn1.running_mean.clone(),
    }


def gather_grad(rank, world):
    x = torch.full((2, 3), float(rank + 1), requires_grad=True)
    y = dist.all_gather_with_grad(x)  # [4, 3]
    # Each rank weights every row differently, so the owner must receive the sum.
    w = torch.arange(12.0).view(4, 3) * (rank + 1)
    (y * w).sum().backward()
    return x.grad


def test_gather_backward_sums_gradients(tmp_path):
    g0, g1 = run_distributed(gather_grad, 2, tmp_path)
    w = torch.arange(12.0).view(4, 3)
    assert torch.equal(g0, (w * 1 + w * 2)[:2]) and torch.equal(g1, (w * 1 + w * 2)[2:])


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


@pytest.fixture(scope="module")
def single():
    return simclr_step_grads(rank=0, world=1)


def test_two_processes_match_one(tmp_path, single):
    r0, r1 = run_distributed(simclr_step_grads, 2, tmp_path)
    assert r0["loss"] == pytest.approx(single["loss"], rel=1e-5)
    for r in (r0, r1):  # DDP leaves identical averaged gradients on every rank
        for name, g in single["grads"].items():
            assert rel_err(r["grads"][name], g) < 1e-4, name  # fp32 reduction-order noise
        assert torch.allclose(r["running_mean"], single["running_mean"], atol=1e-6)


def test_the_check_catches_a_local_only_gather(tmp_path, single):
    r0, _ = run_distributed(simclr_step_grads, 2, tmp_path, broken_gather=True)
    assert r0["loss"] == pytest.approx(single["loss"], rel=1e-5)  # the loss looks right...
    err = max(rel_err(r0["grads"][k], g) for k, g in single["grads"].items())
    assert err > 1e-2  # ...but the gradients are wrong, and the test above would fail


def fake_download(rank, world, root):
    """load_split on a fresh default-like folder with torchvision's CIFAR10 replaced by a fake
    whose download takes a while and, like torchvision's, only verifies what is already there:
    one rank downloads, the other must wait for it (on the lock file) and download nothing."""
    import time
    from pathlib import Path

    import numpy as np
    import torchvision.datasets as tvd

    from common.data import DataError, load_split

    class FakeCIFAR10:
        classes = [str(i) for i in range(10)]

        def __init__(self, root, train=True, download=False):
            f = Path(root) / "cifar-10-batches-py" / "fake.npy"
            if download and "offline" in str(root):
                time.sleep(1.0)
                raise RuntimeError("Error downloading cifar-10-python.tar.gz")
            if download and not f.exists():
                Path(root).mkdir(parents=True, exist_ok=True)
                (Path(root) / f"downloaded-by-{rank}").touch()
                time.sleep(1.0)  # a rank that did not wait would find nothing
                f.parent.mkdir(parents=True, exist_ok=True)
                np.save(f, np.full((4, 8, 8, 3), 7, np.uint8))
            if not f.exists():
                raise RuntimeError("Dataset not found or corrupted.")
            self.data, self.targets = np.load(f), [0, 1, 2, 3]

    tvd.CIFAR10 = FakeCIFAR10
    try:  # a failed download: every rank stops with a DataError, none waits for ever
        load_split(root + "-offline", "train", download=True)
        failed = None
    except DataError as e:
        failed = str(e)
    train = load_split(root, "train", download=True)
    return train.images.shape, int(train.images[0, 0, 0, 0]), failed


def test_one_rank_downloads_the_others_wait(tmp_path):
    root = tmp_path / "data"
    out = run_distributed(fake_download, 2, tmp_path, root=str(root))
    assert [o[:2] for o in out] == [(torch.Size([4, 8, 8, 3]), 7)] * 2
    # the failed download: both ranks stop with its error, the waiter without trying again
    assert all("could not download" in o[2] for o in out), [o[2] for o in out]
    assert len(list(root.glob("downloaded-by-*"))) == 1
