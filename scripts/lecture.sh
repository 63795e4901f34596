#!/bin/bash
# The "Every method, every protocol" results on CIFAR-10 (CPU) of docs/results_cpu.md: pre-train
# every method for the same wall-clock budget, run every evaluation protocol on each run and on
# the random-init baselines, then regenerate docs/results_cpu.md's tables, the README's summary
# and docs/tsne_cpu.png. ("lecture": the course whose syllabus the repo implements, see
# docs/results_cpu.md.)
#
#   bash scripts/lecture.sh pretrain   # 6 methods x 6 min + context's neighbour-only ablation
#                                      # + MAE's 4 maskings x 3 epochs: ~55 min on 2 cores
#   bash scripts/lecture.sh evaluate   # every protocol for every run: ~75 min on 2 cores
#   bash scripts/lecture.sh seeds      # MAE's 4 maskings with seeds 1 and 2 (seed 0: pretrain),
#                                      # each probed: the ablation's mean +- std over 3 seeds
#   bash scripts/lecture.sh method-seeds  # SimCLR, RotNet, jigsaw and context (the summary's
#                                      # orders within 3 points) with seeds 0-2, each probed, and
#                                      # their untrained networks with init seeds 0-2: ~75 min
#   bash scripts/lecture.sh tables     # docs/results_cpu.md's tables (<!-- results:lecture_* -->),
#                                      # the README's summary (<!-- results:summary -->)
#   bash scripts/lecture.sh            # all three
#
# Runs go side by side, JOBS at a time (default 2, one core each: OMP_NUM_THREADS=1). A step
# whose output exists is skipped, so an interrupted stage is rerun by running it again.
# Environment: DATA (CIFAR-10), NETTE (Imagenette, a transfer target), RUNS (output root),
# JOBS, DRY=1 (print the commands a stage would run, run nothing).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data/cifar10-jpeg.tar.gz}
NETTE=${NETTE:-../shared/data/imagenette2-224.tar.gz}
R=${RUNS:-runs/lecture}
JOBS=${JOBS:-2}
if ((JOBS > 1)); then export OMP_NUM_THREADS=1; fi
BUDGET=6      # minutes of pre-training per method (--time-budget)
MAE_EPOCHS=3  # the masking ablation compares equal epochs, not equal minutes
MASKINGS=("random 0.75" "block 0.5" "block 0.75" "grid 0.75")  # MAE's masking ablation
SEEDS="1 2"   # extra seeds of the ablation (seed 0 is the pretrain stage's run)
METHODS="simclr rotnet jigsaw context colorize inpainting mae_random0.75"
# The summary's orders closer than 3 points: SimCLR against MAE (whose 3 seeds are the masking
# ablation's), RotNet, jigsaw and context against their untrained networks.
SEED_METHODS="simclr rotnet jigsaw context"
# Random-init baselines, one per distinct (architecture, input): the RGB ResNet-18 (width 16,
# CIFAR stem: simclr, rotnet, jigsaw and inpainting build the same untrained weights), context's
# (same net, green-magenta projected input), colorization's 1-channel ResNet, MAE's ViT.
BASELINES="simclr context colorize mae_random0.75"
PROBE=(--limit-train 10000)
FINETUNE=(--subset-dir "$R/subsets" --epochs 10 --batch-size 64)
# Full fine-tuning (every label) for as many steps as the 10% column: one epoch of 50,000 images,
# warm-up a tenth of it for every net (the ViT recipe's 5 epochs would leave the lr rising).
FULL_FT=(--subset-dir "$R/subsets" --pcts 100 --epochs 1 --batch-size 64 --warmup-epochs 0.1)
ROBUST=(--limit-train 10000 --limit-test 2000)

# Run the commands on stdin (one per line), JOBS at a time; fail if any fails. DRY=1: print
# them instead (what a stage would run now).
parallel() {
  if [[ -n ${DRY:-} ]]; then cat; else xargs -d '\n' -P "$JOBS" -I{} bash -c '{}'; fi
}
# A command line unless its result file exists.
todo() {
  local file=$1
  shift
  [[ -s $file ]] || echo "$*"
}
done_run() { grep -qs '"result"' "$1/log.jsonl"; }

