"""NAS's question of a run (Liu et al. 2026, arXiv 2602.02543): do the edited weights and the solved
value vectors grow as edits accumulate?

Every edit of a locate-then-edit method records each changed weight's norm after the edit
(``weight_norms``, editing.editor.update_norms) and, per request, ||v0||, ||v*|| as optimised and
||v*|| as written (``value_norms``, editing.norm_anchor.value_norms). This module reads them per step
and draws them against the number of edits, on a log scale: exponential growth is a straight line.

A run's curves (``NormCurves``) are what the figure draws; a saved summary keeps them
(``experiments.summary.saved``), so the figure can be drawn again beside newer runs after the run
folders are gone: a 2,000-edit run takes hours, and its folder does not outlive the machine.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import FormatStrFormatter

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


def per_weight_norm_curves(run: Run) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each edited weight's own (edits done, ||W||_F) over the steps that recorded it: a joint norm over
    six layers can hide one layer that grows much faster than the rest."""
    curves: dict[str, tuple[list[float], list[float]]] = {}
    for end, step in zip(run.step_ends, run.edits):
        norms = step.edit.get("weight_norms")
        for name, value in (norms.items() if isinstance(norms, dict) else ()):
            xs, ys = curves.setdefault(name, ([], []))
            xs.append(end)
            ys.append(float(value))
    return {name: (np.array(xs, dtype=float), np.array(ys, dtype=float)) for name, (xs, ys) in curves.items()}


def fastest_growing_weight(run: Run) -> Optional[tuple[str, np.ndarray, np.ndarray]]:
    """(name, edits done, ||W||_F / its first recorded value) of the edited weight whose norm grew the most
    relative to where it started; None when the run recorded no weight norms, or recorded them only from a
    later step on (files written before the norms were recorded): a ratio to a later step would look slower."""
    best = None
    first_step = run.step_ends[0] if run.step_ends else None
    for name, (xs, ys) in per_weight_norm_curves(run).items():
        if ys.size and ys[0] > 0 and xs[0] == first_step:
            ratio = ys / ys[0]
            if best is None or ratio[-1] > best[2][-1]:
                best = (name, xs, ratio)
    return best


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


def update_norms(run: Run, key: str = "update_norm") -> list[float]:
    """``edit[key]`` of every step in order (NaN where the step's file lacks it)."""
    out = []
    for e in run.edits:
        value = e.edit.get(key)
        out.append(float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan)
    return out


def update_norm_curve(run: Run) -> tuple[np.ndarray, np.ndarray]:
    """(edits done, ||Delta||_F of the step's update, all its weights together) for every step that
    recorded it: the link between the values and the weights."""
    ys = np.array(update_norms(run), dtype=float)
    xs = np.array(run.step_ends[: ys.size], dtype=float)
    ys, kept = ys[: xs.size], np.isfinite(ys[: xs.size])
    return xs[kept], ys[kept]


Curve = tuple[np.ndarray, np.ndarray]  # (edits done, value)
NO_CURVE: Curve = (np.array([], dtype=float), np.array([], dtype=float))


@dataclasses.dataclass(frozen=True)
class NormCurves:
    """What norm_growth.png draws of one run: the joint weight norm, the fastest-growing weight's ratio
    (None: see ``fastest_growing_weight``) and the per-step mean ||v*|| as optimised, as written and ||v0||;
    with the update norm per step, which the norm table reads (summaries saved before it have none)."""

    algorithm: str
    run: str
    weights: Curve
    fastest: Optional[tuple[str, np.ndarray, np.ndarray]]
    v_star: Curve
    written: Curve
    v0: Curve
    update: Curve = NO_CURVE

    @classmethod
    def of_run(cls, run: Run) -> "NormCurves":
        return cls(run.algorithm, run.name, weight_norm_curve(run), fastest_growing_weight(run),
                   value_norm_curve(run, "v_star"), value_norm_curve(run, "written"), value_norm_curve(run, "v0"),
                   update_norm_curve(run))

    @property
    def empty(self) -> bool:
        return not (self.weights[0].size or self.v_star[0].size)

    def to_json(self) -> dict[str, Any]:
        curve = {k: [getattr(self, k)[0].tolist(), getattr(self, k)[1].tolist()] for k in (*CURVE_FIELDS, "update")}
        fastest = None if self.fastest is None else [self.fastest[0], self.fastest[1].tolist(), self.fastest[2].tolist()]
        return {"algorithm": self.algorithm, "run": self.run, **curve, "fastest": fastest}

    @classmethod
    def from_json(cls, obj: dict[str, Any], where: str) -> "NormCurves":
        """Raises ValueError naming ``where`` (file and entry) and the field that is wrong."""
        try:
            curves = {k: _curve(obj[k]) for k in CURVE_FIELDS}
            curves["update"] = _curve(obj["update"]) if "update" in obj else NO_CURVE  # older summaries lack it
            fastest = obj["fastest"]
            if fastest is not None:
                fastest = (str(fastest[0]), *_curve(fastest[1:]))
            return cls(str(obj["algorithm"]), str(obj["run"]), fastest=fastest, **curves)
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise ValueError(f"{where}: not a run's norm curves ({type(e).__name__}: {e})") from None


