#!/usr/bin/env bash
# Run a plan of experiments: every command line of PLAN, by WORKERS processes (default 1), each
# command once at a time, niced and single-threaded so that the machine stays usable.
#
#   bash scripts/run_plan.sh scripts/plans/smollm2_lifelong.txt 2     # run (or go on with) the plan
#   bash scripts/run_plan.sh --status scripts/plans/smollm2_lifelong.txt
#
# Plans outlive sessions: give evaluate commands `--continue_from_run auto`, and running the plan
# again skips what has finished, resumes what was killed (from its last weight checkpoint) and starts
# the rest. A line that succeeded is marked done (results/plans/<plan>/<hash>.done, or under
# $PLAN_STATE_DIR) and not run again;
# a line that failed is logged and retried on the next start. Two workers never take the same line
# (flock), so a plan can be run by one worker now and by a second one started later.
# Lines: one shell command each, run from the repository root; blank lines and # comments skipped.
set -euo pipefail

usage="usage: run_plan.sh [--status] PLAN [WORKERS]"
status_only=0
args=()
for a in "$@"; do
    if [[ "$a" == "--status" ]]; then status_only=1; else args+=("$a"); fi
done
PLAN=${args[0]:?$usage}
WORKERS=${args[1]:-1}
[[ "$WORKERS" =~ ^[1-9][0-9]*$ ]] || { echo "run_plan.sh: WORKERS must be a positive integer, got '$WORKERS'; $usage" >&2; exit 2; }
ROOT=$(cd "$(dirname "$0")/.." && pwd)
[[ -f "$PLAN" ]] || { echo "run_plan.sh: no plan file $PLAN" >&2; exit 2; }
PLAN=$(cd "$(dirname "$PLAN")" && pwd)/$(basename "$PLAN")
STATE="${PLAN_STATE_DIR:-$ROOT/results/plans}/$(basename "$PLAN" .txt)"
mkdir -p "$STATE"

plan_lines() { grep -v -e '^[[:space:]]*#' -e '^[[:space:]]*$' "$PLAN"; }
line_hash() { printf '%s' "$1" | md5sum | cut -c1-12; }

if (( status_only )); then
    while IFS= read -r line; do
        h=$(line_hash "$line")
        if [[ -e "$STATE/$h.done" ]]; then s="done"
        elif ! flock -n "$STATE/$h.lock" true 2>/dev/null; then s="running"
        elif [[ -e "$STATE/$h.rc" ]]; then s="failed rc=$(cat "$STATE/$h.rc")"
        else s="waiting"; fi
        shown=$line
        if (( ${#line} > 110 )); then shown="...${line: -107}"; fi  # evaluate commands differ at their end
        printf '%-14s %s  %s\n' "$s" "$h" "$shown"
    done < <(plan_lines)
    exit 0
fi

worker() {
    local id=$1 line h rc
    while IFS= read -r line; do
        h=$(line_hash "$line")
        [[ -e "$STATE/$h.done" ]] && continue
        exec {lock}>"$STATE/$h.lock"
        if ! flock -n "$lock"; then exec {lock}>&-; continue; fi
        if [[ -e "$STATE/$h.done" || -e "$TRIED/$h" ]]; then exec {lock}>&-; continue; fi
        touch "$TRIED/$h"  # failed lines are retried by the next start of the plan, not by this one
        echo "$(date -u +%FT%TZ) worker $id start $h $line" >> "$STATE/plan.log"
        rc=0
        (cd "$ROOT" && OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} nice -n "${NICE:-5}" bash -c "$line") \
            >> "$STATE/$h.log" 2>&1 || rc=$?
        echo "$rc" > "$STATE/$h.rc"
        if (( rc == 0 )); then touch "$STATE/$h.done"; fi
        echo "$(date -u +%FT%TZ) worker $id end rc=$rc $h" >> "$STATE/plan.log"
        exec {lock}>&-
    done < <(plan_lines)
}

TRIED=$(mktemp -d "$STATE/.tried.XXXXXX")
trap 'rm -rf "$TRIED"' EXIT
for ((i = 1; i <= WORKERS; i++)); do
    worker "$i" &
    sleep 1
done
wait
echo "plan $PLAN: $(ls "$STATE"/*.done 2>/dev/null | wc -l) of $(plan_lines | wc -l) lines done; log $STATE/plan.log"
