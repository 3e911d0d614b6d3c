"""Paired differences: one method minus a baseline, run by run on the same edit streams.

A seed fixes a run's edit stream (which records, in which order, and which facts stay untouched), so
seed s of every method edits the same records. Between seeds the scores move a lot (one stream holds
a disabling edit, another does not), and per-method 'mean ± std' tables carry that shared spread
twice. The difference A - B taken within each seed, then its mean, population std and sign count
over the seeds, says whether A does better than B on the same edits, and how consistently.

Runs pair by the seed in their run.json. A pair counts at checkpoint n only when both runs edited
the same records in the same order up to n from the same dataset file; otherwise a note says why it
was left out. Several runs of one method with the same seed (repeats) cannot be paired unambiguously
and are left out too.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Sequence

import numpy as np

from experiments.store.run_types import Run
from experiments.summary.metrics import METRICS, Summary


@dataclasses.dataclass(frozen=True)
class PairedRow:
    """A - B at one checkpoint over the matched seeds."""

    algorithm: str
    baseline: str
    checkpoint: int
    seeds: tuple[Any, ...]
    pairs: tuple[str, ...]  # "run_000 - run_002" per seed
    mean: dict[str, float]
    std: dict[str, float]
    above: dict[str, int]  # seeds where A's value is above B's
    below: dict[str, int]

    @property
    def n_pairs(self) -> int:
        return len(self.seeds)


def edited_case_ids(run: Run, n: int) -> list[str]:
    """The case ids of the first n records the run edited, in edit order (both protocols)."""
    ids = [c for edit in run.edits for c in str(edit.case_id).split(",") if c]
    return ids[:n]


def _by_seed(runs: Sequence[Run], notes: list[str]) -> dict[Any, Run]:
    groups: dict[Any, list[Run]] = {}
    for run in runs:
        seed = run.meta.get("seed")
        if seed is None:
            notes.append(f"{run.label}: no seed in run.json; left out of the paired differences")
            continue
        groups.setdefault(seed, []).append(run)
    for seed, group in groups.items():
        if len(group) > 1:
            notes.append(f"{', '.join(r.label for r in group)}: same seed {seed}, so no unambiguous pair; "
                         f"left out of the paired differences")
    return {seed: group[0] for seed, group in groups.items() if len(group) == 1}


def _mismatch(a: Run, b: Run, n: int) -> Optional[str]:
    """Why a and b are not the same experiment up to edit n (None when they are)."""
    if n not in a.checkpoints or n not in b.checkpoints:
        return f"no checkpoint {n} in both"
    file_a, file_b = a.meta.get("dataset_file"), b.meta.get("dataset_file")
    if file_a and file_b and file_a != file_b:
        return f"different dataset files ({file_a} and {file_b})"
    ids_a, ids_b = edited_case_ids(a, n), edited_case_ids(b, n)
    if ids_a != ids_b:
        first = next((i for i, (x, y) in enumerate(zip(ids_a, ids_b)) if x != y), min(len(ids_a), len(ids_b)))
        return f"different edit streams (edit {first + 1}: case {_at(ids_a, first)} against {_at(ids_b, first)})"
    return None


def _seed_order(seed: Any) -> tuple[int, Any]:
    """Numeric seeds in numeric order (9 before 10), any others after them as text."""
    return (0, seed) if isinstance(seed, (int, float)) else (1, str(seed))


def _at(ids: Sequence[str], i: int) -> str:
    return ids[i] if i < len(ids) else "none"


def _row(summary: Summary, algorithm: str, baseline: str, n: int, matched: list[tuple[Any, Run, Run]]) -> PairedRow:
    scores = {(r["algorithm"], r["run"], r["checkpoint"]): r for r in summary.per_run}
    mean, std, above, below = {}, {}, {}, {}
    for m in (*METRICS, *summary.extra_metrics):
        diffs = np.array([scores[(algorithm, a.name, n)].get(m, math.nan) - scores[(baseline, b.name, n)].get(m, math.nan)
                          for _, a, b in matched], dtype=float)
        complete = diffs.size > 0 and not np.isnan(diffs).any()
        mean[m] = float(diffs.mean()) if complete else math.nan
        std[m] = float(diffs.std()) if complete else math.nan
        above[m] = int((diffs > 0).sum()) if complete else 0
        below[m] = int((diffs < 0).sum()) if complete else 0
    return PairedRow(algorithm, baseline, n, tuple(s for s, _, _ in matched),
                     tuple(f"{a.name} - {b.name}" for _, a, b in matched), mean, std, above, below)


def paired_differences(summary: Summary, baseline: str) -> tuple[list[PairedRow], list[str]]:
    """Every other algorithm of the summary minus ``baseline``, per checkpoint of the summary's rows.

    Raises ValueError when the baseline is not one of the summary's algorithms."""
    if baseline not in summary.algorithms:
        raise ValueError(f"--paired_with {baseline}: not among the summarised runs "
                         f"({', '.join(summary.algorithms) or 'none'})")
    if not summary.runs_of(baseline):
        raise ValueError(f"--paired_with {baseline}: only in a saved summary here; pairing by seed needs its run folders")
    notes: list[str] = []
    base_runs = _by_seed(summary.runs_of(baseline), notes)
    rows = []
    for algorithm in summary.algorithms:
        if algorithm == baseline:
            continue
        runs = _by_seed(summary.runs_of(algorithm), notes)
        for n in sorted({r["checkpoint"] for r in summary.rows if r["algorithm"] == algorithm}):
            matched = []
            for seed in sorted(set(runs) & set(base_runs), key=_seed_order):
                reason = _mismatch(runs[seed], base_runs[seed], n)
                if reason:
                    notes.append(f"{runs[seed].label} and {base_runs[seed].label} (seed {seed}): {reason}; "
                                 f"not paired at {n}")
                else:
                    matched.append((seed, runs[seed], base_runs[seed]))
            if matched:
                rows.append(_row(summary, algorithm, baseline, n, matched))
            else:
                notes.append(f"{algorithm} and {baseline}: no run pair with a common seed and stream at {n}")
    return rows, notes


