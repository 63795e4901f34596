"""The NT-Xent op's Python side, as pytorch/extension-cpp's ops.py: it loads the extension
(csrc/, built as `common._C`), registers the fake (meta) kernels and the autograd of its ops,
chooses the path (fused or tiled) and exposes `nt_xent_fused`. The first-use check that vets the
kernels on a machine is common/nt_xent_check.py; the SSL_NT_XENT dispatch between this op and
the plain-PyTorch reference is common/nt_xent.py.

The extension registers (namespace `ssl_ops`, schemas in csrc/nt_xent.h, table in
csrc/README.md) two implementations of one contract, common.nt_xent.nt_xent_reference:

    nt_xent_fwd(rows [R, d], cols [C, d], pos_idx [R], self_idx [R], T)
        -> loss [R], lse [R], inv_r [R], inv_c [C]        (fp32; fp64 for fp64 inputs)
    nt_xent_bwd(grad_loss [R], rows, cols, pos_idx, self_idx, lse, inv_r, inv_c, T,
                need_rows=True, need_cols=True)
        -> grad_rows [R, d], grad_cols [C, d]             (dtype of rows / cols; [0, d] and the
                                                           pass skipped when not needed)
    nt_xent_tiled_fwd / nt_xent_tiled_bwd: the same with a `chunk` argument after T (columns per
        chunk of the tiled path: library GEMMs plus elementwise kernels)
    set_splits(n) -> previous n: the CUDA column-split test hook (a no-op without CUDA kernels)

The fake kernels and autograd below make `nt_xent_fused` work in eager mode, under
torch.compile (fullgraph) and with torch.library.opcheck. Nothing of size R x C is ever
allocated by the fused path: the forward keeps a running log-sum-exp per row and saves only lse
and the inverse norms; the backward recomputes the logit tiles.

This module imports nothing from common.nt_xent or common.nt_xent_check: they import it.
"""

from __future__ import annotations

import os

import torch

_LOAD_ERROR: str | None = None
_EXT_FILE: str | None = None  # path of the loaded library (its hash is part of the check's key)
try:
    from common import _C  # (loading the library registers torch.ops.ssl_ops.*)

    _EXT_FILE = getattr(_C, "__file__", None)
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


# ---- fake kernels and autograd: one registration for both paths ----

# path -> (forward op, backward op, arguments after the temperature). Both pairs share the
# signature up to those: the tiled path adds `chunk` (before need_rows / need_cols in the bwd).
OPS = {
    "fused": ("nt_xent_fwd", "nt_xent_bwd", ()),
    "tiled": ("nt_xent_tiled_fwd", "nt_xent_tiled_bwd", ("chunk",)),
}


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fwd_fake(rows, cols, pos_idx, self_idx, temperature, *path_args):
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


def _register(path: str) -> None:
    """Fake kernels of both ops of `path` and the forward op's autograd (its backward op)."""
    fwd, bwd, extra = OPS[path]
    n_extra = len(extra)
    bwd_op = getattr(torch.ops.ssl_ops, bwd)
    torch.library.register_fake(f"ssl_ops::{fwd}", _fwd_fake)

    @torch.library.register_fake(f"ssl_ops::{bwd}")
    def _bwd_fake(grad_loss, rows, cols, pos_idx, self_idx, lse, inv_r, inv_c, T, *rest):
        torch._check(grad_loss.shape == (rows.shape[0],), lambda: "grad_loss must be [R]")
        need_rows, need_cols = (*rest[n_extra:], True, True)[:2]  # the schema's defaults: True
        d = rows.shape[1]
        return (
            rows.new_empty((rows.shape[0] if need_rows else 0, d)),
            cols.new_empty((cols.shape[0] if need_cols else 0, d)),
        )

    def setup_context(ctx, inputs, output):
        rows, cols, pos_idx, self_idx, temperature, *path_args = inputs
        _, lse, inv_r, inv_c = output
        ctx.save_for_backward(rows, cols, pos_idx, self_idx, lse, inv_r, inv_c)
        ctx.temperature = temperature
        ctx.path_args = tuple(path_args)
        ctx.mark_non_differentiable(lse, inv_r, inv_c)  # statistics for the backward only

    def backward(ctx, grad_loss, _grad_lse, _grad_inv_r, _grad_inv_c):
        rows, cols, pos_idx, self_idx, lse, inv_r, inv_c = ctx.saved_tensors
        need_rows, need_cols = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        # a pass whose input needs no gradient is skipped inside the op (half the backward)
        grad_rows, grad_cols = bwd_op(
            grad_loss,
            rows,
            cols,
            pos_idx,
            self_idx,
            lse,
            inv_r,
            inv_c,
            ctx.temperature,
            *ctx.path_args,
            need_rows,
            need_cols,
        )
        no_grad = (None,) * (3 + n_extra)  # pos_idx, self_idx, temperature, the path's args
        return (grad_rows if need_rows else None, grad_cols if need_cols else None, *no_grad)

    torch.library.register_autograd(f"ssl_ops::{fwd}", backward, setup_context=setup_context)