# A run's folder: $R/NAME for seed 0, $R/NAME_sSEED for the others ($1 NAME, $2 SEED).
seed_dir() {
  if (($2 == 0)); then echo "$R/$1"; else echo "$R/$1_s$2"; fi
}

# The pre-training command of method $1 into $2 (seed $3: default 0): its CPU preset (SimCLR's
# fast one) for BUDGET minutes.
pretrain_cmd() {
  local preset=cpu
  [[ $1 == simclr ]] && preset=fast
  echo "python $1.py --preset $preset --time-budget $BUDGET ${3:+--seed $3 }--data $DATA --out $2 --fresh"
}

pretrain() {
  {
    for m in simclr rotnet jigsaw context colorize inpainting; do
      done_run "$R/$m" || pretrain_cmd "$m" "$R/$m"
    done
    # context's ablation: the position from the neighbour patch alone
    done_run "$R/context_neighbour_only" || echo "python context.py --preset cpu --time-budget $BUDGET --neighbour-only --data $DATA --out $R/context_neighbour_only --fresh"
    for mk in "${MASKINGS[@]}"; do
      read -r kind ratio <<<"$mk"
      done_run "$R/mae_$kind$ratio" || echo "python mae.py --preset cpu --epochs $MAE_EPOCHS --mask-type $kind --mask-ratio $ratio --data $DATA --out $R/mae_$kind$ratio --fresh"
    done
  } | parallel
}

# The MAE masking ablation again with seeds 1 and 2, each run probed as the seed-0 runs are
# (the probe's own train subset and seed stay fixed: only pre-training changes with the seed).
seeds() {
  local mk kind ratio s r
  {
    for s in $SEEDS; do
      for mk in "${MASKINGS[@]}"; do
        read -r kind ratio <<<"$mk"
        r=$R/mae_$kind${ratio}_s$s
        if ! done_run "$r"; then
          echo "python mae.py --preset cpu --epochs $MAE_EPOCHS --mask-type $kind --mask-ratio $ratio --seed $s --data $DATA --out $r --fresh && python linear_probe.py $r ${PROBE[*]}"
        else
          todo "$r/eval_linear.json" python linear_probe.py "$r" "${PROBE[@]}"
        fi
      done
    done
  } | parallel
}

