"""The fused NT-Xent op (csrc/, common/nt_xent_op.py) against the fp64 reference.

Every comparison runs common.losses.nt_xent_reference on fp64 copies of the *same* (already
rounded) inputs, with a random per-row weight as the incoming gradient, and checks the loss and
both gradients (rows and cols). Tolerances, as max |err| / max |ref| over the tensor:
  fp64: 1e-10; fp32: 2e-5 (loss: 1e-5 absolute); bf16/fp16: loss 1e-4 absolute (computed in
  fp32 from the bf16 values), gradients 1.5e-2 (they are returned in bf16: 2^-8 relative rounding,
  plus the bf16 G tiles of the CUDA tensor-core path).
Skips cleanly when the extension is not built (python setup.py build_ext --inplace); the CUDA
tests (all named *cuda*) skip without a GPU or without CUDA kernels in the build.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from common import losses
from common import nt_xent_op as op
from common.losses import nt_xent_reference

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


# (R, C, d, T, norm scale): tiny, smaller than one tile, odd sizes, d not a multiple of 8,
# sizes crossing the CPU (128 x 512) and CUDA (64 x 64) tile edges, large and small norms.
CASES = [
    (1, 2, 1, 0.5, 1.0),
    (5, 7, 3, 0.05, 1.0),
    (37, 129, 13, 0.1, 1.0),
    (130, 515, 37, 1.0, 1e3),
    (200, 1030, 20, 0.07, 1e-3),
    (64, 64, 128, 0.2, 30.0),
]
CASE_IDS = [f"R{c[0]}-C{c[1]}-d{c[2]}-T{c[3]}-s{c[4]:g}" for c in CASES]


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("R,C,d,T,scale", CASES, ids=CASE_IDS)
def test_matches_reference_cpu(R, C, d, T, scale, dtype):
    rows, cols, pos, self_idx, weight = make_case(R, C, d, scale, seed=R + C + d)
    check(rows, cols, pos, self_idx, weight, T, dtype, "cpu")


# ---- the tiled path (library GEMMs + elementwise kernels, csrc/nt_xent_tiled.h) ----

# R != C, chunk tails (C not a multiple of the chunk), one chunk larger than C, d = 1 and d not
# a multiple of 8, a zero-norm row, large and small norms.
TILED_CASES = [
    (5, 7, 3, 64, 1.0),
    (37, 129, 13, 64, 1.0),
    (130, 515, 37, 128, 1e3),
    (200, 150, 20, 1024, 1e-3),
    (64, 200, 128, 64, 30.0),
]
TILED_IDS = [f"R{c[0]}-C{c[1]}-d{c[2]}-chunk{c[3]}-s{c[4]:g}" for c in TILED_CASES]
_ALL_DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
_DT_IDS = ["fp64", "fp32", "bf16", "fp16"]


@needs_ext
@pytest.mark.parametrize("dtype", _ALL_DTYPES, ids=_DT_IDS)
@pytest.mark.parametrize("R,C,d,chunk,scale", TILED_CASES, ids=TILED_IDS)
def test_tiled_matches_reference_cpu(R, C, d, chunk, scale, dtype):
    if dtype == torch.float16 and scale >= 1e3:
        scale = 30.0  # fp16 cannot hold the inputs themselves beyond 65504
    rows, cols, pos, self_idx, weight = make_case(R, C, d, scale, seed=R + C + d)
    if R > 3 and dtype != torch.float16:
        rows[3] = 0.0  # normalised by the clamped eps (its gradient, ~1e12, overflows fp16)
    check(rows, cols, pos, self_idx, weight, 0.1, dtype, "cpu", path="tiled", chunk=chunk)


@needs_ext
def test_tiled_chunk_size_does_not_change_the_result_cpu():
    """1, 3 and 17 chunks agree to fp32 rounding; the same chunk twice is bit-identical."""
    rows, cols, pos, self_idx, weight = make_case(50, 1030, 24, 1.0, seed=50)
    outs = [
        run_both(
            rows, cols, pos, self_idx, weight, 0.1, torch.float32, "cpu", path="tiled", chunk=k
        )[0]
        for k in (2048, 384, 64, 64)
    ]
    for a, b in zip(outs[2], outs[3]):
        assert torch.equal(a, b)
    for o in outs[:2]:
        for a, b in zip(o, outs[2]):
            assert rel_err(a, b) <= 1e-5


@needs_ext
def test_tiled_opcheck_cpu():
    for dtype in (torch.float32, torch.float64):
        r, c, p, s, w = _opcheck_inputs("cpu", dtype, True)
        torch.library.opcheck(torch.ops.ssl_ops.nt_xent_tiled_fwd.default, (r, c, p, s, 0.25, 8))
        with torch.no_grad():
            _, lse, inv_r, inv_c = torch.ops.ssl_ops.nt_xent_tiled_fwd(r, c, p, s, 0.25, 8)
        torch.library.opcheck(
            torch.ops.ssl_ops.nt_xent_tiled_bwd.default,
            (w.to(lse.dtype), r.detach(), c.detach(), p, s, lse, inv_r, inv_c, 0.25, 8),
        )


def test_path_and_chunk_settings(monkeypatch):
    assert op.path_for("cuda") == "tiled" and op.path_for("cpu") == "fused"
    monkeypatch.setenv("SSL_NT_XENT_PATH", "fused")
    assert op.path_for("cuda") == "fused" and op.path_for("cuda", "tiled") == "tiled"
    monkeypatch.setenv("SSL_NT_XENT_PATH", "fast")
    with pytest.raises(ValueError, match="SSL_NT_XENT_PATH"):
        op.path_for("cpu")
    # 65,536 bf16 rows: 4 + 2 bytes per logit, 256 MiB -> 682 columns, rounded down to 640
    assert op.chunk_for(65536, 65536, torch.bfloat16, 256) == 640
    assert op.chunk_for(100, 70, torch.float32, 256) == 128  # never more than C rounded up
    assert op.chunk_for(10**7, 10**7, torch.float32, 1) == 64  # at least one tile
    monkeypatch.setenv("SSL_NT_XENT_CHUNK_MIB", "1")
    assert op.chunk_for(4096, 8192, torch.float32) == 64


@needs_ext
def test_fp64_cpu_exact():
    rows, cols, pos, self_idx, weight = make_case(70, 600, 9, 3.0, seed=1)
    check(rows, cols, pos, self_idx, weight, 0.1, torch.float64, "cpu")


@needs_ext
def test_simclr_layout_rows_are_cols_cpu():
    """World size 1: cols *is* rows (the same tensor), both gradients flow into it."""
    n, d, T = 45, 17, 0.2
    z = torch.randn(2 * n, d, dtype=torch.float64) * 4
    pos, self_idx = losses.simclr_layout(n, 0, z.device)
    w = torch.rand(2 * n, dtype=torch.float64)
    x = z.float().requires_grad_()
    (op.nt_xent_fused(x, x, pos, self_idx, T) * w.float()).sum().backward()
    x64 = x.detach().double().requires_grad_()
    (nt_xent_reference(x64, x64, pos, self_idx, T) * w).sum().backward()
    assert rel_err(x.grad, x64.grad) <= 2e-5


@needs_ext
def test_zero_norm_and_extreme_temperature_cpu():
    """A zero vector (normalised by the clamped eps, Jacobian I / eps) and T = 0.05 with large
    logits: still finite and equal to the reference."""
    rows, cols, pos, self_idx, weight = make_case(20, 40, 6, 1.0, seed=3)
    cols[pos[0] + 1 if pos[0] + 1 < 40 and pos[0] + 1 != self_idx[0] else 0] = 0.0
    rows[3] = 0.0
    check(rows, cols, pos, self_idx, weight, 0.05, torch.float64, "cpu")


@needs_ext
def test_self_column_gets_exactly_zero_weight_cpu():
    """The self column must not leak: changing cols[self_idx] changes neither the loss nor
    grad_rows (a large negative constant instead of -inf would leak at small T / large logits)."""
    rows, cols, pos, self_idx, weight = make_case(8, 16, 5, 1.0, seed=4)
    rows, cols = rows.float(), cols.float()
    self_idx[:] = 3
    pos = torch.where(pos == 3, torch.full_like(pos, 4), pos)
    cols2 = cols.clone()
    cols2[3] = rows[0] * 1e3  # would dominate every softmax if it were a candidate
    out = []
    for c in (cols, cols2):
        r = rows.clone().requires_grad_()
        loss = op.nt_xent_fused(r, c, pos, self_idx, 0.05)
        loss.sum().backward()
        out.append((loss.detach(), r.grad))
    assert torch.equal(out[0][0], out[1][0]) or torch.allclose(out[0][0], out[1][0], atol=1e-6)
    assert torch.allclose(out[0][1], out[1][1], atol=1e-6)


@needs_ext
def test_incoming_gradient_is_used_cpu():
    """grad w.r.t. rows of sum(w * loss) is linear in w (not the mean's 1/R assumed)."""
    rows, cols, pos, self_idx, _ = make_case(30, 50, 8, 1.0, seed=5)
    grads = []
    for w in (torch.ones(30), 2.5 * torch.ones(30), torch.zeros(30)):
        r = rows.float().requires_grad_()
        (op.nt_xent_fused(r, cols.float(), pos, self_idx, 0.3) * w).sum().backward()
        grads.append(r.grad)
    assert torch.allclose(grads[1], 2.5 * grads[0], rtol=1e-5, atol=1e-7)
    assert torch.count_nonzero(grads[2]) == 0


@needs_ext
def test_deterministic_cpu():
    """Bitwise identical results run to run and for 1 vs 2 threads (no atomics, fixed tiling)."""
    rows, cols, pos, self_idx, weight = make_case(300, 1100, 32, 1.0, seed=6)
    nthreads = torch.get_num_threads()
    outs = []
    try:
        for threads in (nthreads, nthreads, 1):
            torch.set_num_threads(threads)
            r, c = rows.float().requires_grad_(), cols.float().requires_grad_()
            loss = op.nt_xent_fused(r, c, pos, self_idx, 0.1)
            (loss * weight.float()).sum().backward()
            outs.append((loss.detach(), r.grad, c.grad))
    finally:
        torch.set_num_threads(nthreads)
    for o in outs[1:]:
        for a, b in zip(outs[0], o):
            assert torch.equal(a, b)


@needs_ext
def test_input_validation_cpu():
    r, c = torch.randn(4, 3), torch.randn(6, 3)
    pos, s = torch.tensor([1, 2, 3, 4]), torch.tensor([0, 1, 2, 3])
    with pytest.raises(RuntimeError, match="C == 0"):
        op.nt_xent_fused(r, c[:0], pos, s, 0.1)
    with pytest.raises(RuntimeError, match="out of range"):
        op.nt_xent_fused(r, c, torch.tensor([1, 2, 3, 6]), s, 0.1)
    with pytest.raises(RuntimeError, match="differ in d"):
        op.nt_xent_fused(r, torch.randn(6, 4), pos, s, 0.1)
    with pytest.raises(RuntimeError, match="temperature"):
        op.nt_xent_fused(r, c, pos, s, 0.0)


@needs_ext
def test_gradcheck_fp64_cpu():
    rows, cols, pos, self_idx, weight = make_case(4, 6, 3, 1.0, seed=7)
    r, c = rows.requires_grad_(), cols.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda a, b: op.nt_xent_fused(a, b, pos, self_idx, 0.3) * weight, (r, c)
    )


