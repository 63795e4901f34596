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

`self_check(device, d)` compares the op with an fp64 reference before its first use (common.losses
runs it): kernels that have never run on a user's hardware must not silently train on a wrong
gradient, and must not take the run down either. The check runs in a child process with a
timeout (SSL_NT_XENT_CHECK_TIMEOUT, default 60 s, CUDA start-up included), so an illegal memory
access, an abort or a hang kills the child, not the training process, whose CUDA context stays
usable. It covers fp32, bf16 and fp16 at d = 128, at d = 37 (not a multiple of 8: the scalar
loads) and at the caller's d, on R = 400, C = 450 with the CUDA column split forced to 2: every
block of both backward passes streams 3-4 tiles (cross-tile max rescaling, multi-tile
accumulation, staging-buffer reuse) and both dimensions end in a partial tile. The verdict is
cached per machine (device name, driver and CUDA versions, torch version, a hash of the built
extension) in $SSL_CACHE_DIR/nt_xent_check/ (default ~/.cache/ssl-reference), so it costs a few
seconds once per machine, not per process or rank; concurrent processes (torchrun's ranks on a
node) take a file lock, so one runs the check and the others wait for its verdict. Delete that
directory (or set SSL_NT_XENT_RECHECK=1) to check again.

This module imports nothing from common.losses (the check has its own fp64 reference below), so
there is no import cycle: losses imports it lazily, and it works without losses.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

_LOAD_ERROR: str | None = None
_EXT_FILE: str | None = None  # path of the loaded library (its hash is part of the check's key)
try:
    from common import _C  # (loading the library registers torch.ops.ssl_ops.*)

    _EXT_FILE = getattr(_C, "__file__", None)
except Exception as e:  # not built, or built against another torch
    _LOAD_ERROR = f"{type(e).__name__}: {e}"

ROOT = Path(__file__).resolve().parents[1]

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

    @torch.library.register_fake("ssl_ops::nt_xent_tiled_fwd")
    def _tiled_fwd_fake(rows, cols, pos_idx, self_idx, temperature, chunk):
        return _fwd_fake(rows, cols, pos_idx, self_idx, temperature)

    @torch.library.register_fake("ssl_ops::nt_xent_tiled_bwd")
    def _tiled_bwd_fake(
        grad_loss,
        rows,
        cols,
        pos_idx,
        self_idx,
        lse,
        inv_r,
        inv_c,
        temperature,
        chunk,
        need_rows=True,
        need_cols=True,
    ):
        return _bwd_fake(
            grad_loss,
            rows,
            cols,
            pos_idx,
            self_idx,
            lse,
            inv_r,
            inv_c,
            temperature,
            need_rows,
            need_cols,
        )

    def _tiled_setup_context(ctx, inputs, output):
        rows, cols, pos_idx, self_idx, temperature, chunk = inputs
        _setup_context(ctx, (rows, cols, pos_idx, self_idx, temperature), output)
        ctx.chunk = chunk

    def _tiled_backward(ctx, grad_loss, _grad_lse, _grad_inv_r, _grad_inv_c):
        rows, cols, pos_idx, self_idx, lse, inv_r, inv_c = ctx.saved_tensors
        need_rows, need_cols = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_rows, grad_cols = torch.ops.ssl_ops.nt_xent_tiled_bwd(
            grad_loss,
            rows,
            cols,
            pos_idx,
            self_idx,
            lse,
            inv_r,
            inv_c,
            ctx.temperature,
            ctx.chunk,
            need_rows,
            need_cols,
        )
        return (
            grad_rows if need_rows else None,
            grad_cols if need_cols else None,
            None,
            None,
            None,
            None,
        )

    torch.library.register_autograd(
        "ssl_ops::nt_xent_tiled_fwd", _tiled_backward, setup_context=_tiled_setup_context
    )

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


# ---- the first-use check ----

# (loss: max abs error / max(1, max |ref|), gradients: max abs error / max |ref|) per dtype. Loose
# against rounding (the tests hold the op to 1e-5 / 1.5e-2), tight against a wrong kernel.
_CHECK_TOL = {
    torch.float32: (1e-4, 1e-3),
    torch.bfloat16: (1e-3, 4e-2),
    torch.float16: (1e-3, 4e-2),
}
# R != C, 6 / 7 full 64-wide CUDA tiles plus a tail in each dimension; with 2 forced column
# splits every block of the forward and of both backward passes streams 3 or 4 tiles.
_CHECK_R, _CHECK_C, _CHECK_SPLITS = 400, 450, 2
_CHECK_DS = (128, 37)  # the training width (16-byte vector loads) and a d not a multiple of 8
CHECK_TIMEOUT_S = 60.0
# in-process memo: verdict key -> None (passed) or why not
_SELF_CHECK: dict[str, str | None] = {}
_VERDICT_PREFIX = "NTX_CHECK_VERDICT "


