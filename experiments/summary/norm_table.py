"""The norm curves as numbers: what norm_growth.png shows, read at the table's checkpoints.

NAS (Liu et al. 2026, arXiv 2602.02543) explains the collapse of long edit sequences by a feedback loop:
the edited model writes larger values v0, so the solved v* grow, so the edits grow. The figure shows
whether a curve bends; a results page and a reviewer need the numbers behind it: at each checkpoint the
edited weights' joint ||W||_F, the fastest-growing weight's ratio to after the first step, the norm
of a step's update ||Delta||_F (all its weights together; what links the values to the weights), the mean
||v*|| as optimised and as written (they differ where NAS's anchor rescaled it) and ||v0||, each with its
growth since the checkpoint before (the weights and values), in percent per 100 edits. A constant rate
is exponential growth; a rate that climbs from one checkpoint to the next is the runaway.

The values are those the figure draws (``NormCurves``, so a saved summary gives the same table as its
run folders): the weights at the last step ending at or before the checkpoint, the value norms as the
figure's trend line there (the mean over the last steps holding about 16 edits: 16 steps one edit at a
time, one step in batches of 16 or more), the update norm averaged the same way. A run
that stopped before a checkpoint has no value there.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import numpy as np

from experiments.summary.metrics import Summary
from experiments.summary.norm_growth import Curve, NormCurves, running_mean, short_weight_name, steps_per_mean

QUANTITIES = ("W", "fastest", "update", "v_star", "written", "v0")  # fastest: ratio to after step 1
GROWING = ("W", "v_star", "v0")  # the quantities whose growth per 100 edits the table gives
HEADERS = {"W": "‖W‖", "fastest": "fastest weight ×", "update": "‖Δ‖ of a step", "v_star": "‖v*‖",
           "written": "‖v*‖ written", "v0": "‖v0‖"}


def value_at(curve: Curve, n: int, smooth: bool) -> float:
    """The curve at n edits: its last point at or before n (smoothed as the figure's trend line when
    ``smooth``); NaN when the curve is empty or ends before n (the run stopped earlier)."""
    xs, ys = curve
    if xs.size == 0 or xs[-1] < n or xs[0] > n:
        return math.nan
    if smooth:
        ys = running_mean(ys, steps_per_mean(xs))
    return float(ys[np.searchsorted(xs, n, side="right") - 1])


def run_values(curves: NormCurves, n: int) -> dict[str, float]:
    """One run's quantities at n edits (NaN where it did not record them)."""
    fastest = math.nan
    if curves.fastest is not None:
        fastest = value_at(curves.fastest[1:], n, smooth=False)
    return {"W": value_at(curves.weights, n, smooth=False), "fastest": fastest,
            "update": value_at(curves.update, n, smooth=True), "v_star": value_at(curves.v_star, n, smooth=True),
            "written": value_at(curves.written, n, smooth=True), "v0": value_at(curves.v0, n, smooth=True)}


def growth_per_100(now: float, before: float, n: int, previous: int) -> float:
    """Percent growth per 100 edits from ``before`` (at ``previous`` edits) to ``now`` (at n), compounded;
    inf where that overflows (a few edits of a tiny model can double a norm: 2**50 per 100 edits)."""
    if not (now > 0 and before > 0) or n <= previous:
        return math.nan
    exponent = math.log(now / before) * 100.0 / (n - previous)
    return math.inf if exponent > 700 else 100.0 * math.expm1(exponent)


def _mean_std(values: Sequence[float]) -> tuple[float, float, int]:
    """(mean, population std, how many) of the values that are not NaN; an infinite one makes the mean
    infinite and the std NaN."""
    known = [v for v in values if not math.isnan(v)]
    if not known:
        return math.nan, math.nan, 0
    if not all(math.isfinite(v) for v in known):
        return math.inf, math.nan, len(known)
    with np.errstate(over="ignore", invalid="ignore"):  # a tiny model's runaway: the std overflows to inf
        return float(np.mean(known)), float(np.std(known)), len(known)


