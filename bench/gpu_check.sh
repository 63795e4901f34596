#!/usr/bin/env bash
# GPU check of the fused NT-Xent op on a fresh GPU machine (e.g. one H100/H200: Python 3.12,
# torch 2.11, nvcc 13.0, maybe no network). In order of importance, under one overall deadline
# (DEADLINE_S, default 420 s = 7 minutes; every step has its own timeout, capped by what is left,
# and a step with under 10 s left is skipped; a failing step does not stop the later ones):
#   env          nvidia-smi, Python / torch / CUDA versions; the Python's bin directory (a venv
#                not activated) goes first on PATH, so its ninja and nvcc are the ones found
#   install      pip install ninja pytest numpy scikit-learn, and a CUDA build of torch when the
#                Python has none (or no torch at all), from the PyTorch index for the CUDA
#                major of nvcc (default cu130); best effort: without network the ones already
#                importable are used and a missing one is named clearly (the ninja *binary* is
#                checked, which torch's build needs, not the Python module)
#   toolkit      when no usable CUDA toolkit is found (setup.py's search), the compiler from the
#                nvidia pip wheels (nvidia-cuda-nvcc, -runtime, -cccl for torch's CUDA major),
#                merged into $OUT/cuda_wheels as a toolkit root for CUDA_HOME
#   cuda_version nvcc's CUDA major version must equal torch.version.cuda's (else the build fails:
#                said clearly, here, rather than as a compiler error)
#   build        python setup.py build_ext --inplace, CUDA forced (SSL_BUILD_CUDA=1), sm_90
#   test_cuda    the CUDA tests of tests/test_nt_xent_{op,check}.py (the first-use check); on a
#                machine with a visible GPU a skipped CUDA test is a failure (39 skipped tests
#                must not read as "rc=0")
#   bench_*      the op benchmark, bf16 unless named: first the targets (2N = 16k and 64k, and
#                the multi-GPU shape (R, C) = (1024, 8192); the tiled and fused CUDA paths,
#                eager and lean references, and which path the op should use per shape), the
#                2N = 262,144 case (tiled and fused) and the other multi-GPU shapes (512, 32768),
#                (4096, 65536); after the SimCLR run, 1k/4k and fp32, and torch.compile of the
#                reference last (compiling is slow)
#   simclr       a 2-minute simclr.py run at full width (ResNet-18, the gpu preset) on CIFAR-10
#                ($DATA; skipped when absent): img/s and the NT-Xent implementation it used
# The steps' own limits add up to more than the deadline: what runs out of time is the least
# important (the later steps), and the summary says so.
# Tables and logs go to $OUT (default ./gpu_out); summary.txt has one line per step with its
# exit code and duration.
#
#   bash bench/gpu_check.sh             # from anywhere (it cd's to the repository root)
#   bash bench/gpu_check.sh --dry-run   # no GPU needed: checks the environment logic and that
#                                       # every command parses (bench --dry-run, pytest
#                                       # --collect-only, simclr's argument parser); CI runs it
# Test hook: GPU_CHECK_VERDICT=LOG judges a saved pytest log as test_cuda would (GPU_VISIBLE=0|1)
# and exits with its verdict.
set -u -o pipefail

DRY=0
if [[ "${1:-}" == "--dry-run" ]]; then
  DRY=1
