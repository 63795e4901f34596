"""The NT-Xent op (csrc/, common/nt_xent_op.py) against the fp64 reference: the fused and the
tiled path on the CPU and on CUDA, the path and chunk settings, opcheck (fake kernels, schemas,
autograd), gradcheck, torch.compile, index validation and memory. Inputs and tolerances:
tests/nt_xent_cases.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from nt_xent_cases import (
    ROOT,
    check,
    make_case,
    needs_cuda,
    needs_ext,
    rel_err,
    run_both,
)

from common import nt_xent_op as op
from common.nt_xent import nt_xent_reference
from simclr import simclr_layout

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
    pos, self_idx = simclr_layout(n, 0, z.device)
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


@needs_ext
def test_validate_checks_indices_on_request(monkeypatch):
    r, c = torch.randn(4, 8), torch.randn(6, 8)
    s = torch.tensor([0, 1, 2, 3])
    with pytest.raises(RuntimeError, match="pos_idx value 6 is out of range"):
        op.nt_xent_fused(r, c, torch.tensor([1, 2, 3, 6]), s, 0.1, validate=True)
    monkeypatch.setenv("SSL_NT_XENT_VALIDATE", "1")
    with pytest.raises(RuntimeError, match="self_idx value -1 is out of range"):
        op.nt_xent_fused(r, c, torch.tensor([1, 2, 3, 4]), torch.tensor([0, -1, 2, 3]), 0.1)


@needs_ext
def test_set_splits_is_declared_in_every_build():
    """set_splits (the CUDA column-split test hook) is an op of every build: without CUDA kernels
    it only records the value (the CPU kernels have no split) and returns the previous one."""
    assert torch._C._dispatch_has_kernel("ssl_ops::set_splits")
    old = torch.ops.ssl_ops.set_splits(3)
    try:
        assert torch.ops.ssl_ops.set_splits(5) == 3
        rows, cols, pos, self_idx, weight = make_case(20, 30, 8, 1.0, seed=2)
        check(rows, cols, pos, self_idx, weight, 0.1, torch.float32, "cpu")  # the CPU: unaffected
    finally:
        assert torch.ops.ssl_ops.set_splits(old) == 5


# ---- memory: O(B d), never R x C ----

_MEM_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from common import nt_xent_op as op
    from common.nt_xent import nt_xent_reference

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
