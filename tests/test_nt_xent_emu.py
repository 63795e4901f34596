"""The CUDA kernels and their launchers (csrc/cuda/), emulated on the CPU by the test-only
emulator tests/emu/ (nt_xent_emu.cpp: the very same headers compiled by the host compiler with 128
threads + barriers per block, an emulated WMMA and deferred cp.async copies): results against
the fp64 reference, column splits, fp16 scaling, no host reads in the launchers, the tiled path's
CUDA code, and the race checker with its barrier mutants (every __syncthreads() removed in turn
must be reported; pytest -m slow). The emulator is built on demand (~1 minute per variant).
"""

from __future__ import annotations

import re

import pytest
import torch
from nt_xent_cases import _BF, _F32, _F64, _HF, ROOT, TOL, make_case, rel_err

from common import nt_xent_op as op
from common.nt_xent import nt_xent_reference

EMU = ROOT / "tests" / "emu"


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
        sources=[str(EMU / "nt_xent_emu.cpp")],
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
# (no TSan runtime), see tests/emu/race_checker.h.
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


def test_emulated_launchers_make_no_host_read(emu_ops):
    """The CUDA host code (the launchers in csrc/cuda/launch.cuh, compiled into the emulator)
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

KERNELS = ROOT / "csrc" / "cuda"
# The headers with barriers, in the emulator's order (kBarrierHeaders in tests/emu/cuda_emu.h): a
# barrier's id is 10000 x its header's number (from 1) plus its line there.
BARRIER_HEADERS = ("fused_tiles.cuh", "fused_kernels.cuh")
BARRIER = re.compile(r"\s*(if \(.*\) )?__syncthreads\(\);")


def barrier_lines() -> dict[int, str]:
    """Barrier id -> "header:line: text" of every __syncthreads() in the kernels (the emulator
    knows each barrier by that id)."""
    out = {}
    for n, name in enumerate(BARRIER_HEADERS, 1):
        for i, line in enumerate((KERNELS / name).read_text().splitlines(), 1):
            if BARRIER.match(line):
                out[10000 * n + i] = f"{name}:{i}: {line.strip()}"
    return out


def test_barrier_headers_are_the_emulators():
    """BARRIER_HEADERS is the emulator's list, and no other source of csrc/ has a barrier (the
    emulator refuses to compile one outside its list, the .cu is not compiled into it)."""
    emu_list = re.search(r"kBarrierHeaders\[\] = \{([^}]*)\}", (EMU / "cuda_emu.h").read_text())
    assert tuple(re.findall(r'"([^"]+)"', emu_list.group(1))) == BARRIER_HEADERS
    with_barriers = {
        p.name
        for p in (ROOT / "csrc").rglob("*")
        if p.suffix in (".cu", ".cuh", ".h", ".cpp") and "__syncthreads()" in p.read_text()
    }
    assert with_barriers == set(BARRIER_HEADERS)
    assert len(barrier_lines()) > 10


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
    assert lines[0] in emu_race.barrier_lines()  # the build's barrier ids are the headers'
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
            missed.append(lines[line])
    assert not missed, "barrier mutants not reported:\n" + "\n".join(missed)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [_BF, _HF, _F32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("R,C,d", [(64, 2048, 128), (130, 1000, 256), (1, 700, 128)])
def test_emulated_large_sweep(emu_ops, emu_splits, R, C, d, dtype):
    """Longer sweep (pytest -m slow): the multi-GPU shape ratio at emulator scale."""
    _emu_check(emu_ops, R, C, d, 0.1, dtype, seed=R + C + d)
