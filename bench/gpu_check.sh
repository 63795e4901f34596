#!/usr/bin/env bash
# GPU check of the fused NT-Xent op on one H100 (Python 3.12, torch 2.11, nvcc 13.0, no network,
# no pip installs). Builds the extension in place for sm_90, runs the CUDA tests, then the
# benchmark on cuda (bf16 and fp32; 2N up to 262,144 for the op alone). Logs go to $OUT
# (default ./gpu_out); summary.txt has one line per step with its exit code and duration.
# Finishes in under 8 minutes: every step has its own timeout, further capped by what is left of
# an overall deadline (DEADLINE_S, default 470 s); a failing step does not stop the later ones, a
# step with under 10 s left is skipped. Steps are ordered by importance.
#
#   bash bench/gpu_check.sh            # from the repository root (or anywhere: it cd's there)
set -u -o pipefail
set -x

cd "$(dirname "$0")/.."
OUT="${OUT:-./gpu_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python}"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export PATH="$CUDA_HOME/bin:$PATH"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export SSL_BUILD_CUDA=1
export MAX_JOBS="${MAX_JOBS:-8}"
export PYTHONUNBUFFERED=1
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
T_ALL=$(date +%s)
DEADLINE_S="${DEADLINE_S:-470}"

# step NAME TIMEOUT_S CMD...: run CMD with a timeout, log to $OUT/NAME.log, record rc and time.
step() {
  local name=$1 limit=$2
  shift 2
  local t0 rc left
  t0=$(date +%s)
  left=$(( DEADLINE_S - (t0 - T_ALL) ))
  if (( left < 10 )); then
    echo "$name skipped: overall deadline reached" | tee -a "$SUMMARY"
    return 0
  fi
  (( limit > left )) && limit=$left
  timeout --signal=INT --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  echo "$name rc=$rc ${limit}s-limit took=$(( $(date +%s) - t0 ))s" | tee -a "$SUMMARY"
  tail -n 25 "$OUT/$name.log"
  return 0
}

step env 30 bash -c "nvidia-smi; $PY -c 'import sys, torch; print(sys.version); \
print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0))'; nvcc --version"

# Build in place (common/_C*.so); a clean build so that a stale CPU-only .so cannot be picked up.
rm -rf build common/_C*.so
step build 200 "$PY" setup.py build_ext --inplace

step smoke 45 "$PY" -c "
import torch
from common import nt_xent_op as op
from common.losses import nt_xent_reference
print('load error:', repr(op.load_error()), 'cpu:', op.available('cpu'), 'cuda:', op.available('cuda'))
z = torch.randn(512, 128, device='cuda')
i = torch.arange(512, device='cuda')
pos = (i + 256) % 512
for dt in (torch.float32, torch.bfloat16):
    a = op.nt_xent_fused(z.to(dt), z.to(dt), pos, i, 0.1)
    b = nt_xent_reference(z.to(dt).double(), z.to(dt).double(), pos, i, 0.1)
    print(dt, 'max |loss - ref| =', (a.double() - b).abs().max().item())
"

# CUDA tests (all named *cuda*); the CPU tests of the same file run last.
step test_cuda 120 "$PY" -m pytest tests/test_nt_xent_op.py -k cuda -q -rs -p no:cacheprovider

# Benchmarks. op + eager reference for both dtypes (the fp32 reference at 64k needs ~96 GiB and
# is reported as skipped), torch.compile(reference) at 16k only (compiling per shape is slow),
# then the op alone at 2N = 262,144 (the reference would need ~1.5 TiB).
step bench_cuda 110 "$PY" bench/bench_nt_xent.py --device cuda --dtypes bf16,fp32 \
  --sizes 1k,4k,16k,64k --impls op,eager --repeats 5 --budget-s 10 --out "$OUT/bench_cuda.md"
step bench_cuda_compile 80 "$PY" bench/bench_nt_xent.py --device cuda --dtypes bf16 \
  --sizes 16k --impls op,eager,compile --repeats 5 --budget-s 10 --out "$OUT/bench_cuda_compile.md"
step bench_cuda_256k 90 "$PY" bench/bench_nt_xent.py --device cuda --dtypes bf16,fp32 \
  --sizes 256k --impls op --repeats 3 --budget-s 20 --out "$OUT/bench_cuda_256k.md"

step test_cpu 90 "$PY" -m pytest tests/test_nt_xent_op.py -k "not cuda" -q -rs -p no:cacheprovider

echo "total $(( $(date +%s) - T_ALL ))s" | tee -a "$SUMMARY"
cat "$SUMMARY"