def _reference64(
    rows: torch.Tensor, cols: torch.Tensor, pos: torch.Tensor, self_idx: torch.Tensor, T: float
) -> torch.Tensor:
    """Per-row NT-Xent in fp64, written independently of common.losses (no import cycle)."""
    r = rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12)
    c = cols / cols.norm(dim=1, keepdim=True).clamp_min(1e-12)
    logits = r @ c.t() / T  # [R, C]
    i = torch.arange(len(rows))
    logits = logits.index_put((i, self_idx), torch.tensor(float("-inf"), dtype=logits.dtype))
    return torch.logsumexp(logits, 1) - logits[i, pos]


def _set_splits(n: int) -> int:
    """Forces the CUDA kernels' column split (0 = heuristic); returns the old value (0 when the
    build has no CUDA kernels)."""
    try:
        return int(torch.ops.ssl_ops.set_splits(n))
    except (AttributeError, RuntimeError):
        return 0


def _run_self_check(device: torch.device, d: int, hook: str = "") -> str | None:
    """The check itself (run in the child process): None, or what differs."""
    g = torch.Generator().manual_seed(1234)
    R, C, T = _CHECK_R, _CHECK_C, 0.1
    rows = torch.randn(R, d, generator=g, dtype=torch.float64)
    rows = rows * (0.5 + 2 * torch.rand(R, 1, generator=g, dtype=torch.float64))
    cols = torch.randn(C, d, generator=g, dtype=torch.float64)
    cols = cols * (0.5 + 2 * torch.rand(C, 1, generator=g, dtype=torch.float64))
    perm = torch.randperm(C, generator=g)
    pos, self_idx = perm[:R], perm[C - R :].flip(0)  # random, distinct per row
    self_idx = torch.where(self_idx == pos, (pos + 1) % C, self_idx)
    cols[pos] = rows + 0.5 * cols[pos]  # correlated positives: non-uniform softmax rows
    weight = torch.rand(R, generator=g, dtype=torch.float64) + 0.5
    if device.type == "cuda":
        _set_splits(_CHECK_SPLITS)
    for dtype, (loss_tol, grad_tol) in _CHECK_TOL.items():
        r = rows.to(device, dtype).requires_grad_()
        c = cols.to(device, dtype).requires_grad_()
        try:
            # the tiled path in 64-column chunks: 8 chunks, the last a 2-column tail
            loss = nt_xent_fused(r, c, pos.to(device), self_idx.to(device), T, chunk=64)
            (loss * weight.to(device, loss.dtype)).sum().backward()
            got = (loss.detach().cpu().double(), r.grad.cpu().double(), c.grad.cpu().double())
        except RuntimeError as e:
            return f"{dtype}, d={d}: the op raised {type(e).__name__}: {e}"
        if hook == "abort":  # test hook: a kernel fault that kills the process
            os.abort()
        if hook == "hang":  # test hook: a kernel that never finishes
            time.sleep(3600)
        if hook == "wrong":  # test hook: a wrong loss
            got = (got[0] * 1.001, got[1], got[2])
        r64 = r.detach().cpu().double().requires_grad_()
        c64 = c.detach().cpu().double().requires_grad_()
        (_reference64(r64, c64, pos, self_idx, T) * weight).sum().backward()
        want = (_reference64(r64, c64, pos, self_idx, T).detach(), r64.grad, c64.grad)
        for name, a, b, tol in zip(
            ("loss", "grad rows", "grad cols"), got, want, (loss_tol, grad_tol, grad_tol)
        ):
            denom = max(1.0, b.abs().max().item()) if name == "loss" else b.abs().max().item()
            err = (a - b).abs().max().item() / max(denom, 1e-30)
            if not err <= tol:  # also catches NaN
                return (
                    f"{dtype}, d={d}: {name} differs from the fp64 reference by {err:.2e} (> {tol})"
                )
    return None


def _child_main(argv: list[str]) -> int:
    """Entry point of the check's child process: argv = [device, d...]; prints the verdict."""
    device = torch.device(argv[0])
    hook = os.environ.get("SSL_NT_XENT_CHECK_HOOK", "")
    why = None
    for d in (int(x) for x in argv[1:]):
        with torch.autocast(device.type, enabled=False):
            why = _run_self_check(device, d, hook)
        if why is not None:
            break
    print(_VERDICT_PREFIX + json.dumps({"why": why}), flush=True)
    return 0


def _d_class(d: int) -> tuple[bool, int]:
    """What selects the kernels' code path for width d: 16-byte vector loads (d a multiple of 8)
    and the backward accumulator (registers for d <= 64 / 128 / 256 by dtype, else global)."""
    return d % 8 == 0, sum(d > lim for lim in (64, 128, 256))


def _check_ds(d: int) -> list[int]:
    """The widths the check runs: 128 and 37, plus d when its code path is not among theirs."""
    ds = set(_CHECK_DS)
    if _d_class(d) not in {_d_class(x) for x in ds}:
        ds.add(max(int(d), 1))
    return sorted(ds)


def _file_sha(path: str | None) -> str:
    if not path or not os.path.exists(path):
        return "none"
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


