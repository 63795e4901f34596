"""Python side of the fused NT-Xent op (C++/CUDA kernels in csrc/, built as `common._C`).

The extension registers two ops with the dispatcher (namespace `ssl_ops`):

    nt_xent_fwd(rows [R, d], cols [C, d], pos_idx [R], self_idx [R], T)
        -> loss [R], lse [R], inv_r [R], inv_c [C]        (fp32; fp64 for fp64 inputs)
    nt_xent_bwd(grad_loss [R], rows, cols, pos_idx, self_idx, lse, inv_r, inv_c, T)
        -> grad_rows [R, d], grad_cols [C, d]             (dtype of rows / cols)

This module adds their fake (meta) kernels and autograd, so that `nt_xent_fused` works in eager
mode, under torch.compile (fullgraph) and with torch.library.opcheck. Nothing of size R x C is
ever allocated: the forward keeps a running log-sum-exp per row and saves only lse and the
inverse norms; the backward recomputes the logit tiles. Semantics are those of
common.losses.nt_xent_reference; select the implementation with SSL_NT_XENT (see losses.py).
"""

from __future__ import annotations

import torch

_LOAD_ERROR: str | None = None
try:
    from common import _C  # noqa: F401  (loading the library registers torch.ops.ssl_ops.*)
except Exception as e:  # not built, or built against another torch
    _LOAD_ERROR = f"{type(e).__name__}: {e}"

_KEYS = {"cpu": "CPU", "cuda": "CUDA"}


def load_error() -> str:
    """Why the extension could not be loaded ("" when it was)."""
    return _LOAD_ERROR or ""


def available(device: torch.device | str) -> bool:
    """True when the extension is loaded and has kernels for this device type (a CPU-only build
    loads fine but has no CUDA kernels)."""
    if _LOAD_ERROR is not None:
        return False
    key = _KEYS.get(torch.device(device).type)
    if key is None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key("ssl_ops::nt_xent_fwd", key)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


if _LOAD_ERROR is None:

    @torch.library.register_fake("ssl_ops::nt_xent_fwd")
    def _fwd_fake(rows, cols, pos_idx, self_idx, temperature):
        torch._check(rows.dim() == 2 and cols.dim() == 2, lambda: "rows/cols must be 2-D")
        torch._check(rows.shape[1] == cols.shape[1], lambda: "rows and cols differ in d")
        torch._check(rows.dtype == cols.dtype, lambda: "rows and cols dtypes differ")
        torch._check(pos_idx.shape == (rows.shape[0],), lambda: "pos_idx must be [R]")
        torch._check(self_idx.shape == (rows.shape[0],), lambda: "self_idx must be [R]")
        acc = _acc_dtype(rows.dtype)
        r, c = rows.shape[0], cols.shape[0]
        return (
            rows.new_empty((r,), dtype=acc),
            rows.new_empty((r,), dtype=acc),
            rows.new_empty((r,), dtype=acc),
            cols.new_empty((c,), dtype=acc),
        )

    @torch.library.register_fake("ssl_ops::nt_xent_bwd")
    def _bwd_fake(grad_loss, rows, cols, pos_idx, self_idx, lse, inv_r, inv_c, temperature):
        torch._check(grad_loss.shape == (rows.shape[0],), lambda: "grad_loss must be [R]")
        return torch.empty_like(rows, memory_format=torch.contiguous_format), torch.empty_like(
            cols, memory_format=torch.contiguous_format
        )

    def _setup_context(ctx, inputs, output):
        rows, cols, pos_idx, self_idx, temperature = inputs
        _, lse, inv_r, inv_c = output
        ctx.save_for_backward(rows, cols, pos_idx, self_idx, lse, inv_r, inv_c)
        ctx.temperature = temperature
        ctx.mark_non_differentiable(lse, inv_r, inv_c)  # statistics for the backward only

    def _backward(ctx, grad_loss, _grad_lse, _grad_inv_r, _grad_inv_c):
        rows, cols, pos_idx, self_idx, lse, inv_r, inv_c = ctx.saved_tensors
        grad_rows, grad_cols = torch.ops.ssl_ops.nt_xent_bwd(
            grad_loss, rows, cols, pos_idx, self_idx, lse, inv_r, inv_c, ctx.temperature
        )
        need_rows, need_cols = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        return (
            grad_rows if need_rows else None,
            grad_cols if need_cols else None,
            None,
            None,
            None,
        )

    torch.library.register_autograd("ssl_ops::nt_xent_fwd", _backward, setup_context=_setup_context)


def nt_xent_fused(
    rows: torch.Tensor,
    cols: torch.Tensor,
    pos_idx: torch.Tensor,
    self_idx: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """Per-row NT-Xent [R] (fp32, fp64 for fp64 inputs) with the fused op; differentiable
    w.r.t. rows [R, d] and cols [C, d]. Same contract as common.losses.nt_xent_reference."""
    if _LOAD_ERROR is not None:
        raise RuntimeError(f"the fused NT-Xent op is not built: {_LOAD_ERROR}")
    if cols.dtype != rows.dtype:  # mixed inputs: compute in the wider dtype, as the reference
        common = torch.promote_types(rows.dtype, cols.dtype)
        rows, cols = rows.to(common), cols.to(common)
    pos_idx = pos_idx.to(device=rows.device, dtype=torch.long)
    self_idx = self_idx.to(device=rows.device, dtype=torch.long)
    loss, _, _, _ = torch.ops.ssl_ops.nt_xent_fwd(rows, cols, pos_idx, self_idx, float(temperature))
    return loss