# SEED_METHODS with seeds 0-2 (seed 0 is the pretrain stage's run, rerun here if missing), each
# probed with the probe's seed fixed; then the untrained networks (RGB ResNet, context's
# projected-input one) probed with init seeds 0-2 (--seed also draws the probe's subset).
method_seeds() {
  local m s r
  {
    for s in 0 $SEEDS; do
      for m in $SEED_METHODS; do
        r=$(seed_dir "$m" "$s")
        if ! done_run "$r"; then
          echo "$(pretrain_cmd "$m" "$r" "${s#0}") && python linear_probe.py $r ${PROBE[*]}"
        else
          todo "$r/eval_linear.json" python linear_probe.py "$r" "${PROBE[@]}"
        fi
      done
    done
  } | parallel
  {
    for s in 0 $SEEDS; do
      for m in simclr context; do
        r=$(seed_dir "$m" "$s")
        todo "$r/eval_linear_random_init.json" python linear_probe.py "$r" "${PROBE[@]}" --random-init --seed "$s"
      done
    done
  } | parallel
}

# Every protocol on one run; $2 = --random-init for its baseline ("" for the trained weights).
protocols() {
  local r=$1 s=${2:+_random_init} x=()
  [[ -n ${2:-} ]] && x=("$2")
  done_run "$r" || return 0 # not pre-trained (yet): nothing to evaluate
  todo "$r/eval_linear$s.json" python linear_probe.py "$r" "${PROBE[@]}" "${x[@]}"
  todo "$r/eval_cluster$s.json" python evaluate.py cluster "$r" "${x[@]}"
  todo "$r/eval_finetune$s.json" python finetune.py "$r" "${FINETUNE[@]}" "${x[@]}"
  todo "$r/eval_finetune_full$s.json" python finetune.py "$r" "${FULL_FT[@]}" "${x[@]}"
  todo "$r/eval_robustness$s.json" python evaluate.py robustness "$r" "${ROBUST[@]}" "${x[@]}"
  todo "$r/eval_transfer_imagenette2-224$s.json" python evaluate.py transfer "$r" --data "$NETTE" "${x[@]}"
  todo "$r/eval_transfer_digits$s.json" python evaluate.py transfer "$r" --data "$R/digits" "${x[@]}"
}

evaluate() {
  python scripts/digits_folder.py "$R/digits" # the second transfer target (scikit-learn's)
  {
    for m in $METHODS; do protocols "$R/$m"; done
    for m in $BASELINES; do protocols "$R/$m" --random-init; done
    # the masking ablation: probe and 10%-label fine-tuning of the other three maskings
    for m in mae_block0.5 mae_block0.75 mae_grid0.75; do
      done_run "$R/$m" || continue
      todo "$R/$m/eval_linear.json" python linear_probe.py "$R/$m" "${PROBE[@]}"
      todo "$R/$m/eval_finetune.json" python finetune.py "$R/$m" "${FINETUNE[@]}" --pcts 10
    done
    if done_run "$R/context_neighbour_only"; then
      todo "$R/context_neighbour_only/eval_linear.json" python linear_probe.py "$R/context_neighbour_only" "${PROBE[@]}"
    fi
  } | parallel
  # t-SNE of every method's test features, one panel each (once all are pre-trained)
  local runs=() m
  for m in $METHODS; do
    done_run "$R/$m" || return 0
    runs+=("$R/$m")
  done
  [[ -f $R/tsne.done ]] && return 0
  python evaluate.py tsne "${runs[@]}" --with-random-init --out docs --png tsne_cpu.png --no-save
  touch "$R/tsne.done"
}

tables() {
  local runs=()
  for m in $METHODS; do runs+=("$R/$m"); done
  # Commands are listed under each table in the page, not in a column (--no-commands).
  local doc=(--no-commands --update docs/results_cpu.md)
  python results_table.py "${runs[@]}" "$R/context_neighbour_only" --only pretrain linear "${doc[@]}" --marker lecture_probe
  for p in cluster finetune transfer robustness; do
    python results_table.py "${runs[@]}" --only "$p" "${doc[@]}" --marker "lecture_$p"
  done
  # the masking ablation, mean ± std over seeds 0-2 (fine-tuning: seed 0 only, in findings.md)
  local mae=() mk s
  for mk in "${MASKINGS[@]}"; do
    for s in "" $(printf "_s%s " $SEEDS); do mae+=("$R/mae_${mk/ /}$s"); done
  done
  python results_table.py "${mae[@]}" --seeds --only pretrain linear "${doc[@]}" --marker mae_ablation
  # the summary's close orders, mean ± std over seeds 0-2 (once the method-seeds stage ran)
  if done_run "$R/context_s2"; then
    local close=()
    for m in $SEED_METHODS; do
      for s in 0 $SEEDS; do close+=("$(seed_dir "$m" "$s")"); done
    done
    python results_table.py "${close[@]}" --seeds --only pretrain linear "${doc[@]}" --marker lecture_seeds
  fi
  python results_table.py "${runs[@]}" --narrow --update README.md --marker summary
}

case ${1:-all} in
pretrain) pretrain ;;
evaluate) evaluate ;;
seeds) seeds ;;
method-seeds) method_seeds ;;
tables) tables ;;
all) pretrain && evaluate && tables ;;
*)
  echo "usage: bash scripts/lecture.sh [pretrain|evaluate|seeds|method-seeds|tables]" >&2
  exit 2
  ;;
esac
