"""NT-Xent against independent implementations: the paper's per-anchor formula, and a line-by-line
transcription of the official code's loss (google-research/simclr, objective.py), whose scale the
training loss must have."""

import math

import pytest
import torch
import torch.nn.functional as F

from common.nt_xent import nt_xent_reference, nt_xent_rows
from simclr import nt_xent_loss, simclr_layout


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


def official_simclr_loss(z1, z2, t):
    """google-research/simclr `add_contrastive_loss` (TF1 objective.py) in torch, line by line:
    LARGE_NUM masking of self-similarity, labels over [logits_ab, logits_aa], and
    tf.losses.softmax_cross_entropy's mean over the batch for each direction; loss_a + loss_b."""
    large_num = 1e9
    h1, h2 = F.normalize(z1.double(), dim=1), F.normalize(z2.double(), dim=1)
    n = len(h1)
    labels = F.one_hot(torch.arange(n), 2 * n).double()
    masks = F.one_hot(torch.arange(n), n).double()
    logits_aa = h1 @ h1.T / t - masks * large_num
    logits_bb = h2 @ h2.T / t - masks * large_num
    logits_ab = h1 @ h2.T / t
    logits_ba = h2 @ h1.T / t

    def softmax_cross_entropy(onehot, logits):  # mean over the batch (SUM_BY_NONZERO_WEIGHTS)
        return -(onehot * F.log_softmax(logits, 1)).sum(1).mean()

    loss_a = softmax_cross_entropy(labels, torch.cat([logits_ab, logits_aa], 1))
    loss_b = softmax_cross_entropy(labels, torch.cat([logits_ba, logits_bb], 1))
    return (loss_a + loss_b).item()


@pytest.mark.parametrize("n,d,t", [(1, 3, 0.5), (5, 7, 0.1), (8, 16, 1.0)])
def test_matches_naive_formula(n, d, t):
    g = torch.Generator().manual_seed(n)
    z1, z2 = torch.randn(n, d, generator=g) * 5, torch.randn(n, d, generator=g)
    ours = nt_xent_loss(z1.double(), z2.double(), t).item()
    # The paper's L averages l(i, j) over the 2N anchors; the code (and we) sum the two
    # directions' means, which is twice that.
    assert ours == pytest.approx(2 * naive_nt_xent(z1, z2, t), rel=1e-10)


@pytest.mark.parametrize("impl", ["ref", "auto"])
@pytest.mark.parametrize("n,d,t", [(2, 4, 0.5), (6, 16, 0.1), (16, 8, 0.2)])
def test_scale_is_the_official_codes(n, d, t, impl, monkeypatch):
    monkeypatch.setenv("SSL_NT_XENT", impl)  # auto: the fused op when built
    g = torch.Generator().manual_seed(10 * n + d)
    z1, z2 = torch.randn(n, d, generator=g) * 3, torch.randn(n, d, generator=g)
    ours = nt_xent_loss(z1, z2, t).item()
    assert ours == pytest.approx(official_simclr_loss(z1, z2, t), rel=1e-5)


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
    # Two directions' means: with self included each would be >= log 2 and the loss >= 2 log 2.
    assert loss.item() < 2 * math.log(2) - 1e-3
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


def test_auto_falls_back_when_the_op_module_is_missing(monkeypatch):
    """A copied script without common/nt_xent_op.py (or its extension): `auto` uses the
    reference with one warning; `ext` still fails loudly."""
    import builtins
    import warnings

    import common.nt_xent as L

    real_import = builtins.__import__

    def no_op_module(name, globals=None, locals=None, fromlist=(), level=0):
        if name == "common" and fromlist and "nt_xent_op" in fromlist:
            raise ImportError("No module named 'common.nt_xent_op'")
        return real_import(name, globals, locals, fromlist, level)

    monkeypatch.setattr(builtins, "__import__", no_op_module)
    monkeypatch.setattr(L, "_FALLBACK_WARNED", False)
    monkeypatch.setenv("SSL_NT_XENT", "auto")
    z1, z2 = torch.randn(4, 8, dtype=torch.float64), torch.randn(4, 8, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        a = nt_xent_loss(z1, z2, 0.5)
        b = nt_xent_loss(z1, z2, 0.5)
    assert len([w for w in caught if "reference" in str(w.message)]) == 1  # warned once
    assert a.item() == pytest.approx(official_simclr_loss(z1, z2, 0.5), rel=1e-10) == b.item()
    monkeypatch.setenv("SSL_NT_XENT", "ext")
    with pytest.raises(ImportError):
        nt_xent_loss(z1, z2, 0.5)