_EXT_SHA: str | None = None


def machine_key(device: torch.device | str) -> dict[str, str]:
    """What the check's verdict depends on: device name, driver and CUDA versions, torch, and the
    built extension's hash (a rebuilt or updated library is checked again)."""
    global _EXT_SHA
    dev = torch.device(device)
    if _EXT_SHA is None:
        _EXT_SHA = _file_sha(_EXT_FILE)
    key = {"device": dev.type, "torch": torch.__version__, "ext": _EXT_SHA}
    key["path"] = path_for(dev)  # the check runs the implementation this process will use
    if dev.type == "cuda":
        idx = dev.index if dev.index is not None else torch.cuda.current_device()
        key["name"] = torch.cuda.get_device_name(idx)
        key["cuda"] = str(torch.version.cuda)
        try:
            key["driver"] = Path("/proc/driver/nvidia/version").read_text().splitlines()[0]
        except (OSError, IndexError):
            key["driver"] = "unknown"
    else:
        key["name"] = platform.processor() or platform.machine()
    hook = os.environ.get("SSL_NT_XENT_CHECK_HOOK", "")
    if hook:  # a test's deliberately broken verdict never stands for the real one
        key["hook"] = hook
    return key


def _cache_dir() -> Path:
    base = os.environ.get("SSL_CACHE_DIR", str(Path.home() / ".cache" / "ssl-reference"))
    return Path(base) / "nt_xent_check"


def _timeout_s() -> float:
    return float(os.environ.get("SSL_NT_XENT_CHECK_TIMEOUT", CHECK_TIMEOUT_S))


def _run_child(device: torch.device, ds: list[int], timeout: float) -> str | None:
    """Runs the check in a fresh process; None, or why the op must not be used. The child has its
    own session, so a hang is ended by killing its whole process group."""
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); "
        "from common.nt_xent_op import _child_main; sys.exit(_child_main(sys.argv[2:]))"
    )
    cmd = [sys.executable, "-c", code, str(ROOT), str(device), *map(str, ds)]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return f"the check process hung: no verdict within {timeout:g} s"
    for line in reversed(out.splitlines()):
        if line.startswith(_VERDICT_PREFIX):
            return json.loads(line[len(_VERDICT_PREFIX) :])["why"]
    if proc.returncode < 0:
        with contextlib.suppress(ValueError):
            cause = signal.Signals(-proc.returncode).name
            return f"the check process crashed ({cause}): {_last_line(err)}"
    return f"the check process failed (exit code {proc.returncode}): {_last_line(err)}"


def _last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][-300:] if lines else "no output"


def _verdict(device: torch.device, d: int) -> str | None:
    """The cached verdict for this machine and d, or the check's (run once, under a file lock:
    concurrent processes wait for the first one's verdict instead of running their own)."""
    ds = _check_ds(d)
    key = {**machine_key(device), "ds": ds}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    cache = _cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / f"{digest}.json"
    with open(cache / f"{digest}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
        if path.exists() and os.environ.get("SSL_NT_XENT_RECHECK", "0") != "1":
            with contextlib.suppress(OSError, ValueError, KeyError):
                return json.loads(path.read_text())["why"]
        why = _run_child(device, ds, _timeout_s())
        tmp = path.with_suffix(f".tmp{os.getpid()}.{threading.get_ident()}")
        tmp.write_text(json.dumps({"why": why, "key": key, "time": time.time()}))
        os.replace(tmp, path)
        return why


def _device_key(device: torch.device | str) -> str:
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return str(dev)


def self_check(device: torch.device | str, d: int = 128) -> str | None:
    """None when the op matches the fp64 reference (loss and both gradients, fp32, bf16 and
    fp16) on `device`'s kind of hardware, else why not (a mismatch, or the check process crashed
    or hung). Cached per machine on disk and per process in memory; skipped (None) while
    torch.compile traces, where the eager call before it has run it."""
    key = f"{_device_key(device)}/d={_check_ds(d)}"
    if key in _SELF_CHECK:
        return _SELF_CHECK[key]
    if torch.compiler.is_compiling():
        return None
    why = _verdict(torch.device(_device_key(device)), d)
    _SELF_CHECK[key] = why
    return why


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
    """Per-row NT-Xent [R] (fp32, fp64 for fp64 inputs) with the fused op; differentiable
    w.r.t. rows [R, d] and cols [C, d]. Same contract as common.losses.nt_xent_reference.

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
    if path_for(rows.device, path) == "tiled":
        if chunk is None:
            chunk = chunk_for(rows.shape[0], cols.shape[0], rows.dtype)
        loss, _, _, _ = torch.ops.ssl_ops.nt_xent_tiled_fwd(
            rows, cols, pos_idx, self_idx, float(temperature), int(chunk)
        )
        return loss
    loss, _, _, _ = torch.ops.ssl_ops.nt_xent_fwd(rows, cols, pos_idx, self_idx, float(temperature))
    return loss
