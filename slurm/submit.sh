#!/usr/bin/env bash
# Submit a manifest's unfinished tasks as one Slurm job array, plus an aggregation job that runs after it.
#
#   slurm/submit.sh MANIFEST [--throttle K] [--dependency DEP] [--script PHASE.sbatch] [--no-aggregate]
#                   [--dry-run] [header flags: --partition --account --qos --gpus --cpus --mem --time
#                    --signal-before --venv --setup --log-dir --sbatch-arg; see slurm/common.sh]
#
# The array is --array=<unfinished indices>%K over the phase script named by the manifest's phase (or --script);
# tasks already done are not submitted, so running this again after a failure or a cancellation submits exactly
# what is missing, and nothing when all is done. When the manifest has evaluation tasks, `pressroom-eval aggregate
# MANIFEST` (the comparison table and plots, next to the manifest) is submitted with --dependency=afterany.
# Prints the job ids on stdout ("ARRAY_ID [AGGREGATE_ID]", nothing when nothing was submitted), the rest on stderr.
set -euo pipefail
# shellcheck source=slurm/common.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/common.sh"

usage() {
    sed -n '2,13p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
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

ARRAY="$(pressroom-eval status "$MANIFEST" --format array)"
if [[ -z "$ARRAY" ]]; then
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
ARGS=(--parsable "--array=$ARRAY${THROTTLE:+%$THROTTLE}" "--output=$LOG_DIR/%x-%A_%a.out" "${PRESSROOM_HEADER[@]}")
[[ -n "$DEPENDENCY" ]] && ARGS+=("--dependency=$DEPENDENCY")
pressroom_sbatch_header 0 # the aggregation needs no GPU
AGG_ARGS=(--parsable "--job-name=${PHASE}_aggregate" "--output=$LOG_DIR/%x-%j.out" "${PRESSROOM_HEADER[@]}")

if ((DRY_RUN)); then
    echo "sbatch ${ARGS[*]} $SCRIPT $MANIFEST" >&2
    echo "sbatch ${AGG_ARGS[*]} --dependency=afterany:<array> $PRESSROOM_SLURM_HOME/aggregate.sbatch $MANIFEST" >&2
    exit 0
fi
ARRAY_JOB="$(sbatch "${ARGS[@]}" "$SCRIPT" "$MANIFEST")"
ARRAY_JOB="${ARRAY_JOB%%;*}"
echo "submitted $PHASE array job $ARRAY_JOB: tasks $ARRAY${THROTTLE:+ (at most $THROTTLE at a time)} of $MANIFEST" >&2
echo "logs: $LOG_DIR/$(basename "$SCRIPT" .sbatch)-${ARRAY_JOB}_<task>.out" >&2
IDS="$ARRAY_JOB"
if ((AGGREGATE)) && [[ "$(pressroom-eval status "$MANIFEST" --format kinds)" == *eval* ]]; then
    AGG_JOB="$(sbatch "${AGG_ARGS[@]}" "--dependency=afterany:$ARRAY_JOB" "$PRESSROOM_SLURM_HOME/aggregate.sbatch" "$MANIFEST")"
    AGG_JOB="${AGG_JOB%%;*}"
    echo "submitted aggregation job $AGG_JOB (afterany:$ARRAY_JOB) -> $(dirname "$MANIFEST")/comparison.csv" >&2
    IDS="$IDS $AGG_JOB"
fi
echo "$IDS"