def norm_rows(curves_by_algorithm: dict[str, Sequence[NormCurves]],
              checkpoints: dict[str, Sequence[int]]) -> list[dict[str, Any]]:
    """Per algorithm (in the dict's order) and checkpoint: the mean and std over its runs of every quantity
    and of its growth since the algorithm's previous checkpoint that has values (per run, then averaged).
    Algorithms without curves, and checkpoints no run has a value at, are left out."""
    rows = []
    for alg, curves in curves_by_algorithm.items():
        curves = [c for c in curves if not c.empty]
        if not curves:
            continue
        previous: Optional[tuple[int, list[dict[str, float]]]] = None
        for n in sorted(checkpoints.get(alg, ())):
            per_run = [run_values(c, n) for c in curves]
            row: dict[str, Any] = {"algorithm": alg, "checkpoint": n}
            for q in QUANTITIES:
                row[f"{q}_mean"], row[f"{q}_std"], row[f"{q}_runs"] = _mean_std([v[q] for v in per_run])
            for q in GROWING:
                rates = [growth_per_100(now[q], before[q], n, previous[0]) for now, before in zip(per_run, previous[1])] \
                    if previous else []
                row[f"{q}_growth_mean"], row[f"{q}_growth_std"], _ = _mean_std(rates)
            names = {c.fastest[0] for c in curves if c.fastest is not None}
            row["fastest_name"] = names.pop() if len(names) == 1 else None
            row["n_runs"] = max(row[f"{q}_runs"] for q in QUANTITIES)
            if row["n_runs"] == 0:  # before the first step (the unedited checkpoint 0), or after the runs stopped
                continue
            rows.append(row)
            previous = (n, per_run)
    return rows


def summary_norm_rows(summary: Summary) -> list[dict[str, Any]]:
    """``norm_rows`` of every algorithm of a summary (runs read now or saved), at the checkpoints of its rows."""
    checkpoints = {a: sorted({r["checkpoint"] for r in summary.rows if r["algorithm"] == a}) for a in summary.algorithms}
    return norm_rows({a: summary.norm_curves_of(a) for a in summary.algorithms}, checkpoints)


def _number(x: float, digits: int) -> str:
    """Fixed point, or 3 significant digits past 1e5 (a tiny model's runaway ROME reaches 1e11)."""
    return f"{x:.{digits}f}" if abs(x) < 1e5 or not math.isfinite(x) else f"{x:.3g}"


def _cell(mean: float, std: float, n_runs: int, digits: int, suffix: str = "") -> str:
    if math.isnan(mean):
        return "-"
    spread = "" if n_runs < 2 or math.isnan(std) else f" ± {_number(std, digits)}"
    return _number(mean, digits) + suffix + spread


def format_norm_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as Markdown; 'written' shows '=' where it equals ||v*|| as optimised (no anchor)."""
    header = ["algorithm", "after n edits", "runs", HEADERS["W"], "%/100", HEADERS["fastest"], HEADERS["update"],
              HEADERS["v_star"], "%/100", HEADERS["written"], HEADERS["v0"], "%/100"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        k = row["n_runs"]

        def cell(q: str, digits: int = 1) -> str:
            return _cell(row[f"{q}_mean"], row[f"{q}_std"], k, digits)

        def rate(q: str) -> str:
            return _cell(row[f"{q}_growth_mean"], row[f"{q}_growth_std"], k, 2, "%")

        fastest = cell("fastest", 3)
        if row["fastest_name"] and fastest != "-":
            fastest += f" ({short_weight_name(row['fastest_name'])})"
        same = math.isclose(row["written_mean"], row["v_star_mean"], rel_tol=1e-6)
        written = "=" if same else cell("written")
        lines.append("| " + " | ".join([row["algorithm"], str(row["checkpoint"]), str(k), cell("W"), rate("W"), fastest,
                                        cell("update"), cell("v_star"), rate("v_star"), written, cell("v0"), rate("v0")]) + " |")
    return "\n".join(lines)

