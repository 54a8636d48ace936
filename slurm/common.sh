# shellcheck shell=bash
# The shared header of pressroom's Slurm scripts, sourced by submit.sh / submit_all.sh (the sbatch options) and by
# every phase script inside the job (the environment, and run-task with checkpoint-and-requeue on a signal).
# Nothing site-specific: every setting comes from a flag or a variable.
#
#   flag                variable               meaning
#   --partition P       PRESSROOM_PARTITION    sbatch --partition
#   --account A         PRESSROOM_ACCOUNT      sbatch --account
#   --qos Q             PRESSROOM_QOS          sbatch --qos
#   --gpus N            PRESSROOM_GPUS         GPUs per task on one node (default 1; 0: none, e.g. a CPU Slurm)
#   --cpus N            PRESSROOM_CPUS         sbatch --cpus-per-task
#   --mem M             PRESSROOM_MEM          sbatch --mem (e.g. 64G)
#   --time T            PRESSROOM_TIME         sbatch --time (default: the phase script's)
#   --signal-before S   PRESSROOM_SIGNAL_BEFORE  seconds before the time limit at which USR1 asks to checkpoint
#   --venv DIR          PRESSROOM_VENV         a virtual environment to activate in the job
#   --setup CMD         PRESSROOM_SETUP        shell code run first in the job (e.g. "module load cuda; conda activate x")
#   --log-dir DIR       PRESSROOM_LOG_DIR      where %x-%A_%a.out logs go (default: MANIFEST's directory/logs)
#   --sbatch-arg ARG    (repeatable)           any other sbatch option, e.g. --sbatch-arg=--constraint=h100

PRESSROOM_SLURM_HOME="${PRESSROOM_SLURM_HOME:-$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)}"
export PRESSROOM_SLURM_HOME

pressroom_die() {
    echo "${0##*/}: error: $*" >&2
    exit 2
}

