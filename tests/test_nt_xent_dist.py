"""NT-Xent across two processes (gloo) equals NT-Xent in one process with all rows.

Each rank holds its own slice of the projections (rank-asymmetric: different scales and
contents), calls simclr.nt_xent_loss, which all-gathers the columns with
common.dist.all_gather_with_grad, and backpropagates its own mean loss. With the single-process
loss L = mean over all 2N anchors and rank r's loss L_r = mean over its 2n anchors:
    mean_r L_r == L
    grad_r(z) / world == dL/dz[slice r]
(the gather's backward sums every rank's gradient into the slice's owner, so grad_r is the
gradient of sum_r L_r; DDP's averaging then divides by world). Checked for SSL_NT_XENT=ref and,
when the extension is built, SSL_NT_XENT=ext; and for both gather paths of common.dist: the
tensor collectives (all_gather_into_tensor / reduce_scatter_tensor, what nccl runs) and the list
fallback (all_gather / all_reduce + slice) kept for backends that lack them.
"""

from __future__ import annotations

import os

import pytest
import torch

from common import nt_xent_op as op
from dist_utils import run_distributed
from simclr import nt_xent_loss

WORLD, N, D, T = 2, 6, 10, 0.2  # n = 6 images per rank, 12 local anchors, 24 columns
MODES = ("tensor", "list")  # gather paths of common.dist._AllGatherWithGrad


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    """z1, z2 [WORLD * N, D] (fp32); rank 1's slice is 7x larger and shifted: asymmetric."""
    g = torch.Generator().manual_seed(0)
    z1 = torch.randn(WORLD * N, D, generator=g)
    z2 = z1 + 0.3 * torch.randn(WORLD * N, D, generator=g)  # views of the same "images"
    z1[N:] = z1[N:] * 7 + 1
    z2[N:] = z2[N:] * 7 - 1
    return z1, z2


def _worker(rank: int, world: int, impls: list[str]) -> dict:
    """One rank (dist_utils.run_distributed: a gloo process group is up)."""
    from common import dist

    z1, z2 = _data()
    sl = slice(rank * N, (rank + 1) * N)
    results = {}
    for mode in MODES:
        dist._NO_TENSOR_COLLECTIVES.clear()
        if mode == "list":  # as if the backend lacked the tensor collectives
            dist._NO_TENSOR_COLLECTIVES.add(str(dist.dist.get_backend()))
        for impl in impls:
            os.environ["SSL_NT_XENT"] = impl
            a = z1[sl].clone().requires_grad_()
            b = z2[sl].clone().requires_grad_()
            loss = nt_xent_loss(a, b, T)
            loss.backward()
            results[impl, mode] = (loss.detach(), a.grad, b.grad)
        # gloo of the torch this runs on has both tensor collectives: no silent fallback
        results["fell_back", mode] = sorted(dist._NO_TENSOR_COLLECTIVES)
    return results


@pytest.fixture(scope="module")
def dist_results(tmp_path_factory) -> dict:
    impls = ["ref"] + (["ext"] if op.available("cpu") else [])
    out = tmp_path_factory.mktemp("ntx_dist")
    return dict(enumerate(run_distributed(_worker, WORLD, out, impls=impls)))


def _single_process(impl: str, monkeypatch) -> tuple[torch.Tensor, ...]:
    monkeypatch.setenv("SSL_NT_XENT", impl)
    z1, z2 = _data()
    a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    loss = nt_xent_loss(a, b, T)
    loss.backward()
    return loss.detach(), a.grad, b.grad


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl", ["ref", "ext"])
def test_two_ranks_equal_one_process(dist_results, impl, mode, monkeypatch):
    if impl == "ext" and not op.available("cpu"):
        pytest.skip(f"fused NT-Xent op not built: {op.load_error()}")
    loss, g1, g2 = _single_process(impl, monkeypatch)
    per_rank = [dist_results[r][impl, mode] for r in range(WORLD)]
    assert per_rank[0][0] != per_rank[1][0]  # the data really differs between ranks
    torch.testing.assert_close(torch.stack([p[0] for p in per_rank]).mean(), loss)
    for r, (_, a, b) in enumerate(per_rank):
        sl = slice(r * N, (r + 1) * N)
        torch.testing.assert_close(a / WORLD, g1[sl], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(b / WORLD, g2[sl], rtol=1e-5, atol=1e-7)


def test_ext_and_ref_agree_across_ranks(dist_results):
    if not op.available("cpu"):
        pytest.skip(f"fused NT-Xent op not built: {op.load_error()}")
    for r in range(WORLD):
        for x, y in zip(dist_results[r]["ext", "tensor"], dist_results[r]["ref", "tensor"]):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-7)


def test_tensor_collectives_are_used(dist_results):
    """The tensor path really ran the tensor collectives (no backend fallback recorded), and
    both paths give bit-identical results (a sum of two terms is exact in either order)."""
    for r in range(WORLD):
        assert dist_results[r]["fell_back", "tensor"] == []
        for x, y in zip(dist_results[r]["ref", "tensor"], dist_results[r]["ref", "list"]):
            assert torch.equal(x, y)
