#!/usr/bin/env bash
# The anchor-eviction / EIT GPU study in commands of under 8 minutes each on one H100 (run from the checkout on
# the GPU host after the .gpu loads, see ../shared/OFFLINE.md; results land in $OUT, to be copied to
# benchmarks/results/ by hand):
#   bash benchmarks/gpu_eit.sh speed   # keep-mask attention: flex_attention vs SDPA + dense 4D mask, 8k, keep 0.3
#                                      # (random 8B-shaped tensors: needs no model, ~1-2 min with compilation)
#   bash benchmarks/gpu_eit.sh train   # EIT on SmolLM2 (~120 s of training), held-out evicted ppl before/after,
#                                      # then the before/after evaluation against kvpress's presses (~7 min total)
#   bash benchmarks/gpu_eit.sh trainonly; bash benchmarks/gpu_eit.sh eval   # the same in two commands, longer training
#   bash benchmarks/gpu_eit.sh analyze # attention received by token type on SmolLM2 (JSON + plot, ~1 min)
# TRAIN_SECONDS (default 120) sets the training budget of `train`; EVAL_SAMPLES (default 2) the synthetic samples.
# The adapter and the kvpress-layout run folders stay under /tmp (too many files for $OUT); a bf16 copy of the
# adapter (2 files, ~15 MB) comes back in $OUT/eit_adapter.
set -euo pipefail
cd "$(dirname "$0")/.."
source benchmarks/gpu_env.sh
out=${OUT:-/tmp/pressroom-out}
work=${EIT_WORK:-/tmp/pressroom-eit}
mkdir -p "$out" "$work"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
case "${1:-speed}" in
speed)
  python3 benchmarks/eit_attention_speed.py --output "$out/eit_attention_speed.json"
  ;;
train)
  python3 benchmarks/eit_train_smollm2.py --output "$out/eit_train_smollm2.json" --adapter-dir "$work/eit_smollm2" \
    --budget-seconds "${TRAIN_SECONDS:-120}" --export-adapter "$out/eit_adapter"
  python3 benchmarks/eit_eval.py --adapter "$work/eit_smollm2/best" --output "$out/eit_eval.json" \
    --runs-dir "$work/eit_eval_runs" --n-samples "${EVAL_SAMPLES:-2}"
  ;;
trainonly)  # a longer training alone (TRAIN_SECONDS=360 fits 8 minutes); then `eval` on the same (warm) host
  python3 benchmarks/eit_train_smollm2.py --output "$out/eit_train_smollm2.json" --adapter-dir "$work/eit_smollm2" \
    --budget-seconds "${TRAIN_SECONDS:-360}" --export-adapter "$out/eit_adapter"
  ;;
eval)  # the evaluation alone, on an adapter already on this host (EIT_ADAPTER, default the last `train`'s)
  python3 benchmarks/eit_eval.py --adapter "${EIT_ADAPTER:-$work/eit_smollm2/best}" --output "$out/eit_eval.json" \
    --runs-dir "$work/eit_eval_runs_$(date +%s)" --n-samples "${EVAL_SAMPLES:-3}"
  ;;
analyze)
  python3 -m pressroom.training.cli eit analyze --model smollm2 --corpus pg_essays --output "$out/eit_analysis" \
    --seq-len 4096 --n-sequences 4
  ;;
*) echo "usage: $0 speed|train|trainonly|eval|analyze" >&2; exit 2 ;;
esac
