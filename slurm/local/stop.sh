#!/usr/bin/env bash
# Stop the local Slurm started by slurm/local/start.sh: cancel its jobs, then stop slurmd, slurmctld and munged
# by the process ids recorded in $PRESSROOM_SLURM_DIR (default /tmp/pressroom-slurm). Safe to run twice.
# With --purge, also remove $PRESSROOM_SLURM_DIR (config, state, logs).
set -euo pipefail

DIR="${PRESSROOM_SLURM_DIR:-/tmp/pressroom-slurm}"
export SLURM_CONF="$DIR/slurm.conf"

stop_pid() {  # stop_pid NAME: SIGTERM the pid in $DIR/NAME.pid, wait up to 10 s, then SIGKILL
    local file="$DIR/$1.pid" pid
    [[ -f "$file" ]] || return 0
    pid="$(cat "$file")"
    if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; then
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.2
        done
        if kill -0 "$pid" 2>/dev/null; then kill -9 "$pid" 2>/dev/null || true; fi
        echo "stopped $1 ($pid)"
    fi
    rm -f "$file"
}

if [[ -f "$SLURM_CONF" ]] && command -v scancel >/dev/null && [[ -f "$DIR/slurmctld.pid" ]]; then
    scancel --full --quiet --partition="$(sinfo -h -o %P 2>/dev/null | head -n1 | tr -d '*')" 2>/dev/null || true
fi
stop_pid slurmd
stop_pid slurmctld
stop_pid munged
if [[ "${1:-}" == "--purge" ]]; then
    rm -rf "$DIR"
    echo "removed $DIR"
fi