elif [[ $# -gt 0 ]]; then
  echo "usage: bash bench/gpu_check.sh [--dry-run]" >&2
  exit 2
fi

# cuda_tests_verdict LOG GPU_VISIBLE: 0 when the CUDA tests in LOG passed; on a machine with a
# visible GPU, any skipped test (the CUDA kernels missing, the GPU not seen by torch) or no
# passed test at all is a failure. Prints why.
cuda_tests_verdict() {
  local log=$1 gpu=$2 passed skipped failed
  passed=$(grep -Eo '[0-9]+ passed' "$log" | tail -n 1 | grep -Eo '[0-9]+')
  skipped=$(grep -Eo '[0-9]+ skipped' "$log" | tail -n 1 | grep -Eo '[0-9]+')
  failed=$(grep -Eo '[0-9]+ (failed|error)' "$log" | tail -n 1 | grep -Eo '[0-9]+')
  if [[ -n "$failed" && "$failed" != 0 ]]; then
    echo "CUDA TESTS FAILED: $failed failed"
    return 1
  fi
  if (( gpu )) && [[ -n "$skipped" && "$skipped" != 0 ]]; then
    echo "CUDA TESTS SKIPPED ON A GPU MACHINE: $skipped skipped (${passed:-0} passed)"
    return 1
  fi
  if (( gpu )) && [[ -z "$passed" || "$passed" == 0 ]]; then
    echo "NO CUDA TEST PASSED"
    return 1
  fi
  echo "cuda tests ok: ${passed:-0} passed, ${skipped:-0} skipped"
  return 0
}
if [[ -n "${GPU_CHECK_VERDICT:-}" ]]; then
  cuda_tests_verdict "$GPU_CHECK_VERDICT" "${GPU_VISIBLE:-1}"
  exit $?
fi

cd "$(dirname "$0")/.." || exit 2
OUT="${OUT:-./gpu_out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
PY="${PYTHON:-python}"
# The Python's own bin directory first (a venv that is not activated): its ninja, its nvcc.
PY_BIN="$(dirname "$(command -v "$PY" 2>/dev/null || echo "$PY")")"
export PATH="$PY_BIN:$PATH"
if [[ -n "${CUDA_HOME:-}" ]]; then
  export PATH="$CUDA_HOME/bin:$PATH"
fi
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export SSL_BUILD_CUDA=1
export MAX_JOBS="${MAX_JOBS:-16}"
export PYTHONUNBUFFERED=1
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
T_ALL=$(date +%s)
DEADLINE_S="${DEADLINE_S:-420}"
FAILED=0

note() { echo "$*" | tee -a "$SUMMARY"; }

# step NAME TIMEOUT_S CMD...: run CMD with a timeout, log to $OUT/NAME.log, record rc and time.
# Dry run: CMD is only printed, except where the caller passes a checking command through
# DRY_CMD (a command that parses the real one's arguments without running it).
step() {
  local name=$1 limit=$2
  shift 2
  local t0 rc left
  t0=$(date +%s)
  if (( DRY )); then
    if [[ -n "${DRY_CMD:-}" ]]; then
      bash -c "$DRY_CMD" > "$OUT/$name.log" 2>&1
      rc=$?
      (( rc != 0 )) && FAILED=1 && tail -n 20 "$OUT/$name.log"
      note "$name dry-run rc=$rc: $*"
    else
      note "$name dry-run (not run): $*"
    fi
    return 0
  fi
  left=$(( DEADLINE_S - (t0 - T_ALL) ))
  if (( left < 10 )); then
    note "$name skipped: overall deadline reached"
    return 0
  fi
  (( limit > left )) && limit=$left
  timeout --signal=INT --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  (( rc != 0 )) && FAILED=1
  note "$name rc=$rc ${limit}s-limit took=$(( $(date +%s) - t0 ))s"
  tail -n 25 "$OUT/$name.log"
  return 0
}

# "13.0" -> "13"; empty when there is no version.
major() { echo "${1%%.*}"; }

# CUDA release of nvcc ("13.0"), empty without nvcc.
nvcc_release() {
  command -v nvcc > /dev/null 2>&1 || return 0
  nvcc --version 2>/dev/null | sed -n 's/.*release \([0-9][0-9]*\.[0-9][0-9]*\).*/\1/p' | head -n 1
}

# ---- env (always runs: cheap, and the dry run checks that Python and torch import) ----
{
  echo "date: $(date -u +%Y-%m-%dT%H:%MZ)"
  command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version \
    --format=csv,noheader
  "$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__,
"cuda", torch.version.cuda, "gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available()
else None)'
  echo "nvcc: $(nvcc_release)"
} > "$OUT/env.log" 2>&1
note "env: $(tr '\n' ';' < "$OUT/env.log")"

GPU_VISIBLE=0
if command -v nvidia-smi > /dev/null 2>&1 && nvidia-smi -L 2> /dev/null | grep -q '^GPU'; then
  GPU_VISIBLE=1
fi
note "gpu visible: $GPU_VISIBLE"

# ---- install: best effort, then check what is importable ----
PKGS=(ninja pytest numpy scikit-learn)
pip_install() {  # pip_install TIMEOUT ARGS...: best effort, bounded (no network must not eat the deadline)
  local limit=$1
  shift
  timeout "$limit" "$PY" -m pip install -q --disable-pip-version-check --retries 0 --timeout 5 \
    "$@" >> "$OUT/install.log" 2>&1
}
if (( DRY )); then
  note "install dry-run (not run): pip install ${PKGS[*]}"
else
  pip_install 60 "${PKGS[@]}"
  note "install rc=$? (pip install ${PKGS[*]}; without network the installed ones are used)"
fi
# A CUDA build of torch when the Python has none (or no torch at all).
TORCH_STATE=$("$PY" -c 'import torch; print("cuda" if torch.version.cuda else "cpu")' 2> /dev/null \
  || echo "missing")
NVCC_MAJOR=$(major "$(nvcc_release)")
CU_TAG="cu${NVCC_MAJOR:-13}0"
if [[ "$TORCH_STATE" != "cuda" ]]; then
  if (( DRY )); then
    note "torch dry-run (not run): torch is $TORCH_STATE; would pip install torch --index-url" \
      "https://download.pytorch.org/whl/$CU_TAG"
  else
    pip_install 240 torch --index-url "https://download.pytorch.org/whl/$CU_TAG"
    note "torch install rc=$? (torch was $TORCH_STATE; CUDA build from the $CU_TAG index)"
  fi
fi
MISSING=$("$PY" - <<'EOF'
import importlib.util, shutil
mods = {"torch": "torch", "pytest": "pytest", "numpy": "numpy", "scikit-learn": "sklearn"}
miss = [p for p, m in mods.items() if importlib.util.find_spec(m) is None]
if shutil.which("ninja") is None:  # torch's build runs the ninja binary, not the module
    miss.append("ninja (binary on PATH)")
print(" ".join(miss))
EOF
)
if [[ -n "$MISSING" ]]; then
  note "MISSING PACKAGES: $MISSING (pip could not install them; the steps that need them fail)"
fi

# ---- toolkit: setup.py's search, else the compiler from the nvidia pip wheels ----
TORCH_CUDA=$("$PY" -c 'import torch; print(torch.version.cuda or "")' 2> /dev/null)
FOUND_HOME=$("$PY" -c 'import setup; print(setup.find_cuda_home() or "")' 2> /dev/null)
if [[ -n "$FOUND_HOME" ]]; then
  export CUDA_HOME="$FOUND_HOME"
  export PATH="$CUDA_HOME/bin:$PATH"
  note "toolkit: $CUDA_HOME"
elif [[ -n "$TORCH_CUDA" ]]; then
  TM=$(major "$TORCH_CUDA")
  SUFFIX=""
  (( TM < 13 )) && SUFFIX="-cu$TM"
  WHEELS=("nvidia-cuda-nvcc$SUFFIX==$TM.*" "nvidia-cuda-runtime$SUFFIX==$TM.*"
    "nvidia-cuda-cccl$SUFFIX==$TM.*")
  if (( DRY )); then
    note "toolkit dry-run (not run): no usable CUDA toolkit; would pip install ${WHEELS[*]}"
  else
    pip_install 120 "${WHEELS[@]}"
    note "toolkit: no usable CUDA toolkit; pip install ${WHEELS[*]} rc=$?"
    # One root with bin/nvcc, include/ (runtime + cccl + nvcc's crt) and lib64/libcudart.so.
    WH="$OUT/cuda_wheels"
    rm -rf "$WH" && mkdir -p "$WH/include" "$WH/lib64"
    NV=$("$PY" -c 'import nvidia; print(list(nvidia.__path__)[0])' 2> /dev/null)
    if [[ -n "$NV" && -x "$NV/cuda_nvcc/bin/nvcc" ]]; then
      for d in "$NV/cuda_nvcc"/*; do
        case "$(basename "$d")" in include | lib) ;; *) ln -s "$d" "$WH/" ;; esac
      done
      for inc in "$NV/cuda_nvcc/include" "$NV/cuda_runtime/include" "$NV/cuda_cccl/include"; do
        [[ -d "$inc" ]] && cp -rs "$inc"/. "$WH/include/" 2> /dev/null
      done
      for lib in "$NV"/cuda_runtime/lib/libcudart.so*; do ln -sf "$lib" "$WH/lib64/"; done
      if [[ ! -e "$WH/lib64/libcudart.so" ]]; then
        ln -sf "$(ls "$WH"/lib64/libcudart.so.* | head -n 1)" "$WH/lib64/libcudart.so"
      fi
      export CUDA_HOME="$WH"
      export PATH="$CUDA_HOME/bin:$PATH"
      note "toolkit: the nvidia wheels, merged into $WH"
    else
      note "toolkit: NONE (no toolkit found and the nvcc wheel is not installed)"
    fi
  fi
fi

# ---- cuda_version: nvcc's major must equal torch's ----
TORCH_CUDA=$("$PY" -c 'import torch; print(torch.version.cuda or "")' 2>/dev/null)
NVCC_CUDA=$(nvcc_release)
if ! "$PY" -c 'import torch' > /dev/null 2>&1; then
  note "CUDA VERSION CHECK: torch is not installed (and could not be installed): nothing to build"
  CUDA_OK=0
elif [[ -z "$TORCH_CUDA" ]]; then
  note "CUDA VERSION CHECK: torch is a CPU-only build (torch.version.cuda is None): no CUDA kernels"
  CUDA_OK=0
elif [[ -z "$NVCC_CUDA" ]]; then
  note "CUDA VERSION CHECK: no nvcc under CUDA_HOME=${CUDA_HOME:-} or on PATH: cannot build"
  CUDA_OK=0
elif [[ "$(major "$NVCC_CUDA")" != "$(major "$TORCH_CUDA")" ]]; then
  note "CUDA VERSION MISMATCH: nvcc is CUDA $NVCC_CUDA but torch was built with CUDA" \
    "$TORCH_CUDA; the extension cannot be built. Point CUDA_HOME at a CUDA" \
    "$(major "$TORCH_CUDA").x toolkit or install the matching torch."
  CUDA_OK=0
else
  note "cuda_version ok: nvcc $NVCC_CUDA, torch CUDA $TORCH_CUDA"
  CUDA_OK=1
fi
(( CUDA_OK )) || FAILED=1
if [[ -n "${GPU_CHECK_STOP_AFTER_ENV:-}" ]]; then  # test hook: the environment checks only
  exit "$FAILED"
fi

# ---- build: clean, so that a stale CPU-only .so cannot be picked up ----
if (( ! DRY )); then
  rm -rf build/temp* build/lib* common/_C*.so
fi
step build 200 "$PY" setup.py build_ext --inplace

TESTS=(tests/test_nt_xent_op.py tests/test_nt_xent_check.py -k cuda -q -rs -p no:cacheprovider)
DRY_CMD="$PY -m pytest ${TESTS[*]} --collect-only" step test_cuda 80 "$PY" -m pytest "${TESTS[@]}"
if (( ! DRY )); then
  VERDICT=$(cuda_tests_verdict "$OUT/test_cuda.log" "$GPU_VISIBLE") || FAILED=1
  note "test_cuda verdict: $VERDICT"
fi

# ---- benchmarks: the targets, 262,144 and the multi-GPU shapes first, torch.compile last ----
BENCH="$PY bench/bench_nt_xent.py --device cuda --repeats 5 --budget-s 5"
B_TARGETS="$BENCH --dtypes bf16 --sizes 16k,64k --shapes 1024x8192 \
--impls tiled,fused,eager,lean --out $OUT/bench_targets.md"
B_256K="$BENCH --dtypes bf16 --sizes 256k --impls tiled,fused --repeats 3 --out $OUT/bench_256k.md"
B_MULTI="$BENCH --dtypes bf16 --sizes '' --shapes 512x32768,4096x65536 \
--impls tiled,fused,eager,lean --out $OUT/bench_multi.md"
B_SQUARE="$BENCH --dtypes bf16,fp32 --sizes 1k,4k,16k --impls tiled,fused,eager,lean \
--out $OUT/bench_square.md"
B_COMPILE="$BENCH --dtypes bf16 --sizes 16k --shapes 1024x8192 --impls op,compile \
--out $OUT/bench_compile.md"
DRY_CMD="$B_TARGETS --dry-run" step bench_targets 60 bash -c "$B_TARGETS"
DRY_CMD="$B_256K --dry-run" step bench_256k 30 bash -c "$B_256K"
DRY_CMD="$B_MULTI --dry-run" step bench_multi 30 bash -c "$B_MULTI"
if (( ! DRY )); then  # which CUDA path the op should use, per shape (the benchmark's verdict)
  grep -h '^recommendation' "$OUT"/bench_targets.md "$OUT"/bench_256k.md "$OUT"/bench_multi.md \
    2> /dev/null | while read -r line; do note "$line"; done
fi

# ---- a 2-minute SimCLR run at full width (img/s, and which NT-Xent implementation ran) ----
DATA="${DATA:-}"
for cand in shared/data/cifar10-jpeg.tar.gz ../shared/data/cifar10-jpeg.tar.gz ./data; do
  [[ -z "$DATA" && -e "$cand" ]] && DATA=$cand
done
SIMCLR_ARGS="--preset gpu --width 64 --data ${DATA:-./data} --out $OUT/simclr --fresh \
--time-budget 2 --limit-test 2000 --knn-bank 10000 --log-every 20"
if [[ -z "$DATA" && $DRY -eq 0 ]]; then
  note "simclr skipped: no CIFAR-10 found (set DATA=...)"
else
  DRY_CMD="$PY -c 'import sys, simclr; simclr.get_args_parser().parse_args(sys.argv[1:])' \
$SIMCLR_ARGS" step simclr 160 bash -c "$PY simclr.py $SIMCLR_ARGS"
  if (( ! DRY )) && [[ -f "$OUT/simclr.log" ]]; then
    note "simclr: $(grep -E 'img/s' "$OUT/simclr.log" | tail -n 1)"
    note "simclr: $(grep -iE 'nt.?xent|impl' "$OUT/simclr.log" | tail -n 1)"
  fi
fi

DRY_CMD="$B_SQUARE --dry-run" step bench_square 60 bash -c "$B_SQUARE"
DRY_CMD="$B_COMPILE --dry-run" step bench_compile 60 bash -c "$B_COMPILE"

note "total $(( $(date +%s) - T_ALL ))s; any step failed: $FAILED"
cat "$SUMMARY"
# The dry run fails on a broken command (CI); a real run reports through summary.txt.
if (( DRY )); then
  exit "$FAILED"
fi
exit 0