def format_paired_markdown(rows: Sequence[PairedRow], metrics: Sequence[str], digits: int = 3) -> str:
    """'A - B' per checkpoint: mean ± population std of the per-seed differences, then how many seeds
    put A above (↑) and below (↓) B."""
    head = ["algorithm - baseline", "after n edits", "seeds", *metrics]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [f"{row.algorithm} - {row.baseline}", str(row.checkpoint), ",".join(str(s) for s in row.seeds)]
        for m in metrics:
            if math.isnan(row.mean[m]):
                cells.append("-")
                continue
            spread = f" ± {row.std[m]:.{digits}f}" if row.n_pairs > 1 else ""
            cells.append(f"{row.mean[m]:+.{digits}f}{spread} (↑{row.above[m]} ↓{row.below[m]})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_json(rows: Sequence[PairedRow], notes: Sequence[str]) -> dict[str, Any]:
    def plain(x: float) -> Optional[float]:
        return None if math.isnan(x) else x

    metrics = list(rows[0].mean) if rows else list(METRICS)
    return {
        "difference": "algorithm minus baseline, per seed; mean and population std (ddof=0) over the seeds",
        "rows": [{"algorithm": r.algorithm, "baseline": r.baseline, "checkpoint": r.checkpoint,
                  "seeds": list(r.seeds), "pairs": list(r.pairs),
                  **{f"{m}_diff_mean": plain(r.mean[m]) for m in metrics},
                  **{f"{m}_diff_std": plain(r.std[m]) for m in metrics},
                  **{f"{m}_above": r.above[m] for m in metrics},
                  **{f"{m}_below": r.below[m] for m in metrics}} for r in rows],
        "notes": list(notes),
    }


def paired_rows_from_json(data: dict[str, Any]) -> list[PairedRow]:
    """The rows ``paired_json`` wrote, back as ``PairedRow``s (to print a saved summary's table again)."""
    def num(x: Optional[float]) -> float:
        return math.nan if x is None else float(x)

    rows = data.get("rows", [])
    metrics = [k[: -len("_diff_mean")] for k in (rows[0] if rows else {}) if k.endswith("_diff_mean")]
    return [PairedRow(r["algorithm"], r["baseline"], r["checkpoint"], tuple(r["seeds"]), tuple(r["pairs"]),
                      {m: num(r.get(f"{m}_diff_mean")) for m in metrics}, {m: num(r.get(f"{m}_diff_std")) for m in metrics},
                      {m: r.get(f"{m}_above", 0) for m in metrics}, {m: r.get(f"{m}_below", 0) for m in metrics})
            for r in rows]