CURVE_FIELDS = ("weights", "v_star", "written", "v0")


def _curve(pair: Sequence[Sequence[float]]) -> Curve:
    if len(pair) != 2:
        raise ValueError("a curve is [edits done, values]")
    xs, ys = (np.array(v, dtype=float) for v in pair)
    if xs.ndim != 1 or xs.shape != ys.shape:
        raise ValueError("a curve is [edits done, values] of equal length")
    return xs, ys


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


def norm_growth_figure(groups: Sequence[tuple[str, Sequence[NormCurves]]], colors: dict[str, tuple]) -> Optional[Figure]:
    """Three panels against the number of edits, one colour per algorithm (``colors``; one line per run's ``NormCurves``):
    the edited weights' joint norm, the fastest-growing one's norm relative to after the first step, and
    the mean ||v*|| per step (solid: as optimised; dashed: as written, where NAS's anchor changed it;
    dotted: ||v0||, the value the edited model wrote before the edit). None when no run recorded them
    (methods without value vectors, runs written before the norms were recorded)."""
    groups = [(alg, group) for alg, group in groups if any(not c.empty for c in group)]
    if not groups:
        return None
    fig = Figure(figsize=(16.0, 3.8), layout="constrained")
    weight_ax, layer_ax, value_ax = fig.subplots(1, 3)
    ratio_labelled: set[str] = set()  # a run may lack the ratio (norms recorded late): label the first that has it
    for alg, group in groups:
        for i, curves in enumerate(group):
            label = alg if i == 0 else None
            weight_ax.plot(*curves.weights, lw=1, color=colors[alg], label=label)
            if curves.fastest is not None:
                name, x, ratio = curves.fastest
                layer_label = f"{alg}: {short_weight_name(name)}" if alg not in ratio_labelled else None
                ratio_labelled.add(alg)
                layer_ax.plot(x, ratio, lw=1, color=colors[alg], label=layer_label)
            x, optimised = curves.v_star
            window = steps_per_mean(x)
            if window > 1:
                value_ax.plot(x, optimised, lw=0.6, alpha=0.35, color=colors[alg])  # per step: noisy
            value_ax.plot(x, running_mean(optimised, window), lw=1.5, color=colors[alg], label=label)
            x_w, written = curves.written
            if written.size and not np.allclose(written, optimised, rtol=1e-6):
                value_ax.plot(x_w, written, "--", lw=1, color=colors[alg])
            x_0, before = curves.v0
            if before.size:  # what the edited model already writes: where a runaway v* comes from
                value_ax.plot(x_0, running_mean(before, steps_per_mean(x_0)), ":", lw=1.2, color=colors[alg])
    weight_ax.set_title("edited weights: ||W||_F after each step", fontsize=10)
    layer_ax.set_title("fastest-growing edited weight: ||W||_F / after step 1", fontsize=10)
    value_ax.set_title(f"mean ||v*|| over {EDITS_PER_MEAN} edits or a batch\n"
                       "(faint: per step; dashed: written; dotted: ||v0||)", fontsize=9)
    for ax in (weight_ax, layer_ax, value_ax):
        ax.set_xlabel("number of edits")
        ax.set_yscale("log")
        for axis_formatter in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
            axis_formatter(FormatStrFormatter("%g"))  # 1.4, not 1.4 x 10^0: the ranges are narrow
        ax.grid(alpha=0.3, which="both")
    value_ax.legend(fontsize=8)
    if layer_ax.lines:
        layer_ax.legend(fontsize=7)
    return fig


def short_weight_name(name: str) -> str:
    """The legend's name of a weight: model.layers.8.mlp.down_proj.weight -> layers.8.mlp.down_proj."""
    parts = [p for p in name.split(".") if p not in ("model", "transformer", "weight")]
    return ".".join(parts)
