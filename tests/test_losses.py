"""NT-Xent reference against an independent per-anchor implementation of the paper's formula."""

import math

import pytest
import torch

from common.losses import nt_xent_loss, nt_xent_reference, nt_xent_rows, simclr_layout


def naive_nt_xent(z1, z2, t):
    """SimCLR eq. (1), one anchor at a time, in Python floats: l(i, j) averaged over 2N anchors."""
    z = torch.cat([z1, z2]).double()
    n2 = len(z)
    n = n2 // 2
    sim = [[float(z[a] @ z[b] / (z[a].norm() * z[b].norm())) for b in range(n2)] for a in range(n2)]
    total = 0.0
    for a in range(n2):
        pos = (a + n) % n2
        denom = sum(math.exp(sim[a][k] / t) for k in range(n2) if k != a)
        total += -math.log(math.exp(sim[a][pos] / t) / denom)
    return total / n2


@pytest.mark.parametrize("n,d,t", [(1, 3, 0.5), (5, 7, 0.1), (8, 16, 1.0)])
def test_matches_naive_formula(n, d, t):
    g = torch.Generator().manual_seed(n)
    z1, z2 = torch.randn(n, d, generator=g) * 5, torch.randn(n, d, generator=g)
    ours = nt_xent_loss(z1.double(), z2.double(), t).item()
    assert ours == pytest.approx(naive_nt_xent(z1, z2, t), rel=1e-10)


def test_layout_and_rows_entry_point():
    pos, self_idx = simclr_layout(3, rank=1, device=torch.device("cpu"))
    assert self_idx.tolist() == [6, 7, 8, 9, 10, 11]
    assert pos.tolist() == [9, 10, 11, 6, 7, 8]
    # Rows as a slice of a larger column set: same per-row loss as the full computation.
    g = torch.Generator().manual_seed(0)
    cols = torch.randn(12, 5, generator=g, dtype=torch.float64)
    full = nt_xent_reference(
        cols,
        cols,
        *[torch.cat([simclr_layout(3, r, "cpu")[k] for r in (0, 1)]) for k in (0, 1)],
        0.3,
    )
    part = nt_xent_rows(cols[6:], cols, pos, self_idx, 0.3)
    assert torch.allclose(part, full[6:])


def test_self_similarity_is_excluded_not_penalised():
    # Identical views: the positive is the most similar candidate; the anchor itself must not
    # appear in the softmax (it would be exactly as similar as the positive).
    z = torch.randn(4, 8, dtype=torch.float64)
    loss = nt_xent_loss(z, z.clone(), 0.05)
    logits = (
        torch.nn.functional.normalize(z, dim=1) @ torch.nn.functional.normalize(z, dim=1).T / 0.05
    )
    assert loss.item() < math.log(2) + 1e-6  # with self included the loss would be >= log 2
    assert torch.isfinite(loss) and logits.shape == (4, 4)


def test_bad_input():
    with pytest.raises(ValueError, match="temperature"):
        nt_xent_loss(torch.randn(2, 3), torch.randn(2, 3), 0.0)
    with pytest.raises(ValueError, match=r"\[n, d\]"):
        nt_xent_loss(torch.randn(2, 3), torch.randn(3, 3), 0.5)


def test_impl_env(monkeypatch):
    monkeypatch.setenv("SSL_NT_XENT", "nonsense")
    with pytest.raises(ValueError, match="SSL_NT_XENT"):
        nt_xent_loss(torch.randn(2, 3), torch.randn(2, 3), 0.5)
    monkeypatch.setenv("SSL_NT_XENT", "ref")
    z1, z2 = torch.randn(4, 3), torch.randn(4, 3)
    assert torch.isfinite(nt_xent_loss(z1, z2, 0.5))
