"""Compare two runs of the same edit stream: same layers? same updates? how much faster?

    python -m experiments.summary.compare_runs results/WilKE_fast_smollm2/run_000 results/WilKE_reference_smollm2/run_000

Meant for the long fast-vs-reference comparison: each side is an ordinary ``experiments.evaluate``
run (resumable, so a comparison too long for one sitting is built up over several), and this reads
their per-edit files. Per edit it reports both chosen layers, the largest relative difference of
the layer adaptabilities (LA) both scans recorded and of the applied update's norm, each side's
seconds (edit + roll-back), and run A's margin: how far (relatively) the runner-up layer's LA lies
above the chosen one's. Float-level differences compound through a lifelong run, so two correct
implementations drift apart; a choice can only flip where the drift reaches the margin, which is
what the two columns side by side show. Unfinished runs are compared over the edits both have.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from experiments.store.files import write_json_atomic
from experiments.store.run_types import EditResult, RunFolderError
from experiments.summary.runs import load_run

LOG = logging.getLogger("experiments.summary.compare_runs")


def edit_seconds(edit: EditResult) -> Optional[float]:
    """Seconds of the edit plus its roll-back (None when the file has no timing)."""
    seconds = edit.edit.get("seconds")
    if not isinstance(seconds, (int, float)):
        return None
    rollback = (edit.rollback or {}).get("seconds", 0.0)
    return float(seconds) + float(rollback if isinstance(rollback, (int, float)) else 0.0)


def relative_difference(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def max_la_difference(a: EditResult, b: EditResult) -> Optional[float]:
    la_a, la_b = a.edit.get("layer_adaptability") or {}, b.edit.get("layer_adaptability") or {}
    shared = set(la_a) & set(la_b)
    return max((relative_difference(la_a[k], la_b[k]) for k in shared), default=None)


def choice_margin(edit: EditResult) -> Optional[float]:
    """(second-smallest LA - smallest LA) / smallest LA of one scan; None without two candidates."""
    la = sorted((edit.edit.get("layer_adaptability") or {}).values())
    return relative_difference(la[1], la[0]) if len(la) >= 2 else None


def _load(path: Path):
    try:
        return load_run(path, path.parent.name, allow_partial=True)
    except RunFolderError as e:
        raise RunFolderError(f"{path}: {e}") from e


def compare(path_a: Path, path_b: Path) -> dict[str, Any]:
    """Edit-by-edit comparison of run A (e.g. fast) with run B (e.g. reference)."""
    run_a, run_b = _load(path_a), _load(path_b)
    n = min(run_a.n_edits, run_b.n_edits)
    rows = []
    for ea, eb in zip(run_a.edits[:n], run_b.edits[:n]):
        if ea.case_id != eb.case_id:
            raise RunFolderError(f"edit {ea.index} is case {ea.case_id} in {path_a} but case {eb.case_id} in {path_b}: "
                                 "not the same edit stream (same --ds_name, --dataset_size_limit and --seed?)")
        norm_a, norm_b = ea.edit.get("update_norm"), eb.edit.get("update_norm")
        rows.append({
            "edit": ea.index,
            "case_id": ea.case_id,
            "layer_a": ea.edit.get("layer"),
            "layer_b": eb.edit.get("layer"),
            "max_la_relative_difference": max_la_difference(ea, eb),
            "margin_a": choice_margin(ea),
            "update_norm_relative_difference": (relative_difference(norm_a, norm_b)
                                                if isinstance(norm_a, (int, float)) and isinstance(norm_b, (int, float)) else None),
            "seconds_a": edit_seconds(ea),
            "seconds_b": edit_seconds(eb),
        })
    timed = [r for r in rows if r["seconds_a"] is not None and r["seconds_b"] is not None]
    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    secs_a, secs_b = mean([r["seconds_a"] for r in timed]), mean([r["seconds_b"] for r in timed])
    la_diffs = [r["max_la_relative_difference"] for r in rows if r["max_la_relative_difference"] is not None]
    margins = [r["margin_a"] for r in rows if r["margin_a"] is not None]
    norm_diffs = [r["update_norm_relative_difference"] for r in rows if r["update_norm_relative_difference"] is not None]
    return {
        "a": str(path_a), "b": str(path_b),
        "edits_a": run_a.n_edits, "edits_b": run_b.n_edits, "edits_compared": n,
        "same_layers": all(r["layer_a"] == r["layer_b"] for r in rows) if rows else None,
        "layers_a": [r["layer_a"] for r in rows], "layers_b": [r["layer_b"] for r in rows],
        "max_la_relative_difference": max(la_diffs, default=None),
        "min_margin_a": min(margins, default=None),
        "max_update_norm_relative_difference": max(norm_diffs, default=None),
        "seconds_per_edit_a": secs_a, "seconds_per_edit_b": secs_b,
        "b_over_a": secs_b / secs_a if secs_a and secs_b else None,
        "per_edit": rows,
    }


def table(result: dict[str, Any]) -> str:
    fmt = lambda x, spec: "-" if x is None else format(x, spec)  # noqa: E731
    lines = [f"{'edit':>4}  {'case':>6}  {'layer A':>7}  {'layer B':>7}  {'max LA diff':>11}  {'margin A':>8}  {'norm diff':>9}  {'s A':>8}  {'s B':>8}"]
    for r in result["per_edit"]:
        lines.append(f"{r['edit']:>4}  {r['case_id']:>6}  {str(r['layer_a']):>7}  {str(r['layer_b']):>7}  "
                     f"{fmt(r['max_la_relative_difference'], '.1e'):>11}  {fmt(r['margin_a'], '.1e'):>8}  {fmt(r['update_norm_relative_difference'], '.1e'):>9}  "
                     f"{fmt(r['seconds_a'], '.1f'):>8}  {fmt(r['seconds_b'], '.1f'):>8}")
    lines.append(
        f"{result['edits_compared']} edit(s) compared (A has {result['edits_a']}, B has {result['edits_b']}); "
        f"same layers: {result['same_layers']}; largest LA difference {fmt(result['max_la_relative_difference'], '.1e')}, "
        f"smallest margin in A {fmt(result['min_margin_a'], '.1e')}; s/edit A {fmt(result['seconds_per_edit_a'], '.1f')}, "
        f"B {fmt(result['seconds_per_edit_b'], '.1f')}, B/A {fmt(result['b_over_a'], '.2f')}x"
    )
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.summary.compare_runs", description=__doc__.split("\n")[0])
    p.add_argument("run_a", type=Path, help="a run folder (e.g. the fast implementation)")
    p.add_argument("run_b", type=Path, help="a run folder of the same edit stream (e.g. the reference)")
    p.add_argument("--json", type=Path, default=None, help="also write the comparison here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        result = compare(args.run_a, args.run_b)
    except RunFolderError as e:
        LOG.error("%s", e)
        return 2
    print(table(result))
    if args.json:
        write_json_atomic(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
