"""NAS's question of a run (Liu et al. 2026, arXiv 2602.02543): do the edited weights and the solved
value vectors grow as edits accumulate?

Every edit of a locate-then-edit method records each changed weight's norm after the edit
(``weight_norms``, editing.editor.update_norms) and, per request, ||v0||, ||v*|| as optimised and
||v*|| as written (``value_norms``, editing.norm_anchor.value_norms). This module reads them per step
and draws them against the number of edits, on a log scale: exponential growth is a straight line.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
from matplotlib.figure import Figure

from experiments.store.run_types import Run


def weight_norm_curve(run: Run) -> tuple[np.ndarray, np.ndarray]:
    """(edits done, ||W||_F of the weights the step changed, taken together) for every step that
    recorded them; with one weight per step (ROME) it is that weight's norm."""
    xs, ys = [], []
    for end, step in zip(run.step_ends, run.edits):
        norms = step.edit.get("weight_norms")
        if isinstance(norms, dict) and norms:
            xs.append(end)
            ys.append(math.sqrt(sum(float(v) ** 2 for v in norms.values())))
    return np.array(xs, dtype=float), np.array(ys, dtype=float)


def value_norm_curve(run: Run, which: str = "v_star") -> tuple[np.ndarray, np.ndarray]:
    """(edits done, mean over the step's requests of ||v*|| as optimised (``which="v_star"``), as
    written (``"written"``) or before the edit (``"v0"``)) for every step that recorded them."""
    xs, ys = [], []
    for end, step in zip(run.step_ends, run.edits):
        values = [float(n[which]) for n in step.edit.get("value_norms") or [] if isinstance(n, dict) and which in n]
        if values:
            xs.append(end)
            ys.append(float(np.mean(values)))
    return np.array(xs, dtype=float), np.array(ys, dtype=float)


def running_mean(values: np.ndarray, window: int = 16) -> np.ndarray:
    """Mean of each value and up to ``window - 1`` before it: the trend under per-edit noise."""
    if values.size == 0:
        return values
    sums = np.cumsum(np.insert(values, 0, 0.0))
    starts = np.maximum(np.arange(1, values.size + 1) - window, 0)
    return (sums[1:] - sums[starts]) / (np.arange(1, values.size + 1) - starts)


EDITS_PER_MEAN = 16  # the trend line of ||v*|| averages about this many edits


def steps_per_mean(edits_done: np.ndarray) -> int:
    """How many steps hold about ``EDITS_PER_MEAN`` edits: 16 one edit at a time, 1 in batches of 16 or
    more (each step's point is already the mean of its batch's requests)."""
    if edits_done.size < 2:
        return 1
    return max(1, round(EDITS_PER_MEAN / float(np.median(np.diff(edits_done)))))


def _has_norms(runs: Sequence[Run]) -> bool:
    return any(weight_norm_curve(r)[0].size or value_norm_curve(r)[0].size for r in runs)


def norm_growth_figure(groups: Sequence[tuple[str, Sequence[Run]]], colors: dict[str, tuple]) -> Optional[Figure]:
    """Two panels against the number of edits, one colour per algorithm (``colors``; one line per run):
    the edited weights' norm, and the mean ||v*|| per step (solid: as optimised; dashed: as written,
    where NAS's anchor changed it). None when no run recorded them (methods without value vectors,
    runs written before the norms were recorded)."""
    groups = [(alg, runs) for alg, runs in groups if _has_norms(runs)]
    if not groups:
        return None
    fig = Figure(figsize=(11.0, 3.8), layout="constrained")
    weight_ax, value_ax = fig.subplots(1, 2)
    for alg, runs in groups:
        for i, run in enumerate(runs):
            label = alg if i == 0 else None
            weight_ax.plot(*weight_norm_curve(run), lw=1, color=colors[alg], label=label)
            x, optimised = value_norm_curve(run, "v_star")
            window = steps_per_mean(x)
            if window > 1:
                value_ax.plot(x, optimised, lw=0.6, alpha=0.35, color=colors[alg])  # per step: noisy
            value_ax.plot(x, running_mean(optimised, window), lw=1.5, color=colors[alg], label=label)
            x_w, written = value_norm_curve(run, "written")
            if written.size and not np.allclose(written, optimised, rtol=1e-6):
                value_ax.plot(x_w, written, "--", lw=1, color=colors[alg])
    weight_ax.set_title("edited weights: ||W||_F after each step", fontsize=10)
    value_ax.set_title(f"mean ||v*|| over {EDITS_PER_MEAN} edits (faint: per step; dashed: written)", fontsize=10)
    for ax in (weight_ax, value_ax):
        ax.set_xlabel("number of edits")
        ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
    value_ax.legend(fontsize=8)
    return fig
