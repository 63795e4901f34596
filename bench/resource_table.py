"""Static resources of the CUDA kernels of the NT-Xent op, as a checked table in bench/RESULTS.md.

    python bench/resource_table.py                 # nvcc -Xptxas -v for sm_80 and sm_90 (~2 min)
    python bench/resource_table.py --print-only    # print the table, leave RESULTS.md alone

Compiles csrc/cuda/nt_xent_cuda.cu once for sm_80 and sm_90 with `-Xptxas -v` (the flags of the
extension build), reads ptxas's per-kernel report (registers, spill stores / loads, static shared
memory, stack) and computes the resident blocks of 128 threads per SM from the registers (64K per
SM in 4 quadrants, allocated per warp in units of 256), the shared memory (164 / 228 KiB per SM
on sm_80 / sm_90, plus 1 KiB reserved per block), 2,048 threads and 32 blocks per SM. The
`promise` column is the kernel's __launch_bounds__ minimum blocks per SM. The table, with a hash
of the kernel sources, replaces the block between the two resource-table markers in
bench/RESULTS.md; tests/test_nt_xent_resources.py fails when a hot kernel spills, holds fewer
resident blocks than it promises, or when the sources changed since the table was written.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [  # what the CUDA kernels are compiled from, relative to csrc/
    "cuda/nt_xent_cuda.cu",
    "cuda/fused_config.cuh",
    "cuda/fused_tiles.cuh",
    "cuda/fused_kernels.cuh",
    "cuda/tiled_kernels.cuh",
    "cuda/launch.cuh",
    "nt_xent_tile.h",
    "nt_xent_tiled.h",
    "nt_xent.h",
]
BEGIN, END = "<!-- resource-table:begin -->", "<!-- resource-table:end -->"
THREADS = 128
SMEM_PER_SM = {80: 164 * 1024, 90: 228 * 1024}
# hot kernels: those whose run time scales with R x C (the others are O((R + C) d))
HOT = ("fwd_kernel", "bwd_kernel", "tiled_fwd_chunk_kernel", "tiled_bwd_chunk_kernel")


def sources_hash() -> str:
    h = hashlib.sha256()
    for name in SOURCES:
        h.update((ROOT / "csrc" / name).read_bytes())
    return h.hexdigest()[:16]


def resident_blocks(regs: int, smem: int, sm: int) -> int:
    """Blocks of THREADS threads per SM (the CUDA occupancy rules for sm_80 / sm_90)."""
    warps = THREADS // 32
    warp_regs = -(-max(regs, 1) * 32 // 256) * 256
    by_regs = 4 * (16384 // warp_regs) // warps  # 4 quadrants of 16K registers
    by_smem = SMEM_PER_SM[sm] // (smem + 1024) if smem > 0 else 32
    return min(by_regs, by_smem, 2048 // THREADS, 32)


def promise(name: str, k_min_blocks: int, bwd_min_blocks: int) -> int:
    """__launch_bounds__ minimum blocks of a kernel (see csrc/cuda/fused_config.cuh)."""
    if name.startswith("fwd_kernel"):
        return k_min_blocks
    if name.startswith("bwd_kernel"):
        return bwd_min_blocks
    return 1


def short_name(demangled: str) -> str:
    """'void ssl_ops::cuda_impl::fwd_kernel<c10::BFloat16>(...)' -> 'fwd_kernel<bf16>'."""
    s = re.sub(r"^void ", "", demangled)
    s = re.sub(r"\(.*$", "", s)
    s = s.replace("ssl_ops::cuda_impl::", "")
    for a, b in (("c10::BFloat16", "bf16"), ("c10::Half", "fp16"), ("float", "fp32")):
        s = s.replace(a, b)
    s = s.replace("double", "fp64").replace("true", "cols").replace("false", "rows")
    return s


def parse_ptxas(text: str) -> list[dict]:
    """Per (kernel, arch): regs, spill stores / loads (bytes), smem (bytes), stack (bytes)."""
    rows, cur = [], None
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '(\S+)' for 'sm_(\d+)'", line)
        if m:
            cur = {"mangled": m.group(1), "sm": int(m.group(2))}
            continue
        if cur is None:
            continue
        m = re.search(
            r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line
        )
        if m:
            cur["stack"], cur["spill_st"], cur["spill_ld"] = map(int, m.groups())
            continue
        m = re.search(r"Used (\d+) registers", line)
        if m:
            cur["regs"] = int(m.group(1))
            sm = re.search(r"(\d+) bytes smem", line)
            cur["smem"] = int(sm.group(1)) if sm else 0
            cur.setdefault("stack", 0)
            cur.setdefault("spill_st", 0)
            cur.setdefault("spill_ld", 0)
            rows.append(cur)
            cur = None
    names = subprocess.run(
        ["c++filt"], input="\n".join(r["mangled"] for r in rows), capture_output=True, text=True
    ).stdout.splitlines()
    for r, n in zip(rows, names):
        r["name"] = short_name(n)
    return rows


def min_blocks() -> tuple[int, int]:
    """(kMinBlocks of the forward, what bwd_min_blocks() returns) from the tile configuration."""
    text = (ROOT / "csrc" / "cuda" / "fused_config.cuh").read_text()
    fwd = int(re.search(r"constexpr int kMinBlocks = (\d+);", text).group(1))
    bwd = re.search(r"constexpr int bwd_min_blocks\(\) \{\s*return (\w+);", text).group(1)
    return fwd, fwd if bwd == "kMinBlocks" else int(bwd)


def compile_ptxas(nvcc: str, archs: list[int]) -> str:
    import torch.utils.cpp_extension as ce

    inc = [f"-I{p}" for p in ce.include_paths(device_type="cuda")]
    inc += [f"-I{sysconfig.get_paths()['include']}", f"-I{ROOT / 'csrc'}"]
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            nvcc,
            "-c",
            str(ROOT / "csrc" / "cuda" / "nt_xent_cuda.cu"),
            "-o",
            str(Path(tmp) / "k.o"),
            "-std=c++20",
            "-O3",
            "--threads",
            "2",
            "-Xptxas",
            "-v",
            "-D_GLIBCXX_USE_CXX11_ABI=1",
            "-DTORCH_EXTENSION_NAME=_C",
            "--compiler-options",
            "-fPIC",
            *ce.COMMON_NVCC_FLAGS,
            *gencode,
            *inc,
        ]
        res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"nvcc failed:\n{res.stderr[-4000:]}")
    return res.stdout + res.stderr


def table(rows: list[dict], src_hash: str) -> str:
    kmin, bmin = min_blocks()
    out = [
        f"Source hash: `{src_hash}` (csrc/{', csrc/'.join(SOURCES)}); "
        "`python bench/resource_table.py` rewrites this table.",
        "",
        "| kernel | sm | registers | spill stores B | spill loads B | stack B | static smem B "
        "| resident blocks / SM | promise | hot |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["name"], r["sm"])):
        res = resident_blocks(r["regs"], r["smem"], r["sm"])
        hot = "yes" if r["name"].startswith(HOT) else ""
        out.append(
            f"| `{r['name']}` | {r['sm']} | {r['regs']} | {r['spill_st']} | {r['spill_ld']} "
            f"| {r['stack']} | {r['smem']} | {res} | {promise(r['name'], kmin, bmin)} | {hot} |"
        )
    return "\n".join(out)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--archs", default="80,90", help="comma list of SM versions")
    p.add_argument("--nvcc", default=None, help="nvcc (default: $CUDA_HOME/bin/nvcc, PATH)")
    p.add_argument("--results", default=str(ROOT / "bench" / "RESULTS.md"))
    p.add_argument("--print-only", action="store_true")
    p.add_argument("--from-log", default=None, help="parse a saved ptxas log instead of compiling")
    return p


def main(args: argparse.Namespace) -> None:
    if args.from_log:
        text = Path(args.from_log).read_text()
    else:
        sys.path.insert(0, str(ROOT))
        from setup import find_cuda_home

        home = find_cuda_home()
        nvcc = args.nvcc or (str(Path(home) / "bin" / "nvcc") if home else shutil.which("nvcc"))
        if not nvcc:
            sys.exit("no nvcc: set CUDA_HOME or --nvcc")
        text = compile_ptxas(nvcc, [int(a) for a in args.archs.split(",")])
        log = ROOT / "build" / "ptxas.log"  # for --from-log
        log.parent.mkdir(exist_ok=True)
        log.write_text(text)
    md = table(parse_ptxas(text), sources_hash())
    print(md)
    if args.print_only:
        return
    path = Path(args.results)
    doc = path.read_text()
    if BEGIN in doc and END in doc:
        head, rest = doc.split(BEGIN, 1)
        doc = head + BEGIN + "\n" + md + "\n" + END + rest.split(END, 1)[1]
    else:
        doc += f"\n{BEGIN}\n{md}\n{END}\n"
    path.write_text(doc)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
