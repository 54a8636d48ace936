#!/usr/bin/env bash
# Plan and submit phases of the study, chained with --dependency=afterok.
#
#   slurm/submit_all.sh PHASE... --model M [--model M2 ...] [--output-dir DIR] [--throttle K] [--eit-gpus N]
#                       [--plan-args 'PHASE=ARGS'] [--dry-run] [header flags: see slurm/common.sh]
#
# PHASE: phase0_analyze phase1_baseline phase2_commvq phase2_eit phase3_eval_trained (or "all": the five).
# Each phase gets DIR/PHASE/manifest.jsonl (pressroom-eval plan --phase PHASE --model M... --output-dir DIR/PHASE
# plus that phase's --plan-args, e.g. --plan-args 'phase1_baseline=--ratio 0.25 0.5 --n-samples 20'), then
# slurm/submit.sh submits its unfinished tasks. A phase starts when every array of the previous phase number
# succeeded (afterok; phase2_commvq and phase2_eit both wait for phase 1, phase 3 for both). All manifests are
# planned before anything is submitted, so a bad setting submits nothing. Phases already done submit nothing
# and add no dependency. phase3_eval_trained evaluates AnchorPress with DIR/phase2_eit/M/final and CommVQPress
# with DIR/phase2_commvq/M/{bits}bit/em (or the --press specs given in its --plan-args). With more than one evaluation phase, a last
# job (afterany) writes one table over all of them: DIR/comparison.csv and DIR/scores.png.
# Prints "PHASE array ID [array ID ...] [aggregate ID]" per phase (and "study_aggregate ID") on stdout.
set -euo pipefail
# shellcheck source=slurm/common.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/common.sh"

usage() {
    sed -n '2,19p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

ALL=(phase0_analyze phase1_baseline phase2_commvq phase2_eit phase3_eval_trained)
PHASES=()
MODELS=()
OUT="./results/study"
THROTTLE=""
EIT_GPUS=""
DRY_RUN=0
FORWARD=()
declare -A PLAN_ARGS=()
EVAL_MANIFESTS=()
PRESSROOM_SBATCH_ARGS=()
while (($#)); do
    pressroom_header_flag "$@"
    if ((PRESSROOM_SHIFT > 0)); then
        FORWARD+=("${@:1:$PRESSROOM_SHIFT}")
        shift "$PRESSROOM_SHIFT"
        continue
    fi
    case "$1" in
    --model) MODELS+=("${2:?--model needs a value}") && shift 2 ;;
    --output-dir) OUT="${2:?--output-dir needs a directory}" && shift 2 ;;
    --throttle) THROTTLE="${2:?--throttle needs a number}" && shift 2 ;;
    --eit-gpus) EIT_GPUS="${2:?--eit-gpus needs a number}" && shift 2 ;;
    --plan-args)
        spec="${2:?--plan-args needs PHASE=ARGS}"
        [[ "$spec" == *=* ]] || pressroom_die "--plan-args takes PHASE=ARGS, got '$spec'"
        PLAN_ARGS["${spec%%=*}"]="${PLAN_ARGS["${spec%%=*}"]:-} ${spec#*=}"
        shift 2
        ;;
    --dry-run) DRY_RUN=1 && shift ;;
    -h | --help) usage ;;
    all) PHASES+=("${ALL[@]}") && shift ;;
    phase*) PHASES+=("$1") && shift ;;
    *) pressroom_die "unknown argument $1 (see --help)" ;;
    esac
done
((${#PHASES[@]})) || usage
((${#MODELS[@]})) || pressroom_die "give --model M (one or more)"
for phase in "${PHASES[@]}"; do
    [[ " ${ALL[*]} " == *" $phase "* ]] || pressroom_die "unknown phase '$phase'; phases: ${ALL[*]}"
done
for phase in "${!PLAN_ARGS[@]}"; do
    [[ " ${PHASES[*]} " == *" $phase "* ]] || pressroom_die "--plan-args for '$phase', which is not submitted"
done
export PRESSROOM_VENV PRESSROOM_SETUP
pressroom_activate
mkdir -p "$OUT/logs"
OUT="$(cd "$OUT" && pwd)"

# 1. plan every phase (nothing is submitted if one fails)
for phase in "${PHASES[@]}"; do
    read -r -a extra <<<"${PLAN_ARGS[$phase]:-}"
    [[ "$phase" == phase3_eval_trained ]] && extra=(--trained-dir "$OUT" "${extra[@]}")
    pressroom-eval plan "$OUT/$phase/manifest.jsonl" --phase "$phase" --model "${MODELS[@]}" \
        --output-dir "$OUT/$phase" "${extra[@]}" >&2
done

# 2. submit, each phase number after the previous one's arrays (afterok)
previous=""  # array job ids of the last phase number that submitted something
current=""
number=""
for phase in "${PHASES[@]}"; do
    n="${phase#phase}"
    n="${n%%_*}"
    if [[ "$n" != "$number" ]]; then
        [[ -n "$current" ]] && previous="$current"
        current=""
        number="$n"
    fi
    args=("$OUT/$phase/manifest.jsonl" "${FORWARD[@]}")
    [[ -n "$THROTTLE" ]] && args+=(--throttle "$THROTTLE")
    [[ "$phase" == phase2_eit && -n "$EIT_GPUS" ]] && args+=(--gpus "$EIT_GPUS")
    [[ -n "$previous" ]] && args+=(--dependency "afterok${previous// /:}")
    ((DRY_RUN)) && args+=(--dry-run)
    submitted="$(bash "$PRESSROOM_SLURM_HOME/submit.sh" "${args[@]}")"
    last="$(awk '$1 == "array" {id = $2} END {print id}' <<<"$submitted")"
    if [[ -n "$last" ]]; then
        current="$current $last" # the last stage's array: afterok on it implies every earlier stage
        all_ids="${all_ids:-} $last"
        echo "$phase $(tr '\n' ' ' <<<"$submitted" | sed 's/ $//')"
    else
        echo "$phase (nothing to submit)"
    fi
    [[ "$(pressroom-eval status "$OUT/$phase/manifest.jsonl" --format kinds)" == *eval* ]] &&
        EVAL_MANIFESTS+=("$OUT/$phase/manifest.jsonl")
done

# 3. one table over every evaluation phase (baselines next to trained presses), after everything
if ((${#EVAL_MANIFESTS[@]} > 1)) && [[ -n "${all_ids:-}" ]] && ((!DRY_RUN)); then
    pressroom_sbatch_header 0
    job="$(sbatch --parsable --job-name=study_aggregate "--output=$OUT/logs/%x-%j.out" "${PRESSROOM_HEADER[@]}" \
        "--dependency=afterany${all_ids// /:}" "$PRESSROOM_SLURM_HOME/aggregate.sbatch" "${EVAL_MANIFESTS[@]}" \
        --output-dir "$OUT")"
    echo "study_aggregate ${job%%;*}"
    echo "one table over ${EVAL_MANIFESTS[*]}: $OUT/comparison.csv (job ${job%%;*}, afterany)" >&2
fi
