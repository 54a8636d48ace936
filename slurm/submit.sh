#!/usr/bin/env bash
# Submit a manifest's unfinished tasks as one Slurm job array, plus an aggregation job that runs after it.
#
#   slurm/submit.sh MANIFEST [--throttle K] [--dependency DEP] [--script PHASE.sbatch] [--no-aggregate]
#                   [--dry-run] [header flags: --partition --account --qos --gpus --cpus --mem --time
#                    --signal-before --venv --setup --log-dir --sbatch-arg; see slurm/common.sh]
#
# The array is --array=<unfinished indices>%K over the phase script named by the manifest's phase (or --script);
# tasks already done are not submitted, so running this again after a failure or a cancellation submits exactly
# what is missing, and nothing when all is done. A manifest in stages (e.g. KV collection, then one task per layer)
# gets one array per stage with unfinished tasks, each --dependency=afterok on the one before. When the manifest
# has evaluation tasks, `pressroom-eval aggregate MANIFEST` (the comparison table and plots, next to the manifest)
# is submitted with --dependency=afterany on the (last) array.
# Prints "array ID" per array and "aggregate ID" on stdout (nothing when nothing was submitted), the rest on stderr.
set -euo pipefail
# shellcheck source=slurm/common.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/common.sh"

usage() {
    sed -n '2,15p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

MANIFEST=""
THROTTLE=""
DEPENDENCY=""
SCRIPT=""
AGGREGATE=1
DRY_RUN=0
PRESSROOM_SBATCH_ARGS=()
while (($#)); do
    pressroom_header_flag "$@"
    if ((PRESSROOM_SHIFT > 0)); then
        shift "$PRESSROOM_SHIFT"
        continue
    fi
    case "$1" in
    --throttle) THROTTLE="${2:?--throttle needs a number}" && shift 2 ;;
    --throttle=*) THROTTLE="${1#*=}" && shift ;;
    --dependency) DEPENDENCY="${2:?--dependency needs a value}" && shift 2 ;;
    --dependency=*) DEPENDENCY="${1#*=}" && shift ;;
    --script) SCRIPT="${2:?--script needs a file}" && shift 2 ;;
    --script=*) SCRIPT="${1#*=}" && shift ;;
    --no-aggregate) AGGREGATE=0 && shift ;;
    --dry-run) DRY_RUN=1 && shift ;;
    -h | --help) usage ;;
    -*) pressroom_die "unknown option $1 (see --help)" ;;
    *)
        [[ -z "$MANIFEST" ]] || pressroom_die "one manifest at a time (got $MANIFEST and $1)"
        MANIFEST="$1" && shift
        ;;
    esac
done
[[ -n "$MANIFEST" ]] || usage
[[ -f "$MANIFEST" ]] || pressroom_die "manifest $MANIFEST does not exist; write it with pressroom-eval plan"
[[ -z "$THROTTLE" || "$THROTTLE" =~ ^[1-9][0-9]*$ ]] || pressroom_die "--throttle must be a positive number"
MANIFEST="$(cd "$(dirname "$MANIFEST")" && pwd)/$(basename "$MANIFEST")"
export PRESSROOM_VENV PRESSROOM_SETUP PRESSROOM_SLURM_HOME
pressroom_activate

STAGES="$(pressroom-eval status "$MANIFEST" --format stages)"
if [[ -z "$STAGES" ]]; then
    echo "nothing to submit: every task of $MANIFEST is done ($(pressroom-eval status "$MANIFEST"))" >&2
    exit 0
fi
PHASE="$(pressroom-eval status "$MANIFEST" --format phase)"
SCRIPT="${SCRIPT:-$PRESSROOM_SLURM_HOME/$PHASE.sbatch}"
[[ -f "$SCRIPT" ]] || pressroom_die "no sbatch script $SCRIPT for phase '$PHASE'; give --script FILE"
LOG_DIR="${PRESSROOM_LOG_DIR:-$(dirname "$MANIFEST")/logs}"
mkdir -p "$LOG_DIR"
LOG_DIR="$(cd "$LOG_DIR" && pwd)"

pressroom_sbatch_header
ARGS=(--parsable "--output=$LOG_DIR/%x-%A_%a.out" "${PRESSROOM_HEADER[@]}")
pressroom_sbatch_header 0 # the aggregation needs no GPU
AGG_ARGS=(--parsable "--job-name=${PHASE}_aggregate" "--output=$LOG_DIR/%x-%j.out" "${PRESSROOM_HEADER[@]}")

dependency="$DEPENDENCY"
ARRAY_JOB=""
while read -r stage ARRAY; do
    stage_args=("${ARGS[@]}" "--array=$ARRAY${THROTTLE:+%$THROTTLE}")
    [[ -n "$dependency" ]] && stage_args+=("--dependency=$dependency")
    if ((DRY_RUN)); then
        echo "sbatch ${stage_args[*]} $SCRIPT $MANIFEST" >&2
        ARRAY_JOB="<stage $stage>"
    else
        ARRAY_JOB="$(sbatch "${stage_args[@]}" "$SCRIPT" "$MANIFEST")"
        ARRAY_JOB="${ARRAY_JOB%%;*}"
        echo "array $ARRAY_JOB"
    fi
    echo "submitted $PHASE array job $ARRAY_JOB: tasks $ARRAY${THROTTLE:+ (at most $THROTTLE at a time)}" \
        "(stage $stage${dependency:+, after $dependency}) of $MANIFEST" >&2
    echo "logs: $LOG_DIR/$(basename "$SCRIPT" .sbatch)-${ARRAY_JOB}_<task>.out" >&2
    dependency="afterok:$ARRAY_JOB"
done <<<"$STAGES"

if ((AGGREGATE)) && [[ "$(pressroom-eval status "$MANIFEST" --format kinds)" == *eval* ]]; then
    if ((DRY_RUN)); then
        echo "sbatch ${AGG_ARGS[*]} --dependency=afterany:$ARRAY_JOB $PRESSROOM_SLURM_HOME/aggregate.sbatch $MANIFEST" >&2
        exit 0
    fi
    AGG_JOB="$(sbatch "${AGG_ARGS[@]}" "--dependency=afterany:$ARRAY_JOB" "$PRESSROOM_SLURM_HOME/aggregate.sbatch" "$MANIFEST")"
    AGG_JOB="${AGG_JOB%%;*}"
    echo "aggregate $AGG_JOB"
    echo "submitted aggregation job $AGG_JOB (afterany:$ARRAY_JOB) -> $(dirname "$MANIFEST")/comparison.csv" >&2
fi