def _opcheck_inputs(device: str, dtype: torch.dtype, requires_grad: bool):
    rows, cols, pos, self_idx, weight = make_case(9, 13, 5, 1.0, seed=8)
    r = rows.to(device, dtype).requires_grad_(requires_grad)
    c = cols.to(device, dtype).requires_grad_(requires_grad)
    return r, c, pos.to(device), self_idx.to(device), weight.to(device)


def _opcheck(device: str):
    for dtype in (torch.float32, torch.float64):
        r, c, p, s, w = _opcheck_inputs(device, dtype, True)
        torch.library.opcheck(torch.ops.ssl_ops.nt_xent_fwd.default, (r, c, p, s, 0.25))
        with torch.no_grad():
            _, lse, inv_r, inv_c = torch.ops.ssl_ops.nt_xent_fwd(r, c, p, s, 0.25)
        g = w.to(lse.dtype)
        torch.library.opcheck(
            torch.ops.ssl_ops.nt_xent_bwd.default,
            (g, r.detach(), c.detach(), p, s, lse, inv_r, inv_c, 0.25),
        )


@needs_ext
def test_opcheck_cpu():
    _opcheck("cpu")


def _compile_check(device: str, backend: str):
    torch._dynamo.reset()
    rows, cols, pos, self_idx, weight = make_case(33, 70, 12, 1.0, seed=9)
    rows, cols, weight = rows.float(), cols.float(), weight.float()
    pos, self_idx, weight = pos.to(device), self_idx.to(device), weight.to(device)

    def f(r: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return (op.nt_xent_fused(r, c, pos, self_idx, 0.2) * weight).sum()

    cf = torch.compile(f, fullgraph=True, backend=backend)
    grads = []
    for fn in (f, cf):
        r = rows.to(device).requires_grad_()
        c = cols.to(device).requires_grad_()
        out = fn(r, c)
        out.backward()
        grads.append((out.detach(), r.grad, c.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@needs_ext
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph_cpu(backend):
    _compile_check("cpu", backend)


# ---- the dispatcher in common.losses (SSL_NT_XENT) ----


def _small_inputs():
    rows, cols, pos, self_idx, _ = make_case(6, 10, 4, 1.0, seed=10)
    return rows.float(), cols.float(), pos, self_idx


def test_dispatch_ref_never_calls_the_op(monkeypatch):
    monkeypatch.setenv("SSL_NT_XENT", "ref")

    def boom(*a, **k):
        raise AssertionError("the op must not be called with SSL_NT_XENT=ref")

    monkeypatch.setattr(op, "nt_xent_fused", boom)
    out = losses.nt_xent_rows(*_small_inputs(), 0.1)
    assert out.shape == (6,)


def test_dispatch_ext_fails_loudly_when_missing(monkeypatch):
    monkeypatch.setenv("SSL_NT_XENT", "ext")
    monkeypatch.setattr(op, "available", lambda device: False)
    with pytest.raises(RuntimeError, match="SSL_NT_XENT=ext"):
        losses.nt_xent_rows(*_small_inputs(), 0.1)


def test_dispatch_auto_falls_back_to_reference(monkeypatch):
    monkeypatch.setenv("SSL_NT_XENT", "auto")
    monkeypatch.setattr(op, "available", lambda device: False)
    rows, cols, pos, self_idx = _small_inputs()
    out = losses.nt_xent_rows(rows, cols, pos, self_idx, 0.1)
    assert torch.equal(out, nt_xent_reference(rows, cols, pos, self_idx, 0.1))


def test_dispatch_rejects_unknown_value(monkeypatch):
    monkeypatch.setenv("SSL_NT_XENT", "fast")
    with pytest.raises(ValueError, match="SSL_NT_XENT"):
        losses.nt_xent_rows(*_small_inputs(), 0.1)


def test_no_import_cycle_between_losses_and_the_op():
    """losses imports nt_xent_op (lazily, optional); nt_xent_op imports nothing from losses."""
    import ast

    tree = ast.parse((ROOT / "common" / "nt_xent_op.py").read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            imported |= {f"{node.module}.{a.name}" for a in node.names} | {node.module or ""}
        elif isinstance(node, ast.Import):
            imported |= {a.name for a in node.names}
    assert not any("losses" in m for m in imported), imported


def test_available_is_false_when_not_loaded(monkeypatch):
    monkeypatch.setattr(op, "_LOAD_ERROR", "ImportError: test")
    assert not op.available("cpu") and not op.available("cuda")
    assert "test" in op.load_error()


@needs_ext
@pytest.mark.parametrize("impl", ["ext", "auto"])
def test_dispatch_uses_the_op(monkeypatch, impl):
    monkeypatch.setenv("SSL_NT_XENT", impl)
    calls = []
    real = op.nt_xent_fused

    def spy(*a, **k):
        calls.append(1)
        return real(*a, **k)

    assert op.self_check("cpu", 4) is None  # the first-use check (in a child process)
    monkeypatch.setattr(op, "nt_xent_fused", spy)
    rows, cols, pos, self_idx = _small_inputs()
    out = losses.nt_xent_rows(rows, cols, pos, self_idx, 0.1)
    assert calls == [1]
    assert losses.nt_xent_impl_used() == "ext"
    torch.testing.assert_close(out, nt_xent_reference(rows, cols, pos, self_idx, 0.1))


@needs_ext
def test_nt_xent_loss_ext_equals_ref(monkeypatch):
    """The training-script entry point (z1, z2 -> mean loss) gives the same loss and input
    gradients through the op and through the reference."""
    g = torch.Generator().manual_seed(11)
    z1, z2 = torch.randn(24, 16, generator=g) * 3, torch.randn(24, 16, generator=g)
    out = {}
    for impl in ("ext", "ref"):
        monkeypatch.setenv("SSL_NT_XENT", impl)
        a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
        loss = losses.nt_xent_loss(a, b, 0.1)
        loss.backward()
        out[impl] = (loss.detach(), a.grad, b.grad)
    for x, y in zip(out["ext"], out["ref"]):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


# ---- the first-use check (a child process, a per-machine cached verdict) ----


@needs_ext
def test_self_check_passes_and_is_cached_cpu(monkeypatch, tmp_path):
    monkeypatch.setenv("SSL_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(op, "_SELF_CHECK", {})
    state = torch.random.get_rng_state()
    assert op.self_check("cpu", 128) is None
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is left alone
    assert len(list((tmp_path / "nt_xent_check").glob("*.json"))) == 1  # the verdict, on disk

    def boom(*a, **k):
        raise AssertionError("a cached verdict must not start another check")

    monkeypatch.setattr(op, "_run_child", boom)
    assert op.self_check("cpu", 128) is None  # the in-process memo
    monkeypatch.setattr(op, "_SELF_CHECK", {})  # as a new process on the same machine
    assert op.self_check("cpu", 128) is None
    assert op.self_check("cpu", 4) is None  # d = 4 takes the code path d = 37 checked


def test_check_widths_cover_every_code_path():
    assert op._check_ds(128) == [37, 128] and op._check_ds(5) == [37, 128]
    assert op._check_ds(256) == [37, 128, 256] and op._check_ds(320) == [37, 128, 320]
    assert op._check_ds(64) == [37, 64, 128]


def test_one_process_runs_the_check_the_others_wait(monkeypatch, tmp_path):
    """torchrun's ranks on one node: the file lock lets one run the check; the others wait and
    read its verdict."""
    import threading

    monkeypatch.setenv("SSL_CACHE_DIR", str(tmp_path))
    calls = []

    def slow_child(device, ds, timeout):
        calls.append(ds)
        threading.Event().wait(0.5)  # overlap with the other callers
        return "verdict of the one run"

    monkeypatch.setattr(op, "_run_child", slow_child)
    out: list = []
    threads = [
        threading.Thread(target=lambda: out.append(op._verdict(torch.device("cpu"), 128)))
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and out == ["verdict of the one run"] * 4


@needs_ext
@pytest.mark.parametrize(
    "hook,cause",
    [
        ("abort", "crashed (SIGABRT)"),
        ("hang", "hung: no verdict within"),
        ("wrong", "loss differs from the fp64 reference"),
    ],
)
def test_first_use_check_failure_keeps_the_parent_healthy(monkeypatch, tmp_path, hook, cause):
    """The child aborts (a kernel fault), hangs or computes a wrong loss: `auto` warns once,
    naming the cause, and uses the reference; `ext` raises; the parent process is untouched and
    the op itself still runs in it."""
    monkeypatch.setenv("SSL_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("SSL_NT_XENT_CHECK_HOOK", hook)
    monkeypatch.setenv("SSL_NT_XENT_CHECK_TIMEOUT", "10")
    monkeypatch.setattr(op, "_SELF_CHECK", {})
    monkeypatch.setattr(losses, "_SELF_CHECK_WARNED", set())
    monkeypatch.setenv("SSL_NT_XENT", "auto")
    rows, cols, pos, self_idx = _small_inputs()
    with pytest.warns(UserWarning, match="self-check") as rec:
        out = losses.nt_xent_rows(rows, cols, pos, self_idx, 0.1)
    assert any(cause in str(w.message) for w in rec), [str(w.message) for w in rec]
    assert torch.equal(out, nt_xent_reference(rows, cols, pos, self_idx, 0.1))
    assert losses.nt_xent_impl_used() == "ref (fallback: self-check failed)"
    monkeypatch.setenv("SSL_NT_XENT", "ext")
    monkeypatch.setattr(op, "_SELF_CHECK", {})  # a new process: the verdict comes from disk
    monkeypatch.setattr(op, "_run_child", lambda *a: pytest.fail("verdict not cached"))
    with pytest.raises(RuntimeError, match="self-check"):
        losses.nt_xent_rows(rows, cols, pos, self_idx, 0.1)
    # the parent is healthy: the op runs here and agrees with the reference
    torch.testing.assert_close(
        op.nt_xent_fused(rows, cols, pos, self_idx, 0.1),
        nt_xent_reference(rows, cols, pos, self_idx, 0.1),
    )


def _wrong_grad(real):
    # same loss values, gradient w.r.t. rows off by 1e-2 per element
    return lambda r, c, p, s, T, **k: (
        real(r, c, p, s, T, **k) + 1e-2 * (r.sum(1) - r.sum(1).detach())
    )


@needs_ext
def test_check_compares_both_gradients_and_every_dtype(monkeypatch):
    """The comparison itself, in-process (the child runs the same function)."""
    orig = op.nt_xent_fused
    seen = []

    def spy(r, *a, **k):
        seen.append(r.dtype)
        return orig(r, *a, **k)

    monkeypatch.setattr(op, "nt_xent_fused", spy)
    assert op._run_self_check(torch.device("cpu"), 37) is None
    assert seen == [torch.float32, torch.bfloat16, torch.float16]
    assert "loss differs" in op._run_self_check(torch.device("cpu"), 37, hook="wrong")
    monkeypatch.setattr(op, "nt_xent_fused", _wrong_grad(orig))
    assert "grad rows differs" in op._run_self_check(torch.device("cpu"), 37)


# ---- memory: O(B d), never R x C ----

_MEM_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from common import nt_xent_op as op
    from common.losses import nt_xent_reference

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024  # kB -> bytes
        raise KeyError(key)

    impl, n, d = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    f = op.nt_xent_fused if impl == "op" else nt_xent_reference
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(n, d, generator=g).requires_grad_()
    cols = torch.randn(n, d, generator=g).requires_grad_()
    i = torch.arange(n)
    pos, self_idx = (i + n // 2) % n, i
    # warm-up at a small size: thread pools, BLAS buffers, lazy initialisation
    f(rows[:256], cols[:256], pos[:256] % 256, self_idx[:256], 0.1).sum().backward()
    rows.grad = cols.grad = None
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # reset the peak-RSS counter (VmHWM) to the current RSS
    base = status("VmRSS:")
    loss = f(rows, cols, pos, self_idx, 0.1)
    loss.mean().backward()
    print(status("VmHWM:") - base)
    """
)


def _peak_extra_bytes(impl: str, n: int, d: int) -> int:
    # every allocation >= 64 KiB via mmap: freed memory leaves the RSS, peaks are not hidden
    env = dict(os.environ, PYTHONPATH=str(ROOT), MALLOC_MMAP_THRESHOLD_="65536")
    res = subprocess.run(
        [sys.executable, "-c", _MEM_SCRIPT, impl, str(n), str(d)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=300,
    )
    if res.returncode != 0 and "clear_refs" in res.stderr:
        pytest.skip("cannot reset VmHWM (/proc/self/clear_refs) on this kernel")
    assert res.returncode == 0, res.stderr
    return int(res.stdout.strip().splitlines()[-1])


@needs_ext
def test_memory_is_O_Bd_at_16k_cpu():
    """2N = 16,384, d = 128: forward + backward of the op needs far less than the 1 GiB a single
    16k x 16k fp32 logit matrix takes. The grads of rows and cols alone are 2 x 8 MiB."""
    extra = _peak_extra_bytes("op", 16384, 128)
    assert extra < 128 * 2**20, f"peak extra RSS {extra / 2**20:.1f} MiB"
    # The measurement itself can see an R x C allocation: the reference at 2N = 4096 needs at
    # least one 4k x 4k fp32 matrix (64 MiB).
    ref_extra = _peak_extra_bytes("ref", 4096, 128)
    assert ref_extra > 64 * 2**20, f"reference peak extra RSS {ref_extra / 2**20:.1f} MiB"


# ---- the CUDA kernels, emulated on the CPU (csrc/emu/nt_xent_emu.cpp) ----
# The same kernel source as the extension's CUDA path (csrc/nt_xent_kernels.cuh), compiled by the
# host compiler with 128 threads + barriers per block and an emulated WMMA: checks the GPU code's
# tiling, shared-memory layout, barriers and tensor-core operand layouts without a GPU.


def _load_emu(name: str, flags: list[str]) -> None:
    from torch.utils.cpp_extension import is_ninja_available, load

    if not is_ninja_available():
        pytest.skip(
            "the GPU-kernel emulator is built with torch.utils.cpp_extension.load: no ninja"
        )
    build = ROOT / "build" / name
    build.mkdir(parents=True, exist_ok=True)
    load(
        name=name,
        sources=[str(ROOT / "csrc" / "emu" / "nt_xent_emu.cpp")],
        extra_include_paths=[str(ROOT / "csrc")],
        extra_cflags=["-O2", "-std=c++20", "-fno-strict-aliasing", *flags],
        build_directory=str(build),
        is_python_module=False,
        verbose=False,
    )


@pytest.fixture(scope="module")
def emu_ops():
    _load_emu("ntx_emu", [])
    return torch.ops.ssl_ops_emu


# The race-checking build: GCC's ThreadSanitizer instrumentation with the emulator's own hooks
# (no TSan runtime), see csrc/emu/nt_xent_emu.cpp.
RACE_FLAGS = ["-DNTX_EMU_RACE=1", "-fsanitize=thread", "--param=tsan-instrument-func-entry-exit=0"]


@pytest.fixture(scope="module")
def emu_race():
    _load_emu("ntx_emu_race", RACE_FLAGS)
    e = torch.ops.ssl_ops_emu_race
    old = e.set_splits(1)  # every block streams all tiles: buffer reuse across tiles
    yield e
    e.set_splits(old)
    e.set_disabled_barrier(0)
    e.race_mode(0)


# small (one tile, padding everywhere), odd (crossing the 64-row / 64-column tiles, d = 37: the
# scalar loads) and d = 64 (16-byte vector loads, two d-chunks of the WMMA k-loop); every dtype on
# the odd case (fp64/fp32: SIMT path, bf16/fp16: tensor-core path).
_BF, _HF, _F32, _F64 = torch.bfloat16, torch.float16, torch.float32, torch.float64
EMU_CASES = [
    (5, 7, 3, 0.5, _BF),
    (5, 7, 3, 0.5, _F32),
    (70, 130, 37, 0.1, _F64),
    (70, 130, 37, 0.1, _F32),
    (70, 130, 37, 0.1, _BF),
    (70, 130, 37, 0.1, _HF),
    (65, 129, 64, 0.07, _BF),
    (65, 129, 64, 0.07, _F32),
]
EMU_IDS = [f"R{c[0]}-C{c[1]}-d{c[2]}-{str(c[4]).split('.')[-1]}" for c in EMU_CASES]


def _emu_check(emu_ops, R, C, d, T, dtype, seed, mean_grad=False):
    """Emulated GPU kernels vs the fp64 reference (loss, both gradients); returns the inputs and
    outputs. mean_grad: the upstream gradient as autograd hands it over for .mean(), a
    stride-0 expand of 1 / R (else random weights)."""
    rows, cols, pos, self_idx, weight = make_case(R, C, d, 2.0, seed=seed)
    r, c = rows.to(dtype), cols.to(dtype)
    loss, lse, inv_r, inv_c = emu_ops.nt_xent_fwd(r, c, pos, self_idx, T)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert loss.dtype == lse.dtype == inv_r.dtype == inv_c.dtype == acc
    g = torch.tensor(1.0 / R, dtype=acc).expand(R) if mean_grad else weight.to(acc)
    grad_r, grad_c = emu_ops.nt_xent_bwd(g, r, c, pos, self_idx, lse, inv_r, inv_c, T)
    assert grad_r.dtype == grad_c.dtype == dtype
    r64, c64 = r.double().clone().requires_grad_(), c.double().clone().requires_grad_()
    ref = nt_xent_reference(r64, c64, pos, self_idx, T)
    (ref * g.double()).sum().backward()
    loss_tol, grad_tol = TOL[dtype]
    assert (loss.double() - ref.detach()).abs().max().item() <= loss_tol * max(
        1.0, ref.abs().max().item()
    )
    assert rel_err(grad_r, r64.grad) <= grad_tol, f"grad rows {rel_err(grad_r, r64.grad):.2e}"
    assert rel_err(grad_c, c64.grad) <= grad_tol, f"grad cols {rel_err(grad_c, c64.grad):.2e}"
    return loss, grad_r, grad_c, (r, c, pos, self_idx, lse, inv_r, inv_c)


@pytest.mark.parametrize("R,C,d,T,dtype", EMU_CASES, ids=EMU_IDS)
def test_emulated_gpu_kernels(emu_ops, R, C, d, T, dtype):
    _, _, _, (r, c, pos, self_idx, lse, inv_r, inv_c) = _emu_check(
        emu_ops, R, C, d, T, dtype, seed=R + d, mean_grad=R == 5
    )
    # the statistics handed from forward to backward agree with the CPU kernels' ones
    if op.available("cpu"):
        _, lse_cpu, ir_cpu, ic_cpu = torch.ops.ssl_ops.nt_xent_fwd(r, c, pos, self_idx, T)
        tol = 1e-5 if lse.dtype == torch.float32 else 1e-12
        for a, b in ((lse, lse_cpu), (inv_r, ir_cpu), (inv_c, ic_cpu)):
            torch.testing.assert_close(a, b, rtol=tol, atol=0)


@pytest.fixture
def emu_splits(emu_ops):
    """Set the emulator's forced split count for one test (0 = the 132-SM heuristic)."""
    old = emu_ops.set_splits(0)
    yield emu_ops.set_splits
    emu_ops.set_splits(old)


# The configurations the GPU runs (R << C as on one rank of 8, tails in both dimensions):
# bf16 d = 128 (4 k-chunks of 32, register accumulator ND = 2) and d = 256 (8 k-chunks, the
# global accumulator: bf16 keeps at most 2 d-chunks in registers),
# d = 320 (beyond the register budget: the global-memory accumulator), fp32 d = 128 (SIMT, ND = 4)
# and d = 160 (SIMT, global accumulator). Splits: the 132-SM heuristic (every column tile its
# own split here) and forced counts that do not divide the tiles.
EMU_SPLIT_CASES = [
    (20, 300, 128, 0.1, _BF, 0),
    (20, 300, 128, 0.1, _BF, 2),
    (70, 200, 256, 0.2, _BF, 0),
    (9, 150, 320, 0.1, _BF, 2),
    (70, 200, 128, 0.1, _F32, 3),
    (33, 130, 160, 0.3, _F32, 0),
    (10, 200, 64, 0.05, _HF, 3),
]
EMU_SPLIT_IDS = [
    f"R{c[0]}-C{c[1]}-d{c[2]}-{str(c[4]).split('.')[-1]}-splits{c[5] or 'auto'}"
    for c in EMU_SPLIT_CASES
]


@pytest.mark.parametrize("R,C,d,T,dtype,splits", EMU_SPLIT_CASES, ids=EMU_SPLIT_IDS)
def test_emulated_column_split(emu_ops, emu_splits, R, C, d, T, dtype, splits):
    emu_splits(splits)
    _emu_check(emu_ops, R, C, d, T, dtype, seed=R * d + C)


def test_emulated_split_deterministic_and_consistent(emu_ops, emu_splits):
    """Two runs are bit-identical; 1 split, 2 splits and the heuristic agree to fp32 rounding
    (the merge order is fixed, only the association of the sums differs)."""
    outs = {}
    for splits in (0, 0, 1, 2):
        emu_splits(splits)
        loss, grad_r, grad_c, _ = _emu_check(emu_ops, 40, 260, 64, 0.1, _F32, seed=3)
        outs.setdefault(splits, []).append((loss, grad_r, grad_c))
    for a, b in zip(*outs[0]):
        assert torch.equal(a, b)
    for s in (1, 2):
        for a, b in zip(outs[0][0], outs[s][0]):
            assert rel_err(a, b) <= 1e-5
            assert not torch.isnan(a).any()


def test_emulated_backward_skips_unneeded_pass(emu_ops):
    rows, cols, pos, self_idx, weight = make_case(30, 100, 16, 1.0, seed=21)
    r, c = rows.float(), cols.float()
    _, lse, ir, ic = emu_ops.nt_xent_fwd(r, c, pos, self_idx, 0.2)
    full = emu_ops.nt_xent_bwd(weight.float(), r, c, pos, self_idx, lse, ir, ic, 0.2)
    only_r = emu_ops.nt_xent_bwd(weight.float(), r, c, pos, self_idx, lse, ir, ic, 0.2, True, False)
    only_c = emu_ops.nt_xent_bwd(weight.float(), r, c, pos, self_idx, lse, ir, ic, 0.2, False, True)
    assert only_r[1].shape == (0, 16) and only_c[0].shape == (0, 16)
    assert torch.equal(only_r[0], full[0]) and torch.equal(only_c[1], full[1])


def test_emulated_out_of_range_indices_are_memory_safe(emu_ops):
    """The CUDA launchers do not check index ranges (that would read back to the host); the
    kernels only compare indices with tile positions, so an out-of-range pos_i gives loss_i = inf
    and leaves the other rows exact. C == 0 is a shape check and still raises."""
    rows, cols, pos, self_idx, _ = make_case(70, 130, 16, 1.0, seed=40)
    r, c = rows.float(), cols.float()
    good = emu_ops.nt_xent_fwd(r, c, pos, self_idx, 0.1)[0]
    bad_pos = pos.clone()
    bad_pos[3], bad_pos[60] = 130, -5
    loss = emu_ops.nt_xent_fwd(r, c, bad_pos, self_idx, 0.1)[0]
    assert torch.isinf(loss[3]) and torch.isinf(loss[60])
    keep = torch.ones(70, dtype=torch.bool)
    keep[[3, 60]] = False
    assert torch.equal(loss[keep], good[keep])
    with pytest.raises(RuntimeError, match="C == 0"):
        emu_ops.nt_xent_fwd(r, c[:0], pos, self_idx, 0.1)


@needs_ext
def test_validate_checks_indices_on_request(monkeypatch):
    r, c = torch.randn(4, 8), torch.randn(6, 8)
    s = torch.tensor([0, 1, 2, 3])
    with pytest.raises(RuntimeError, match="pos_idx value 6 is out of range"):
        op.nt_xent_fused(r, c, torch.tensor([1, 2, 3, 6]), s, 0.1, validate=True)
    monkeypatch.setenv("SSL_NT_XENT_VALIDATE", "1")
    with pytest.raises(RuntimeError, match="self_idx value -1 is out of range"):
        op.nt_xent_fused(r, c, torch.tensor([1, 2, 3, 4]), torch.tensor([0, -1, 2, 3]), 0.1)


def test_emulated_launchers_make_no_host_read(emu_ops):
    """The CUDA host code (the launchers in nt_xent_kernels.cuh, compiled into the emulator)
    returns from forward and backward without one device-to-host read: no .item(), no copy to
    the host, no data-dependent output size. Counted by a RecordFunction callback in C++, which
    sees every ATen op the launchers call."""
    for dtype, d in ((_BF, 64), (_F32, 37), (_F32, 160)):
        rows, cols, pos, self_idx, weight = make_case(70, 130, d, 1.0, seed=41)
        r, c = rows.to(dtype), cols.to(dtype)
        emu_ops.host_reads_start()
        _, lse, ir, ic = emu_ops.nt_xent_fwd(r, c, pos, self_idx, 0.1)
        fwd_reads = emu_ops.host_reads_stop()
        emu_ops.host_reads_start()
        emu_ops.nt_xent_bwd(weight.float(), r, c, pos, self_idx, lse, ir, ic, 0.1)
        bwd_reads = emu_ops.host_reads_stop()
        assert fwd_reads == [] and bwd_reads == [], (dtype, d, fwd_reads, bwd_reads)
    # the counter can fail: it sees the reads an op makes inside C++ (allclose -> .item())
    emu_ops.host_reads_start()
    torch.allclose(torch.ones(3), torch.ones(3))
    torch.ones(3).cpu()
    torch.ones(3).to("cpu")
    reads = emu_ops.host_reads_stop()
    assert "aten::_local_scalar_dense" in reads and reads.count("aten::to") >= 1, reads


@pytest.mark.parametrize("dtype", [_BF, _HF, _F32], ids=["bf16", "fp16", "fp32"])
def test_emulated_tiled_path(emu_ops, dtype):
    """The tiled path's CUDA code (host loop + elementwise kernels, GEMMs by at::mm) on the
    emulator: R != C, a chunk tail, against the fp64 reference; and no device-to-host read."""
    R, C, d, T = 70, 200, 40, 0.1
    rows, cols, pos, self_idx, weight = make_case(R, C, d, 2.0, seed=60)
    r, c = rows.to(dtype), cols.to(dtype)
    emu_ops.host_reads_start()
    loss, lse, ir, ic = emu_ops.nt_xent_tiled_fwd(r, c, pos, self_idx, T, 64)
    gr, gc = emu_ops.nt_xent_tiled_bwd(weight.float(), r, c, pos, self_idx, lse, ir, ic, T, 64)
    assert emu_ops.host_reads_stop() == []
    assert gr.dtype == gc.dtype == dtype
    r64, c64 = r.double().requires_grad_(), c.double().requires_grad_()
    ref = nt_xent_reference(r64, c64, pos, self_idx, T)
    (ref * weight).sum().backward()
    loss_tol, grad_tol = TOL[dtype]
    assert (loss.double() - ref.detach()).abs().max() <= loss_tol * max(1.0, ref.abs().max())
    assert rel_err(gr, r64.grad) <= grad_tol and rel_err(gc, c64.grad) <= grad_tol


def test_emulated_fp16_small_softmax_weights_do_not_flush(emu_ops):
    """fp16 G tiles of the column pass: G^T = softmax^T * w_r, w_r = g inv_r / max(g inv_r).
    One row with a 1e-5 norm makes w_r ~ 1e-5 for all the others; with C = 1,024 near-uniform
    probabilities (~1e-3) their G entries are ~1e-8, below fp16's smallest subnormal (6e-8).
    The gradient of a column that is no row's positive comes from these entries alone: stored
    as is they would flush to zero; the op stores fp16 G times 2^14."""
    R, C, d, T = 64, 1024, 16, 5.0
    g = torch.Generator().manual_seed(31)
    rows = torch.randn(R, d, generator=g, dtype=torch.float64) / 4
    cols = torch.randn(C, d, generator=g, dtype=torch.float64)
    rows[5] *= 1e-5
    pos = torch.randint(0, C, (R,), generator=g)
    self_idx = (pos + 1) % C
    weight = torch.rand(R, generator=g, dtype=torch.float64) + 0.5
    r, c = rows.half(), cols.half()
    _, lse, inv_r, inv_c = emu_ops.nt_xent_fwd(r, c, pos, self_idx, T)
    grad_r, grad_c = emu_ops.nt_xent_bwd(weight.float(), r, c, pos, self_idx, lse, inv_r, inv_c, T)
    r64, c64 = r.double().requires_grad_(), c.double().requires_grad_()
    (nt_xent_reference(r64, c64, pos, self_idx, T) * weight).sum().backward()
    tol = TOL[torch.float16][1]
    assert rel_err(grad_r, r64.grad) <= tol
    negatives_only = torch.ones(C, dtype=torch.bool)
    negatives_only[pos] = False
    err = rel_err(grad_c[negatives_only], c64.grad[negatives_only])
    assert err <= tol, f"grad of negative-only columns: rel err {err:.2e}"


# ---- the race checker and the barrier mutants ----

KERNELS = ROOT / "csrc" / "nt_xent_kernels.cuh"


def barrier_lines() -> dict[int, str]:
    """Header line -> text of every __syncthreads() in the kernels (the emulator knows each
    barrier by its line)."""
    import re

    out = {}
    for i, line in enumerate(KERNELS.read_text().splitlines(), 1):
        if re.match(r"\s*(if \(.*\) )?__syncthreads\(\);", line):
            out[i] = line.strip()
    return out


# (R, C, d, dtype): 70 rows = 2 row tiles, 140 columns = 3 column tiles (tails in both), one split:
# every block of the forward and of both backward passes streams several tiles. bf16 d = 128
# (4 k-chunks: the staging double buffer is refilled), fp16 d = 256 (the register accumulator
# with 4 d-chunks: B2 refilled; bf16 stops at 2), d = 37 (scalar loads) and d = 100 (scalar
# loads, 2 d-chunks), d = 320 (global accumulator), fp32 (SIMT) with the
# register and the global accumulator, and d = 0 (the barriers for an empty k-loop).
RACE_CASES = [
    (70, 140, 128, _BF),
    (70, 140, 37, _BF),
    (70, 140, 100, _BF),
    (70, 140, 256, _HF),
    (70, 140, 40, _F32),
    (40, 140, 160, _F32),
    (70, 140, 0, _BF),
    (70, 140, 0, _F32),
    (40, 140, 320, _BF),
]


def _race_run(e, R, C, d, dtype, mode, check=True) -> list[str]:
    """Forward + backward with race checking on (mode 1: cp.async data lands at the issue, 2: at
    the wait); returns the race reports (first entry: the count). check: the results must also
    equal the fp64 reference."""
    rows, cols, pos, self_idx, weight = make_case(R, C, max(d, 1), 2.0, seed=R + C + d)
    r, c = rows[:, :d].to(dtype).contiguous(), cols[:, :d].to(dtype).contiguous()
    e.race_mode(mode)
    try:
        loss, lse, ir, ic = e.nt_xent_fwd(r, c, pos, self_idx, 0.1)
        gr, gc = e.nt_xent_bwd(weight.float(), r, c, pos, self_idx, lse, ir, ic, 0.1)
    finally:
        e.race_mode(0)
    reports = e.races()
    if check and reports[0] == "0":
        r64, c64 = r.double().requires_grad_(), c.double().requires_grad_()
        ref = nt_xent_reference(r64, c64, pos, self_idx, 0.1)
        (ref * weight).sum().backward()
        assert (loss.double() - ref.detach()).abs().max() <= 1e-4 * max(1.0, ref.abs().max())
        if d > 0:
            assert rel_err(gr, r64.grad) <= TOL[dtype][1] and rel_err(gc, c64.grad) <= TOL[dtype][1]
    return reports


@pytest.mark.parametrize("mode", [1, 2], ids=["lands-at-issue", "lands-at-wait"])
def test_emulated_kernels_have_no_shared_memory_race(emu_race, mode):
    """bf16 d = 128, the training configuration: no two threads touch a shared byte in one
    barrier interval (one of them writing), with the cp.async data landing early or late."""
    assert _race_run(emu_race, 70, 140, 128, _BF, mode) == ["0"]


def test_race_checker_reports_a_missing_refill_barrier(emu_race):
    """The write-after-read barrier of the staging double buffer ("may be refilled"), removed:
    the checker reports the race between the old tile's reads and the refill's writes (the
    review found all emulator tests passing without it)."""
    lines = [n for n, t in barrier_lines().items() if "may be refilled (by iteration" in t]
    assert len(lines) == 1
    emu_race.barrier_lines()
    assert _race_run(emu_race, 70, 140, 128, _BF, 1) == ["0"]
    assert lines[0] in emu_race.barrier_lines()  # the build's line numbers are the header's
    old = emu_race.set_disabled_barrier(lines[0])
    try:
        reports = _race_run(emu_race, 70, 140, 128, _BF, 1, check=False)
    finally:
        emu_race.set_disabled_barrier(old)
    # The read of the old tile and the refill's write meet in one barrier interval. Emulated
    # threads are OS threads, so which comes first (and so RAW or WAR) varies from run to run.
    assert int(reports[0]) > 0, reports[:3]
    assert all(r.startswith(("RAW ", "WAR ")) for r in reports[1:]), reports[:3]


@pytest.mark.slow
def test_every_barrier_mutant_is_reported(emu_race):
    """Every __syncthreads() of the kernels, removed one at a time (the emulator skips the one
    on a given header line): the race checker reports each mutant on at least one of
    RACE_CASES, in one of the two cp.async landing modes; the unmutated kernels are race-free
    on all of them. About 2.5 minutes on 2 shared cores (pytest -m slow)."""
    coverage: dict[tuple, list[int]] = {}
    for case in RACE_CASES:
        emu_race.barrier_lines()
        for mode in (1, 2):
            assert _race_run(emu_race, *case, mode) == ["0"], case
        coverage[case] = emu_race.barrier_lines()
    lines = barrier_lines()
    reached = set().union(*coverage.values())
    assert set(lines) <= reached, f"barriers never executed: {set(lines) - reached}"
    missed = []
    for line in lines:
        old = emu_race.set_disabled_barrier(line)
        try:
            found = any(
                _race_run(emu_race, *case, mode, check=False)[0] != "0"
                for case in RACE_CASES
                if line in coverage[case]
                for mode in (1, 2)
            )
        finally:
            emu_race.set_disabled_barrier(old)
        if not found:
            missed.append(f"line {line}: {lines[line]}")
    assert not missed, "barrier mutants not reported:\n" + "\n".join(missed)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [_BF, _HF, _F32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("R,C,d", [(64, 2048, 128), (130, 1000, 256), (1, 700, 128)])
def test_emulated_large_sweep(emu_ops, emu_splits, R, C, d, dtype):
    """Longer sweep (pytest -m slow): the multi-GPU shape ratio at emulator scale."""
    _emu_check(emu_ops, R, C, d, 0.1, dtype, seed=R + C + d)


# ---- static resources of the CUDA kernels (bench/resource_table.py -> bench/RESULTS.md) ----


def _resource_rows() -> tuple[str, list[dict]]:
    sys.path.insert(0, str(ROOT / "bench"))
    import resource_table as rt

    text = (ROOT / "bench" / "RESULTS.md").read_text()
    assert rt.BEGIN in text and rt.END in text, "no resource table in bench/RESULTS.md"
    block = text.split(rt.BEGIN, 1)[1].split(rt.END, 1)[0]
    rows = []
    for line in block.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 10 and cells[0].startswith("`"):
            keys = ("regs", "spill_st", "spill_ld", "stack", "smem", "resident", "promise")
            rows.append(
                {"name": cells[0].strip("`"), "sm": int(cells[1]), "hot": cells[9] == "yes"}
                | dict(zip(keys, map(int, cells[2:9])))
            )
    return block, rows


def test_resource_table_is_current_and_hot_kernels_keep_their_promise():
    """The table was written from the current kernel sources (else: run
    python bench/resource_table.py), covers sm_80 and sm_90, and no hot kernel spills or holds
    fewer resident blocks per SM than its __launch_bounds__ promise."""
    sys.path.insert(0, str(ROOT / "bench"))
    import resource_table as rt

    block, rows = _resource_rows()
    assert f"`{rt.sources_hash()}`" in block, "stale table: run python bench/resource_table.py"
    hot = [r for r in rows if r["hot"]]
    assert {r["sm"] for r in hot} == {80, 90}
    assert any(r["name"].startswith("fwd_kernel<bf16") for r in hot)
    assert any(r["name"].startswith("tiled_fwd_chunk_kernel") for r in hot)
    bad = [
        f"{r['name']} sm_{r['sm']}: {r['spill_st']}/{r['spill_ld']} B spilled, "
        f"{r['resident']} resident < promise {r['promise']}"
        for r in hot
        if r["spill_st"] or r["spill_ld"] or r["resident"] < r["promise"]
    ]
    assert not bad, "\n".join(bad)


def test_resource_table_occupancy_rules():
    """The occupancy arithmetic against the figures of the review (sm_90, 128 threads)."""
    sys.path.insert(0, str(ROOT / "bench"))
    import resource_table as rt

    assert rt.resident_blocks(168, 48640, 90) == 3  # register-bound (shared memory allows 4)
    assert rt.resident_blocks(255, 48640, 90) == 2
    assert rt.resident_blocks(128, 48640, 90) == 4  # shared-memory-bound
    assert rt.resident_blocks(128, 48640, 80) == 3  # 164 KiB on sm_80
    assert rt.resident_blocks(32, 0, 90) == 16  # thread-bound
    log = (
        "ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_90'\n"
        "ptxas info    : Function properties for _Z3fooPf\n"
        "    8 bytes stack frame, 12 bytes spill stores, 36 bytes spill loads\n"
        "ptxas info    : Used 168 registers, used 1 barriers, 48640 bytes smem, 400 bytes cmem[0]\n"
    )
    (row,) = rt.parse_ptxas(log)
    assert (row["regs"], row["spill_st"], row["spill_ld"], row["smem"]) == (168, 12, 36, 48640)
    assert row["name"] == "foo"


# ---- CUDA (skipped without a GPU; run by bench/gpu_check.sh) ----

CUDA_CASES = CASES + [(300, 1000, 128, 0.1, 1.0), (1000, 2000, 64, 0.5, 10.0)]
CUDA_IDS = CASE_IDS + ["R300-C1000-d128-T0.1-s1", "R1000-C2000-d64-T0.5-s10"]


@needs_cuda
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"]
)
@pytest.mark.parametrize("R,C,d,T,scale", CUDA_CASES, ids=CUDA_IDS)
def test_matches_reference_cuda(R, C, d, T, scale, dtype):
    if dtype == torch.float16 and scale >= 1e3:
        scale = 30.0  # fp16 cannot hold the inputs themselves beyond 65504
    rows, cols, pos, self_idx, weight = make_case(R, C, d, scale, seed=R + C + d)
    check(rows, cols, pos, self_idx, weight, T, dtype, "cuda")


@needs_cuda
def test_fp64_cuda_exact():
    rows, cols, pos, self_idx, weight = make_case(70, 600, 9, 3.0, seed=1)
    check(rows, cols, pos, self_idx, weight, 0.1, torch.float64, "cuda")


@needs_cuda
def test_gradcheck_fp64_cuda():
    rows, cols, pos, self_idx, weight = make_case(4, 6, 3, 1.0, seed=7)
    r, c = rows.cuda().requires_grad_(), cols.cuda().requires_grad_()
    p, s, w = pos.cuda(), self_idx.cuda(), weight.cuda()
    assert torch.autograd.gradcheck(lambda a, b: op.nt_xent_fused(a, b, p, s, 0.3) * w, (r, c))


@needs_cuda
def test_deterministic_cuda():
    rows, cols, pos, self_idx, weight = make_case(300, 1100, 128, 1.0, seed=6)
    outs = []
    for _ in range(2):
        r = rows.cuda().bfloat16().requires_grad_()
        c = cols.cuda().bfloat16().requires_grad_()
        loss = op.nt_xent_fused(r, c, pos.cuda(), self_idx.cuda(), 0.1)
        (loss * weight.cuda().float()).sum().backward()
        outs.append((loss.detach(), r.grad, c.grad))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


@needs_cuda
def test_cuda_matches_cpu_op():
    rows, cols, pos, self_idx, weight = make_case(150, 700, 40, 1.0, seed=12)
    res = []
    for dev in ("cpu", "cuda"):
        (loss, gr, gc), _ = run_both(rows, cols, pos, self_idx, weight, 0.1, torch.float32, dev)
        res.append((loss, gr, gc))
    for a, b in zip(*res):
        assert rel_err(a, b) <= 2e-5


@needs_cuda
def test_opcheck_cuda():
    _opcheck("cuda")


@needs_cuda
def test_torch_compile_fullgraph_cuda():
    _compile_check("cuda", "inductor")


@needs_cuda
def test_cuda_bad_indices_are_safe_and_validated_on_request():
    """Out-of-range indices: inf loss without validation (no host sync in the op), an error with
    validate=True; the context stays usable; C == 0 raises."""
    r, c = torch.randn(4, 8, device="cuda"), torch.randn(6, 8, device="cuda")
    pos, s = torch.tensor([1, 2, 3, 4], device="cuda"), torch.tensor([0, 1, 2, 3], device="cuda")
    assert torch.isinf(op.nt_xent_fused(r, c, pos + 2, s, 0.1)[3])
    with pytest.raises(RuntimeError, match="out of range"):
        op.nt_xent_fused(r, c, pos + 2, s, 0.1, validate=True)
    with pytest.raises(RuntimeError, match="C == 0"):
        op.nt_xent_fused(r, c[:0], pos, s, 0.1)
    assert torch.isfinite(op.nt_xent_fused(r, c, pos, s, 0.1)).all()


@needs_cuda
@pytest.mark.parametrize("d", [64, 128, 256, 320])
def test_cuda_self_check_passes(d):
    assert op.self_check("cuda", d) is None


@needs_cuda
@pytest.mark.parametrize("R,C", [(1024, 8192), (100, 3000), (20, 20000)])
def test_cuda_column_split_shapes(R, C):
    """R << C (one rank's rows against the gathered columns): the split grid path."""
    rows, cols, pos, self_idx, weight = make_case(R, C, 128, 1.0, seed=R + C)
    for dtype in (torch.bfloat16, torch.float32):
        check(rows, cols, pos, self_idx, weight, 0.1, dtype, "cuda")


@needs_cuda
def test_cuda_noncontiguous_and_stream():
    """Non-contiguous inputs, and a side stream: results equal the default-stream ones."""
    rows, cols, pos, self_idx, weight = make_case(100, 300, 64, 1.0, seed=13)
    r_nc = rows.cuda().float().t().contiguous().t()  # column-major [R, d]
    base = op.nt_xent_fused(
        rows.cuda().float(), cols.cuda().float(), pos.cuda(), self_idx.cuda(), 0.1
    )
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        out = op.nt_xent_fused(r_nc, cols.cuda().float(), pos.cuda(), self_idx.cuda(), 0.1)
    s.synchronize()
    torch.testing.assert_close(out, base)