if _LOAD_ERROR is None:
    for _path in OPS:
        _register(_path)

# ---- which implementation the op runs: tiled (library GEMMs + elementwise kernels) or fused ----

PATHS = ("auto", "tiled", "fused")
CHUNK_MIB = 256  # default memory budget of the tiled path's per-chunk buffers


def path_for(device: torch.device | str, path: str | None = None) -> str:
    """ "tiled" or "fused" for `device`: `path`, else SSL_NT_XENT_PATH (auto | tiled | fused).
    auto: tiled on CUDA (cuBLAS GEMMs, whose speed is known, until a GPU measurement says the
    fused kernels are faster: bench/gpu_check.sh prints a recommendation per shape), fused on
    the CPU (measured faster there, bench/RESULTS.md)."""
    p = (path or os.environ.get("SSL_NT_XENT_PATH", "auto")).lower()
    if p not in PATHS:
        raise ValueError(f"SSL_NT_XENT_PATH must be one of {PATHS}, got {p!r}")
    if p == "auto":
        return "tiled" if torch.device(device).type == "cuda" else "fused"
    return p


def chunk_for(n_rows: int, n_cols: int, dtype: torch.dtype, budget_mib: float | None = None) -> int:
    """Columns per chunk of the tiled path: the [R, chunk] fp32 logits and the [R, chunk] G
    (GEMM dtype) within `budget_mib` (default SSL_NT_XENT_CHUNK_MIB, else 256 MiB), a multiple
    of 64 (whole tensor-core tiles), at least 64 and at most the columns rounded up."""
    if budget_mib is None:
        budget_mib = float(os.environ.get("SSL_NT_XENT_CHUNK_MIB", CHUNK_MIB))
    g_bytes = 2 if dtype in (torch.bfloat16, torch.float16) else 4
    if dtype == torch.float64:
        g_bytes = 8
    per_col = max(n_rows, 1) * ((8 if dtype == torch.float64 else 4) + g_bytes)
    chunk = int(budget_mib * 2**20) // per_col // 64 * 64
    return max(64, min(chunk, (max(n_cols, 1) + 63) // 64 * 64))


def check_indices(pos_idx: torch.Tensor, self_idx: torch.Tensor, n_cols: int) -> None:
    """Raises when an index is outside [0, n_cols). Reads back to the host (a sync): only on
    request (nt_xent_fused(validate=True) or SSL_NT_XENT_VALIDATE=1), never in the op itself."""
    for name, idx in (("pos_idx", pos_idx), ("self_idx", self_idx)):
        if idx.numel() == 0:
            continue
        bad = (idx < 0) | (idx >= n_cols)
        if bool(bad.any()):
            v = int(idx[bad][0])
            raise RuntimeError(f"nt_xent: {name} value {v} is out of range for {n_cols} columns")


def nt_xent_fused(
    rows: torch.Tensor,
    cols: torch.Tensor,
    pos_idx: torch.Tensor,
    self_idx: torch.Tensor,
    temperature: float,
    validate: bool | None = None,
    path: str | None = None,
    chunk: int | None = None,
) -> torch.Tensor:
    """Per-row NT-Xent [R] (fp32, fp64 for fp64 inputs) with the op; differentiable w.r.t.
    rows [R, d] and cols [C, d]. Same contract as common.nt_xent.nt_xent_reference.

    The op itself never reads anything back to the host (CUDA-graph capturable). Out-of-range
    indices are memory-safe (an out-of-range pos_i gives loss_i = inf); validate=True (default:
    SSL_NT_XENT_VALIDATE=1) checks them first, at the cost of one host sync. path: "tiled" or
    "fused" (default: path_for(device), SSL_NT_XENT_PATH); chunk: columns per chunk of the
    tiled path (default: chunk_for, SSL_NT_XENT_CHUNK_MIB)."""
    if _LOAD_ERROR is not None:
        raise RuntimeError(f"the fused NT-Xent op is not built: {_LOAD_ERROR}")
    if cols.dtype != rows.dtype:  # mixed inputs: compute in the wider dtype, as the reference
        common = torch.promote_types(rows.dtype, cols.dtype)
        rows, cols = rows.to(common), cols.to(common)
    pos_idx = pos_idx.to(device=rows.device, dtype=torch.long)
    self_idx = self_idx.to(device=rows.device, dtype=torch.long)
    if validate is None:
        validate = os.environ.get("SSL_NT_XENT_VALIDATE", "0") == "1"
    if validate and not torch.compiler.is_compiling():
        check_indices(pos_idx, self_idx, cols.shape[0])
    which = path_for(rows.device, path)
    if which == "tiled" and chunk is None:
        chunk = chunk_for(rows.shape[0], cols.shape[0], rows.dtype)
    path_args = (int(chunk),) if which == "tiled" else ()  # OPS[which][2]: the tiled path's chunk
    fwd = getattr(torch.ops.ssl_ops, OPS[which][0])
    loss, _, _, _ = fwd(rows, cols, pos_idx, self_idx, float(temperature), *path_args)
    return loss
