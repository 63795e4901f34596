#!/bin/bash
# SimCLR's design choices, the lecture's three claims, measured on CIFAR-10 at CPU scale with 3
# seeds each (docs/results_cpu.md, "SimCLR design ablations"):
#   - the projection head: none / linear / 2 layers (the paper's) / 3 layers (the official
#     code's), each probed on h (the trunk's output) and on z = g(h) (the paper's Figure 8);
#   - the batch size: 128 ... 2,048 at equal epochs (square-root lr scaling, the paper's
#     appendix B.1 advice for short runs), with the NT-Xent op's peak memory per size;
#   - the augmentations: crop / colour / crop + colour / crop + colour + blur, then crop plus
#     each of rotation, cutout, Gaussian noise and Sobel (the paper's Figures 4-5).
# Every run: the `fast` preset for 2 epochs of a fixed 10k-image train subset (fixed epochs, not a
# time budget, so that a slow moment of the machine changes no result), then the linear probe
# and k-NN of linear_probe.py on a fixed 10k train subset and all 10k test images. The 2-layer,
# batch-256 (linear lr scaling), crop + colour run is the shared baseline of the head and
# augmentation tables.
#
#   bash scripts/simclr_ablations.sh run      # 48 runs + probes, ~5 min each on one core: ~2 h
#   bash scripts/simclr_ablations.sh memory   # the NT-Xent op's peak memory per batch size
#   bash scripts/simclr_ablations.sh tables   # the tables, mean ± std over the seeds
#
# Runs go side by side, JOBS at a time (default 2, one core each); a run whose result exists is
# skipped. Environment: DATA, RUNS (default runs/ablations), JOBS, SEEDS, DRY=1 (print only).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data/cifar10-jpeg.tar.gz}
R=${RUNS:-runs/ablations}
JOBS=${JOBS:-2}
SEEDS=${SEEDS:-0 1 2}
if ((JOBS > 1)); then export OMP_NUM_THREADS=1; fi
BASE="--preset fast --limit-train 10000 --epochs 2"
PROBE="--limit-train 10000"
# name:flags (seed k > 0 goes to name_s<k>: results_table.py --seeds joins them)
HEAD=("head0:--proj-layers 0" "head1:--proj-layers 1" "base:" "head3:--proj-layers 3")
BATCH=()
for b in 128 256 512 1024 2048; do BATCH+=("batch$b:--batch-size $b --lr-scaling sqrt"); done
AUG=("crop:--aug crop" "color:--aug color" "base:" "crop_color_blur:--aug crop,color,blur")
for a in rotate cutout noise sobel; do AUG+=("crop_$a:--aug crop,$a"); done

parallel() {
  if [[ -n ${DRY:-} ]]; then cat; else xargs -d '\n' -P "$JOBS" -I{} bash -c '{}'; fi
}
done_run() { grep -qs '"result"' "$1/log.jsonl"; }
dir_of() { if [[ $2 == 0 ]]; then echo "$R/$1"; else echo "$R/$1_s$2"; fi; }

# One line per unfinished step: train (unless done), probe h, and for the head table probe z.
commands() {
  local entry name flags s d steps
  declare -A seen=()
  for entry in "${HEAD[@]}" "${BATCH[@]}" "${AUG[@]}"; do
    name=${entry%%:*} flags=${entry#*:}
    [[ -n ${seen[$name]:-} ]] && continue
    seen[$name]=1
    for s in $SEEDS; do
      d=$(dir_of "$name" "$s")
      steps=()
      done_run "$d" || steps+=("python simclr.py $BASE $flags --seed $s --data $DATA --out $d --fresh")
      [[ -s $d/eval_linear.json ]] || steps+=("python linear_probe.py $d $PROBE")
      if [[ $name == head* || $name == base ]] && [[ ! -s $d/eval_linear_head.json ]]; then
        steps+=("python linear_probe.py $d $PROBE --head")
      fi
      if [[ $name == base && $s == 0 && ! -s $d/eval_linear_random_init.json ]]; then
        steps+=("python linear_probe.py $d $PROBE --random-init") # the untrained baseline
      fi
      if ((${#steps[@]})); then
        local line=${steps[0]} i
        for ((i = 1; i < ${#steps[@]}; i++)); do line+=" && ${steps[i]}"; done
        echo "$line"
      fi
    done
  done
}

dirs() { # every seed's folder of a table's rows, those that exist ("seeds" counts them)
  local entry s d
  for entry in "$@"; do
    for s in $SEEDS; do
      d=$(dir_of "${entry%%:*}" "$s")
      if [[ -d $d ]]; then echo "$d"; fi
    done
  done
}

tables() {
  local doc=(--seeds --no-commands --update docs/results_cpu.md --only pretrain linear)
  local spec marker key runs
  for spec in "simclr_head proj_layers HEAD" "simclr_batch batch_size BATCH" "simclr_aug aug AUG"; do
    read -r marker key list <<<"$spec"
    local -n settings=$list
    mapfile -t runs < <(dirs "${settings[@]}")
    # the untrained network's probe (in the baseline's folder) as every table's last row
    local untrained=$R/base/eval_linear_random_init.json
    if [[ -s $untrained && ! " ${runs[*]} " =~ " $R/base " ]]; then runs+=("$untrained"); fi
    if ((${#runs[@]} == 0)); then
      echo "warning: no runs of $marker yet (bash scripts/simclr_ablations.sh run)" >&2
      continue
    fi
    python results_table.py "${runs[@]}" --config "$key" "${doc[@]}" --marker "$marker"
    python results_table.py "${runs[@]}" --config "$key" --seeds --brief \
      --update README.md --marker "${marker}_brief"
  done
}

case ${1:-} in
run) commands | parallel ;;
memory) python bench/bench_nt_xent.py --sizes 256,512,1k,2k,4k --impls op,eager --repeats 3 ;;
tables) tables ;;
*)
  echo "usage: bash scripts/simclr_ablations.sh run|memory|tables" >&2
  exit 2
  ;;
esac
