#!/usr/bin/env bash
# Run a plan of experiments: a thin wrapper, kept for its short form, around
# `python -m experiments.sweeps.plan` (submitit; the local executor here, SLURM job arrays with
# --executor slurm: docs/running.md). WORKERS (default 1) is --max_parallel; PLAN_STATE_DIR, when
# set, replaces results/plans as the folder of plan states and logs.
#
#   bash scripts/run_plan.sh scripts/plans/smollm2_lifelong.txt 2     # run (or go on with) the plan
#   bash scripts/run_plan.sh --status scripts/plans/smollm2_lifelong.txt
set -euo pipefail

status=()
args=()
for a in "$@"; do
    if [[ "$a" == "--status" ]]; then status=(--status); else args+=("$a"); fi
done
(( ${#args[@]} >= 1 && ${#args[@]} <= 2 )) || { echo "usage: run_plan.sh [--status] PLAN [WORKERS]" >&2; exit 2; }
ROOT=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python}" -m experiments.sweeps.plan "${args[0]}" --max_parallel="${args[1]:-1}" "${status[@]}" \
    ${PLAN_STATE_DIR:+--plans_dir "$PLAN_STATE_DIR"}