# pressroom_header_flag "$@": if $1 is a header flag, store it and set PRESSROOM_SHIFT to the words it used
# (1 or 2); else PRESSROOM_SHIFT=0.
# shellcheck disable=SC2034  # the settings are read by the submit scripts
pressroom_header_flag() {
    local flag="$1" value
    PRESSROOM_SHIFT=0
    case "$flag" in
    --*=*)
        value="${flag#*=}"
        flag="${flag%%=*}"
        PRESSROOM_SHIFT=1
        ;;
    *)
        value="${2-}"
        PRESSROOM_SHIFT=2
        ;;
    esac
    case "$flag" in
    --partition) PRESSROOM_PARTITION="$value" ;;
    --account) PRESSROOM_ACCOUNT="$value" ;;
    --qos) PRESSROOM_QOS="$value" ;;
    --gpus) PRESSROOM_GPUS="$value" ;;
    --cpus) PRESSROOM_CPUS="$value" ;;
    --mem) PRESSROOM_MEM="$value" ;;
    --time) PRESSROOM_TIME="$value" ;;
    --signal-before) PRESSROOM_SIGNAL_BEFORE="$value" ;;
    --venv) PRESSROOM_VENV="$value" ;;
    --setup) PRESSROOM_SETUP="$value" ;;
    --log-dir) PRESSROOM_LOG_DIR="$value" ;;
    --sbatch-arg) PRESSROOM_SBATCH_ARGS+=("$value") ;;
    *)
        PRESSROOM_SHIFT=0
        return 0
        ;;
    esac
    if [[ "$PRESSROOM_SHIFT" == 2 && $# -lt 2 ]]; then
        pressroom_die "$flag needs a value"
    fi
}

# pressroom_sbatch_header [gpus]: fill the array PRESSROOM_HEADER with the sbatch options from the settings.
pressroom_sbatch_header() {
    local gpus="${1:-${PRESSROOM_GPUS:-1}}"
    PRESSROOM_HEADER=()
    [[ -n "${PRESSROOM_PARTITION:-}" ]] && PRESSROOM_HEADER+=("--partition=$PRESSROOM_PARTITION")
    [[ -n "${PRESSROOM_ACCOUNT:-}" ]] && PRESSROOM_HEADER+=("--account=$PRESSROOM_ACCOUNT")
    [[ -n "${PRESSROOM_QOS:-}" ]] && PRESSROOM_HEADER+=("--qos=$PRESSROOM_QOS")
    [[ "$gpus" =~ ^[0-9]+$ ]] || pressroom_die "--gpus must be a number of GPUs, got '$gpus'"
    ((gpus > 0)) && PRESSROOM_HEADER+=("--nodes=1" "--gpus-per-node=$gpus")
    [[ -n "${PRESSROOM_CPUS:-}" ]] && PRESSROOM_HEADER+=("--cpus-per-task=$PRESSROOM_CPUS")
    [[ -n "${PRESSROOM_MEM:-}" ]] && PRESSROOM_HEADER+=("--mem=$PRESSROOM_MEM")
    [[ -n "${PRESSROOM_TIME:-}" ]] && PRESSROOM_HEADER+=("--time=$PRESSROOM_TIME")
    [[ -n "${PRESSROOM_SIGNAL_BEFORE:-}" ]] && PRESSROOM_HEADER+=("--signal=B:USR1@$PRESSROOM_SIGNAL_BEFORE")
    if [[ -n "${PRESSROOM_SBATCH_ARGS[*]:-}" ]]; then
        PRESSROOM_HEADER+=("${PRESSROOM_SBATCH_ARGS[@]}")
    fi
    return 0
}

# pressroom_activate: the job's (or the submitting shell's) environment: PRESSROOM_SETUP, then PRESSROOM_VENV.
pressroom_activate() {
    if [[ -n "${PRESSROOM_SETUP:-}" ]]; then
        eval "$PRESSROOM_SETUP"
    fi
    if [[ -n "${PRESSROOM_VENV:-}" ]]; then
        [[ -f "$PRESSROOM_VENV/bin/activate" ]] || pressroom_die "PRESSROOM_VENV=$PRESSROOM_VENV has no bin/activate"
        # shellcheck disable=SC1091
        source "$PRESSROOM_VENV/bin/activate"
    fi
    command -v pressroom-eval >/dev/null ||
        pressroom_die "pressroom-eval is not on PATH: give --venv DIR or --setup 'CMD' (or PRESSROOM_VENV/SETUP)"
}

# pressroom_run_task MANIFEST: run this array task's manifest line. On USR1 (sent --signal-before the time limit)
# the task is asked to checkpoint (the signal is forwarded; training commands save and exit), then requeued.
pressroom_run_task() {
    local manifest="$1" child rc
    echo "[$(date -u +%FT%TZ)] ${SLURM_JOB_NAME:-job} ${SLURM_ARRAY_JOB_ID:-${SLURM_JOB_ID:-}}_${SLURM_ARRAY_TASK_ID:-}" \
        "(job ${SLURM_JOB_ID:-}, restart ${SLURM_RESTART_COUNT:-0}) on $(hostname): $manifest"
    pressroom-eval run-task "$manifest" &
    child=$!
    PRESSROOM_CHILD=$child
    trap pressroom_on_usr1 USR1
    trap 'PRESSROOM_TRAPPED=1; echo "[$(date -u +%FT%TZ)] TERM: stopping the task"; kill -TERM "$PRESSROOM_CHILD" 2>/dev/null || true' TERM
    # `wait` returns early when a trapped signal arrives: then wait again for the task itself to finish.
    while :; do
        PRESSROOM_TRAPPED=0
        rc=0
        wait "$child" || rc=$?
        [[ "$PRESSROOM_TRAPPED" == 1 ]] || break
    done
    trap - USR1 TERM
    if [[ "${PRESSROOM_REQUEUE:-0}" == 1 && "$rc" != 0 ]]; then
        echo "[$(date -u +%FT%TZ)] task stopped (exit status $rc); requeueing job ${SLURM_JOB_ID:-}"
        scontrol requeue "${SLURM_JOB_ID:?not in a Slurm job}"
        sleep 60 # scontrol requeue ends this job; never report the interrupted task as a result
    fi
    echo "[$(date -u +%FT%TZ)] exit status $rc"
    return "$rc"
}

pressroom_on_usr1() {
    echo "[$(date -u +%FT%TZ)] USR1: asking task ${SLURM_ARRAY_TASK_ID:-} to checkpoint, then requeueing"
    PRESSROOM_REQUEUE=1
    PRESSROOM_TRAPPED=1
    kill -USR1 "$PRESSROOM_CHILD" 2>/dev/null || true
}
