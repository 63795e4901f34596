"""Shared inputs and comparisons of the NT-Xent op's tests (tests/test_nt_xent_*.py).

Every comparison runs common.nt_xent.nt_xent_reference on fp64 copies of the *same* (already
rounded) inputs, with a random per-row weight as the incoming gradient, and checks the loss and
both gradients (rows and cols). Tolerances, as max |err| / max |ref| over the tensor:
  fp64: 1e-10; fp32: 2e-5 (loss: 1e-5 absolute); bf16/fp16: loss 1e-4 absolute (computed in
  fp32 from the bf16 values), gradients 1.5e-2 (they are returned in bf16: 2^-8 relative rounding,
  plus the bf16 G tiles of the CUDA tensor-core path).
The op's tests skip cleanly when the extension is not built (python setup.py build_ext
--inplace); the CUDA tests (all named *cuda*) skip without a GPU or without CUDA kernels in the
build.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from common import nt_xent_op as op
from common.nt_xent import nt_xent_reference

ROOT = Path(__file__).resolve().parents[1]

needs_ext = pytest.mark.skipif(
    not op.available("cpu"), reason=f"fused NT-Xent op not built: {op.load_error()}"
)
needs_cuda = pytest.mark.skipif(
    not (torch.cuda.is_available() and op.available("cuda")),
    reason="no GPU, or the extension was built without CUDA kernels",
)

TOL = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 2e-5),
    torch.bfloat16: (1e-4, 1.5e-2),
    torch.float16: (1e-4, 1.5e-2),
}


def make_case(
    R: int, C: int, d: int, scale: float = 1.0, seed: int = 0
) -> tuple[torch.Tensor, ...]:
    """rows [R, d], cols [C, d] with per-vector norms spread over ~[0.3, 3] * scale, random
    positives, self columns distinct from them, and a random per-row incoming gradient."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.randn(R, d, generator=g, dtype=torch.float64)
    rows = rows * (0.3 + 2.7 * torch.rand(R, 1, generator=g, dtype=torch.float64)) * scale
    cols = torch.randn(C, d, generator=g, dtype=torch.float64)
    cols = cols * (0.3 + 2.7 * torch.rand(C, 1, generator=g, dtype=torch.float64)) * scale
    pos = torch.randint(0, C, (R,), generator=g)
    self_idx = torch.randint(0, C, (R,), generator=g)
    self_idx = torch.where(self_idx == pos, (pos + 1) % C, self_idx)
    weight = torch.randn(R, generator=g, dtype=torch.float64)
    return rows, cols, pos, self_idx, weight


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def run_both(rows, cols, pos, self_idx, weight, T, dtype, device, **kw):
    """(loss, grad_rows, grad_cols) of the op in `dtype` on `device` (kw: path, chunk), and of
    the fp64 reference on the same rounded inputs."""
    r = rows.to(device, dtype).requires_grad_()
    c = cols.to(device, dtype).requires_grad_()
    p, s = pos.to(device), self_idx.to(device)
    loss = op.nt_xent_fused(r, c, p, s, T, **kw)
    assert loss.shape == (rows.shape[0],)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    (loss * weight.to(device, loss.dtype)).sum().backward()
    assert r.grad.dtype == dtype and c.grad.dtype == dtype
    r64 = r.detach().cpu().double().requires_grad_()
    c64 = c.detach().cpu().double().requires_grad_()
    ref = nt_xent_reference(r64, c64, pos, self_idx, T)
    (ref * weight).sum().backward()
    return (loss.detach().cpu(), r.grad.cpu(), c.grad.cpu()), (ref.detach(), r64.grad, c64.grad)


def check(rows, cols, pos, self_idx, weight, T, dtype, device, **kw):
    (loss, gr, gc), (ref, rr, rc) = run_both(
        rows, cols, pos, self_idx, weight, T, dtype, device, **kw
    )
    loss_tol, grad_tol = TOL[dtype]
    assert torch.isfinite(loss).all()
    assert (loss.double() - ref).abs().max().item() <= loss_tol * max(1.0, ref.abs().max().item())
    assert rel_err(gr, rr) <= grad_tol, f"grad rows rel err {rel_err(gr, rr):.2e}"
    assert rel_err(gc, rc) <= grad_tol, f"grad cols rel err {rel_err(gc, rc):.2e}"


_BF, _HF, _F32, _F64 = torch.bfloat16, torch.float16, torch.float32, torch.float64


def _small_inputs():
    rows, cols, pos, self_idx, _ = make_case(6, 10, 4, 1.0, seed=10)
    return rows.float(), cols.float(), pos, self_idx
