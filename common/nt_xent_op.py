"""Python side of the fused NT-Xent op (C++/CUDA kernels in csrc/, built as `common._C`).

The extension registers two ops with the dispatcher (namespace `ssl_ops`):

    nt_xent_fwd(rows [R, d], cols [C, d], pos_idx [R], self_idx [R], T)
        -> loss [R], lse [R], inv_r [R], inv_c [C]        (fp32; fp64 for fp64 inputs)
    nt_xent_bwd(grad_loss [R], rows, cols, pos_idx, self_idx, lse, inv_r, inv_c, T,
                need_rows=True, need_cols=True)
        -> grad_rows [R, d], grad_cols [C, d]             (dtype of rows / cols; [0, d] and the
                                                           pass skipped when not needed)

This module adds their fake (meta) kernels and autograd, so that `nt_xent_fused` works in eager
mode, under torch.compile (fullgraph) and with torch.library.opcheck. Nothing of size R x C is
ever allocated: the forward keeps a running log-sum-exp per row and saves only lse and the
inverse norms; the backward recomputes the logit tiles. Semantics are those of
common.losses.nt_xent_reference; select the implementation with SSL_NT_XENT (see losses.py).

`self_check(device, d)` compares the op with the fp64 reference on a small random batch, once per
device, embedding width and process (common.losses runs it before the op's first use): kernels
that have never run on a user's hardware must not silently train on a wrong gradient.
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
    def _bwd_fake(
        grad_loss,
        rows,
        cols,
        pos_idx,
        self_idx,
        lse,
        inv_r,
        inv_c,
        temperature,
        need_rows=True,
        need_cols=True,
    ):
        torch._check(grad_loss.shape == (rows.shape[0],), lambda: "grad_loss must be [R]")
        d = rows.shape[1]
        return (
            rows.new_empty((rows.shape[0] if need_rows else 0, d)),
            cols.new_empty((cols.shape[0] if need_cols else 0, d)),
        )

    def _setup_context(ctx, inputs, output):
        rows, cols, pos_idx, self_idx, temperature = inputs
        _, lse, inv_r, inv_c = output
        ctx.save_for_backward(rows, cols, pos_idx, self_idx, lse, inv_r, inv_c)
        ctx.temperature = temperature
        ctx.mark_non_differentiable(lse, inv_r, inv_c)  # statistics for the backward only

    def _backward(ctx, grad_loss, _grad_lse, _grad_inv_r, _grad_inv_c):
        rows, cols, pos_idx, self_idx, lse, inv_r, inv_c = ctx.saved_tensors
        need_rows, need_cols = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        # a pass whose input needs no gradient is skipped inside the op (half the backward)
        grad_rows, grad_cols = torch.ops.ssl_ops.nt_xent_bwd(
            grad_loss,
            rows,
            cols,
            pos_idx,
            self_idx,
            lse,
            inv_r,
            inv_c,
            ctx.temperature,
            need_rows,
            need_cols,
        )
        return (
            grad_rows if need_rows else None,
            grad_cols if need_cols else None,
            None,
            None,
            None,
        )

    torch.library.register_autograd("ssl_ops::nt_xent_fwd", _backward, setup_context=_setup_context)


# (device, d) key -> None (the op agreed with the reference) or why not; filled by self_check.
_SELF_CHECK: dict[str, str | None] = {}
# (loss: max abs error / max(1, max |ref|), gradients: max abs error / max |ref|) per dtype. Loose
# against rounding (the tests hold the op to 1e-5 / 1.5e-2), tight against a wrong kernel.
_SELF_CHECK_TOL = {torch.float32: (1e-4, 1e-3), torch.bfloat16: (1e-3, 4e-2)}


def _device_key(device: torch.device | str) -> str:
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return str(dev)


def _run_self_check(device: torch.device, d: int) -> str | None:
    from common.losses import nt_xent_reference  # here: losses imports this module lazily

    # R != C, rows crossing the CUDA 64-row tile, columns spread over several splits and tiles,
    # the caller's d (the same kernel instantiation and d-chunking as the real call); a local
    # generator leaves the global RNG alone.
    R, C, T = 96, 200, 0.1
    g = torch.Generator().manual_seed(1234)
    rows = torch.randn(R, d, generator=g, dtype=torch.float64)
    rows = rows * (0.5 + 2 * torch.rand(R, 1, generator=g, dtype=torch.float64))
    cols = torch.randn(C, d, generator=g, dtype=torch.float64)
    cols[:R] = rows + 0.5 * cols[:R]  # correlated positives: non-uniform softmax rows
    pos = (torch.arange(R) + 1) % R
    self_idx = torch.arange(R)
    weight = torch.rand(R, generator=g, dtype=torch.float64) + 0.5
    for dtype, (loss_tol, grad_tol) in _SELF_CHECK_TOL.items():
        r = rows.to(device, dtype).requires_grad_()
        c = cols.to(device, dtype).requires_grad_()
        try:
            loss = nt_xent_fused(r, c, pos.to(device), self_idx.to(device), T)
            (loss * weight.to(device, loss.dtype)).sum().backward()
        except RuntimeError as e:
            return f"{dtype}: the op raised {type(e).__name__}: {e}"
        r64 = r.detach().cpu().double().requires_grad_()
        c64 = c.detach().cpu().double().requires_grad_()
        ref = nt_xent_reference(r64, c64, pos, self_idx, T)
        (ref * weight).sum().backward()
        got = (loss.detach().cpu().double(), r.grad.cpu().double(), c.grad.cpu().double())
        want = (ref.detach(), r64.grad, c64.grad)
        for name, a, b, tol in zip(
            ("loss", "grad rows", "grad cols"), got, want, (loss_tol, grad_tol, grad_tol)
        ):
            denom = max(1.0, b.abs().max().item()) if name == "loss" else b.abs().max().item()
            err = (a - b).abs().max().item() / max(denom, 1e-30)
            if not err <= tol:  # also catches NaN
                return f"{dtype}: {name} differs from the fp64 reference by {err:.2e} (> {tol})"
    return None


def self_check(device: torch.device | str, d: int = 128) -> str | None:
    """None when the op matches the fp64 reference (loss and both gradients, fp32 and bf16) on a
    small random batch of width d on `device`, else why not. Runs once per (device, d) and
    process (cached); skipped (None) while torch.compile traces, where the eager call before it
    has run it."""
    key = f"{_device_key(device)}/d={d}"
    if key in _SELF_CHECK:
        return _SELF_CHECK[key]
    if torch.compiler.is_compiling():
        return None
    dev = torch.device(_device_key(device))
    with torch.inference_mode(False), torch.enable_grad(), torch.autocast(dev.type, enabled=False):
        why = _run_self_check(dev, max(int(d), 1))
    _SELF_CHECK[key] = why
    return why


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
