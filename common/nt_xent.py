"""NT-Xent (normalised temperature-scaled cross entropy) per anchor row, for any layout.

SimCLR's layout (which rows are positives, the gather of negatives from every rank, the
official loss scale) is in simclr.py's loss section, which calls into this module. Two layers:
- `nt_xent_rows(rows, cols, pos_idx, self_idx, temperature)`: the explicit layout. rows [R, d]
  are this rank's anchors, cols [C, d] every candidate (the all-gathered embeddings), and for
  anchor i, cols[pos_idx[i]] is its positive and cols[self_idx[i]] is itself (excluded from the
  softmax). Returns the per-row loss [R] in fp32. It dispatches to the fused C++/CUDA op
  (csrc/, never builds the R x C matrix) or to the pure-PyTorch reference below, chosen by the
  environment variable SSL_NT_XENT = auto (default: the op when built) | ext | ref. Under
  `auto` a missing op (common/nt_xent_op.py or its built extension absent, as in a script
  copied into another project) falls back to the reference with one warning. Before its first
  use on a device the op is compared with an fp64 reference in a child process with a timeout,
  the verdict cached per machine (common/nt_xent_check.py, self_check); when it differs, or the
  child crashes or hangs, `auto` warns once naming the cause and uses the reference, `ext`
  raises.
  nt_xent_impl_used() names the implementation of the last call, for a run's result line.
- `nt_xent_reference(...)`: the same contract in plain PyTorch, materialising R x C logits.
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import is_fake

IMPLS = ("auto", "ext", "ref")


def nt_xent_reference(
    rows: torch.Tensor,
    cols: torch.Tensor,
    pos_idx: torch.Tensor,
    self_idx: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """Per-row NT-Xent [R] (fp32, or fp64 for fp64 inputs), materialising the [R, C] logits."""
    acc = torch.float64 if rows.dtype == torch.float64 else torch.float32
    r = F.normalize(rows.to(acc), dim=1)  # [R, d], unit rows: dot product = cosine similarity
    c = F.normalize(cols.to(acc), dim=1)  # [C, d]
    logits = r @ c.t() / temperature  # [R, C]
    # The anchor itself is not a candidate: -inf (not a large negative constant) so that it
    # contributes exactly zero to the softmax whatever the temperature.
    self_mask = torch.zeros_like(logits, dtype=torch.bool)
    self_mask[torch.arange(len(rows), device=rows.device), self_idx] = True
    logits = logits.masked_fill(self_mask, float("-inf"))
    return F.cross_entropy(logits, pos_idx, reduction="none")  # [R] = lse_i - logit[i, pos_i]


_FALLBACK_WARNED = False


def _warn_fallback(why: str) -> None:
    global _FALLBACK_WARNED
    if not _FALLBACK_WARNED:
        _FALLBACK_WARNED = True
        warnings.warn(
            f"NT-Xent: the fused op is not available ({why}); using the pure-PyTorch reference "
            "(same result, more memory). Build it with `python setup.py build_ext --inplace`.",
            stacklevel=3,
        )


_SELF_CHECK_WARNED: set[str] = set()
_IMPL_USED = "none"


def _warn_self_check(device: torch.device, why: str) -> None:
    if str(device) not in _SELF_CHECK_WARNED:
        _SELF_CHECK_WARNED.add(str(device))
        warnings.warn(
            f"NT-Xent: the fused op failed its first-use self-check on {device} ({why}); using "
            "the pure-PyTorch reference. Please report this (SSL_NT_XENT=ext makes it an error).",
            stacklevel=3,
        )


def nt_xent_impl_used() -> str:
    """The implementation the last nt_xent_rows call used, for a run's result line: "ext",
    "ref", "ref (fallback: not built)" or "ref (fallback: self-check failed)"; "none" before."""
    return _IMPL_USED


def _impl() -> str:
    impl = os.environ.get("SSL_NT_XENT", "auto").lower()
    if impl not in IMPLS:
        raise ValueError(f"SSL_NT_XENT must be one of {IMPLS}, got {impl!r}")
    return impl


def nt_xent_rows(
    rows: torch.Tensor,
    cols: torch.Tensor,
    pos_idx: torch.Tensor,
    self_idx: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """Per-row NT-Xent [R] with an explicit layout; the fused op when available (see module doc)."""
    global _IMPL_USED
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    impl = _impl()
    _IMPL_USED = "ref"
    if impl != "ref":
        try:
            from common import nt_xent_op  # the Python side of the C++/CUDA extension
        except ImportError as e:  # a copied script without the op's file
            if impl == "ext":
                raise
            _warn_fallback(f"{type(e).__name__}: {e}")
            _IMPL_USED = "ref (fallback: not built)"
            return nt_xent_reference(rows, cols, pos_idx, self_idx, temperature)
        if nt_xent_op.available(rows.device):
            from common import nt_xent_check  # the first-use check (imports nt_xent_op)

            # first use on this device in this process: compare with the fp64 reference.
            # Fake tensors (tracing; tests on device 'cuda' without a GPU) hold no data and
            # may have no device behind them: the check waits for the first real call.
            why = None if is_fake(rows) else nt_xent_check.self_check(rows.device, rows.shape[1])
            if why is None:
                _IMPL_USED = "ext"
                return nt_xent_op.nt_xent_fused(rows, cols, pos_idx, self_idx, temperature)
            if impl == "ext":
                raise RuntimeError(
                    f"SSL_NT_XENT=ext but the fused NT-Xent op failed its self-check on "
                    f"{rows.device}: {why}"
                )
            _warn_self_check(rows.device, why)
            _IMPL_USED = "ref (fallback: self-check failed)"
            return nt_xent_reference(rows, cols, pos_idx, self_idx, temperature)
        if impl == "ext":
            raise RuntimeError(
                "SSL_NT_XENT=ext but the fused NT-Xent op is not built for "
                f"{rows.device.type}: {nt_xent_op.load_error()}. "
                "Build it with `python setup.py build_ext --inplace`."
            )
        _warn_fallback(nt_xent_op.load_error() or f"built without {rows.device.type} kernels")
        _IMPL_USED = "ref (fallback: not built)"
    return nt_xent_reference(rows, cols, pos_idx, self_idx, temperature)
