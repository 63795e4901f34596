"""Fused NT-Xent op vs eager references vs torch.compile(reference), forward + backward.

    python bench/bench_nt_xent.py                                   # CPU, 2N in 1k,4k,16k,64k
    python bench/bench_nt_xent.py --device cuda --dtypes bf16,fp32 --sizes 1k,4k,16k,64k,256k
    python bench/bench_nt_xent.py --sizes "" --shapes 1024x8192,512x32768,4096x65536

Two layouts. --sizes 2N: SimCLR at world size 1, z [2N, d] is both the rows and the columns (as
nt_xent_loss passes them), backward to z. --shapes RxC: one rank of a multi-GPU run, R = 2n
local rows against C gathered columns (rows and cols separate leaves, both get gradients; the
local rows are columns 0..R-1's images). Loss = mean over the rows. Implementations: op (the
fused op at its default path: fused kernels on the CPU, tiled on CUDA), tiled / fused (the op with
its path forced: SSL_NT_XENT_PATH), eager (common.nt_xent.nt_xent_reference: F.normalize, matmul, a boolean self mask,
masked_fill, cross_entropy), lean (the leanest eager formulation: the same with the self
logits set to -inf in place, no mask and no copy), compile (torch.compile of the reference).
Per configuration it prints the
median fwd+bwd wall time, the peak extra memory (CPU: peak RSS above the pre-call RSS, via
VmHWM reset through /proc/self/clear_refs; CUDA: torch.cuda.max_memory_allocated above the
pre-call allocation), the speedup and the memory ratio against the eager reference, and the
throughput.

FLOP count (stated, not measured): model FLOPs = 8 * R * C * d per fwd+bwd, i.e. the forward
logit product (2RCd) plus three backward products of the same size (recomputed logits, G @ C,
G^T @ R). The op's deterministic two-pass backward recomputes the logit tile once per pass, so it
executes 10 * R * C * d; the eager reference executes 6 * R * C * d (it keeps the logits).
TFLOP/s below always uses the 8RCd model count, for every implementation. "%peak" relates it to
the dense tensor-core peak of an H100 SXM (989 TFLOP/s bf16/fp16; fp32 inputs: 67 TFLOP/s SIMT
fp32, the op does not use TF32).

Reference configurations that would not fit are reported as skipped (estimated memory above
the limit) or OOM, never crash the run: on CPU the reference is skipped when its estimated
~6 R x C fp32 buffers exceed --ref-mem-gib (default: 60% of RAM); 2N = 64k needs 16 GiB per
64k x 64k fp32 matrix.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import nt_xent_op as op  # noqa: E402
from common.nt_xent import nt_xent_reference  # noqa: E402
from simclr import simclr_layout  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PEAK_TFLOPS = {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}  # H100 SXM dense


def parse_shape(s: str) -> tuple[int, int]:
    r, c = s.lower().split("x")
    return parse_size(r), parse_size(c)


def nt_xent_lean(rows, cols, pos_idx, self_idx, temperature):
    """The leanest eager NT-Xent: no boolean R x C mask, self logits set to -inf in place
    (mm's and div's backward do not need their outputs), then cross_entropy."""
    acc = torch.float64 if rows.dtype == torch.float64 else torch.float32
    r = F.normalize(rows.to(acc), dim=1)
    c = F.normalize(cols.to(acc), dim=1)
    logits = (r @ c.t()).div_(temperature)
    logits[torch.arange(len(rows), device=rows.device), self_idx] = float("-inf")
    return F.cross_entropy(logits, pos_idx, reduction="none")


def parse_size(s: str) -> int:
    s = s.strip().lower()
    return int(float(s[:-1]) * 1024) if s.endswith("k") else int(s)


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _reset_cpu_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg()) + f" ({os.cpu_count()} CPUs)"
    except OSError:
        return "n/a"


def ram_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 16 * 2**30


class Runner:
    """One implementation at one shape: fwd + bwd of loss.mean(). R == C: z [2N, d] is rows and
    cols; R < C: rows [R, d] and cols [C, d] are separate leaves (one rank's view)."""

    def __init__(
        self, impl: str, R: int, C: int, d: int, dtype: torch.dtype, device: str, T: float
    ):
        self.device = torch.device(device)
        g = torch.Generator().manual_seed(0)
        self.z = torch.randn(C, d, generator=g).to(self.device, dtype).requires_grad_()
        self.rows = None
        if R != C:
            self.rows = torch.randn(R, d, generator=g).to(self.device, dtype).requires_grad_()
        self.pos, self.self_idx = simclr_layout(R // 2, 0, self.device)
        self.T = T
        self.impl = impl
        if impl == "op":  # the op as nt_xent_loss runs it (SSL_NT_XENT_PATH, default per device)
            self.fn = op.nt_xent_fused
        elif impl in ("tiled", "fused"):  # the op with its path forced

            def fn(r, c, p, s, t, _path=impl):
                return op.nt_xent_fused(r, c, p, s, t, path=_path)

            self.fn = fn
        elif impl == "eager":
            self.fn = nt_xent_reference
        elif impl == "lean":
            self.fn = nt_xent_lean
        elif impl == "compile":
            self.fn = torch.compile(nt_xent_reference, dynamic=False)
        else:
            raise ValueError(impl)

    def step(self) -> torch.Tensor:
        self.z.grad = None
        rows = self.z if self.rows is None else self.rows
        rows.grad = None
        loss = self.fn(rows, self.z, self.pos, self.self_idx, self.T).mean()
        loss.backward()
        return loss.detach()

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def warm(self, full: bool) -> None:
        """torch.compile specialises on the shape: warm it at full size; the others only need
        their thread pools / lazy state, a small slice will do."""
        if full:
            self.step()
        else:
            k = min(256, self.z.shape[0])
            i = torch.arange(k, device=self.device)
            z = self.z.detach()[:k].clone().requires_grad_()
            self.fn(z, z, (i + k // 2) % k, i, self.T).mean().backward()
        self.sync()

    def timing(self, repeats: int, warmup: int, budget_s: float) -> float:
        for _ in range(warmup):
            self.warm(full=self.impl == "compile")
        times: list[float] = []
        while not times or (len(times) < repeats and sum(times) < budget_s):
            t0 = time.perf_counter()
            self.step()
            self.sync()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    def peak_memory(self) -> int:
        """Peak extra bytes of one fwd+bwd above what is allocated before it (inputs)."""
        self.z.grad = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            base = torch.cuda.memory_allocated(self.device)
            self.step()
            self.sync()
            return torch.cuda.max_memory_allocated(self.device) - base
        if not _reset_cpu_peak():
            return -1
        base = _status_bytes("VmRSS:")
        self.step()
        return _status_bytes("VmHWM:") - base


def cpu_peak_memory_subprocess(impl: str, R: int, C: int, args, dname: str) -> int:
    """CPU peak RSS of one fwd+bwd, measured in a fresh process whose glibc serves (and returns)
    every allocation >= 64 KiB through mmap, so that freed memory cannot hide a peak. Timing runs
    in this process with the default allocator (mmap for everything would slow it down)."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    cmd = [sys.executable, __file__, "--mem-child", f"{impl}:{R}:{C}:{dname}", "--d", str(args.d)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"memory child failed: {res.stderr[-2000:]}")
    return int(res.stdout.strip().splitlines()[-1])


def ref_estimate_bytes(R: int, C: int) -> int:
    # logits, mask, masked logits, softmax / log-softmax and their grads: ~6 R x C fp32 buffers
    return 6 * R * C * 4


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--sizes", default="1k,4k,16k,64k", help="2N values, e.g. 1k,4k,16k,64k,256k")
    p.add_argument(
        "--shapes", default="", help="multi-GPU RxC shapes, e.g. 1024x8192,512x32768,4096x65536"
    )
    p.add_argument("--dtypes", default="fp32", help="comma list of fp32,bf16,fp16")
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.1)
    p.add_argument(
        "--impls",
        default="op,eager,compile",
        help="comma list of op,tiled,fused,eager,lean,compile (tiled / fused: the op with its "
        "path forced; op: its default path for the device)",
    )
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--budget-s", type=float, default=20.0, help="stop repeating after this")
    p.add_argument("--ref-max", type=parse_size, default=None, help="largest 2N for the references")
    p.add_argument("--ref-mem-gib", type=float, default=None, help="reference memory limit")
    p.add_argument("--out", default=None, help="also write the markdown table here")
    p.add_argument(
        "--dry-run", action="store_true", help="parse the arguments, print the plan and exit"
    )
    p.add_argument("--mem-child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.mem_child:  # internal: one CPU peak-memory measurement (see above)
        impl, R, C, dname = args.mem_child.split(":")
        runner = Runner(impl, int(R), int(C), args.d, DTYPES[dname], "cpu", args.temperature)
        runner.warm(full=impl == "compile")
        print(runner.peak_memory())
        return
    shapes = [(n, n) for n in (parse_size(s) for s in args.sizes.split(",") if s.strip())]
    shapes += [parse_shape(s) for s in args.shapes.split(",") if s.strip()]
    impls = [s.strip() for s in args.impls.split(",")]
    dnames = [s.strip() for s in args.dtypes.split(",")]
    bad = [i for i in impls if i not in ("op", "tiled", "fused", "eager", "lean", "compile")]
    bad += [dn for dn in dnames if dn not in DTYPES]
    if bad or not shapes:
        p.error(f"unknown impl/dtype {bad}" if bad else "no --sizes and no --shapes")
    if args.dry_run:
        print(f"plan: device {args.device}, dtypes {dnames}, impls {impls}, (R, C) {shapes}")
        return

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda but no GPU is visible")
    if "op" in args.impls and not op.available(args.device):
        print(f"note: the fused op is not built for {args.device}: {op.load_error()}")
    if args.device == "cuda":
        limit = torch.cuda.get_device_properties(0).total_memory * 0.9
        devname = torch.cuda.get_device_name(0)
    else:
        limit = ram_bytes() * 0.6
        devname = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    if args.ref_mem_gib is not None:
        limit = args.ref_mem_gib * 2**30

    lines = [
        f"device: {args.device} ({devname}); torch {torch.__version__}; d = {args.d}; "
        f"T = {args.temperature}; fwd+bwd of loss.mean(), median of up to {args.repeats} runs",
        "",
        f"load average before the run: {_load()}",
        "",
        "| R | C | dtype | impl | fwd+bwd ms | peak extra MiB | speedup vs eager | "
        "vs lean | eager mem / mem | TFLOP/s (8RCd) | % H100 peak | note |",
        "|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    print("\n".join(lines), flush=True)
    for dname in dnames:
        dtype = DTYPES[dname]
        for R, C in shapes:
            res: dict[str, tuple[float, int] | None] = {}
            notes: dict[str, str] = {}
            for impl in impls:
                if impl in ("op", "tiled", "fused") and not op.available(args.device):
                    res[impl], notes[impl] = None, "not built"
                    continue
                if impl not in ("op", "tiled", "fused"):
                    too_big = ref_estimate_bytes(R, C) > limit
                    if (args.ref_max is not None and C > args.ref_max) or too_big:
                        res[impl] = None
                        notes[impl] = (
                            f"skipped: needs ~{ref_estimate_bytes(R, C) / 2**30:.0f} GiB "
                            f"(limit {limit / 2**30:.0f} GiB)"
                            if too_big
                            else "skipped (--ref-max)"
                        )
                        continue
                runner = None
                try:
                    runner = Runner(impl, R, C, args.d, dtype, args.device, args.temperature)
                    t = runner.timing(args.repeats, args.warmup, args.budget_s)
                    if args.device == "cuda":
                        mem = runner.peak_memory()
                    else:
                        del runner
                        runner = None
                        gc.collect()
                        mem = cpu_peak_memory_subprocess(impl, R, C, args, dname)
                    res[impl] = (t, mem)
                    notes[impl] = ""
                except torch.OutOfMemoryError:
                    res[impl], notes[impl] = None, "OOM"
                except RuntimeError as e:  # e.g. CPU allocation failure
                    if "memory" not in str(e).lower():
                        raise
                    res[impl], notes[impl] = None, "OOM"
                finally:
                    del runner
                    gc.collect()
                    if args.device == "cuda":
                        torch.cuda.empty_cache()
            eager, lean = res.get("eager"), res.get("lean")
            flops = 8.0 * R * C * args.d
            for impl in impls:
                r = res.get(impl)
                if r is None:
                    row = (
                        f"| {R} | {C} | {dname} | {impl} | - | - | - | - | - | - | - "
                        f"| {notes[impl]} |"
                    )
                else:
                    t, mem = r
                    speed = f"{eager[0] / t:.2f}x" if eager else "-"
                    vs_lean = f"{lean[0] / t:.2f}x" if lean else "-"
                    memr = f"{eager[1] / mem:.1f}x" if eager and mem > 0 and eager[1] > 0 else "-"
                    tflops = flops / t / 1e12
                    pct = (
                        f"{100 * tflops / PEAK_TFLOPS[dname]:.1f}%"
                        if args.device == "cuda"
                        else "-"
                    )
                    mem_s = f"{mem / 2**20:.1f}" if mem >= 0 else "n/a"
                    row = (
                        f"| {R} | {C} | {dname} | {impl} | {1e3 * t:.1f} | {mem_s} | {speed} "
                        f"| {vs_lean} | {memr} | {tflops:.3f} | {pct} | {notes[impl]} |"
                    )
                lines.append(row)
                print(row, flush=True)
            tiled, fused = res.get("tiled"), res.get("fused")
            if tiled and fused:  # which path the op should use at this shape (gpu_check.sh)
                best = "tiled" if tiled[0] <= fused[0] else "fused"
                rec = (
                    f"recommendation: {R} x {C} {dname} on {args.device}: tiled "
                    f"{1e3 * tiled[0]:.1f} ms, fused {1e3 * fused[0]:.1f} ms -> "
                    f"SSL_NT_XENT_PATH={best}"
                )
                lines.append(rec)
                print(rec, flush=True)
    lines.append(f"\nload average after the run: {_load()}")
    print(lines[-1])
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
