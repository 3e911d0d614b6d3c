"""Figures of a lifelong-editing summary, shared by the notebook and ``summarize --plots``.

Every function builds a ``matplotlib.figure.Figure`` directly (no pyplot): no global figure state,
no GUI backend needed, so the same code draws inline in Jupyter and saves PNGs on a headless
machine. ``save_figures`` writes each figure atomically and carries on past a figure that fails,
so one odd run cannot cost the researcher the other plots.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import re
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator, NullFormatter

from experiments.store.run_types import Run
from experiments.summary.memory_growth import memory_growth_figure
from experiments.summary.metrics import (
    COMPONENTS,
    GENERATION_SCORES,
    LOCALITY_SCORES,
    PRESERVATION_SCORES,
    PROBABILITY_SCORES,
    Summary,
    toxicity_flashes,
    update_norms,
)
from experiments.summary.norm_growth import norm_growth_figure
from util.atomic_files import atomic_path

LOG = logging.getLogger(__name__)

SCORE_PANELS = ("S", *COMPONENTS, "LU", "PS", "PU")
BOUNDED = {*COMPONENTS, "S", *PROBABILITY_SCORES, *LOCALITY_SCORES, *PRESERVATION_SCORES}  # in [0, 1]
TITLES = {
    "S": "S (harmonic mean)", "ES": "ES (edit success)", "GS": "GS (generalisation)",
    "LS": "LS (locality)", "ERS": "ERS (edit retention)", "ORS": "ORS (original retention)",
    "efficacy_score": "efficacy (P[new > true])", "paraphrase_score": "paraphrase (P[new > true])",
    "neighborhood_score": "neighborhood (P[true > new])", "fluency": "fluency (n-gram entropy)",
    "consistency": "consistency (tf-idf)", "LU": "LU (neighbours unchanged)",
    "LU_tokens": "LU (neighbour tokens unchanged)", "PS": "PS (untouched facts kept)",
    "PU": "PU (untouched answers unchanged)",
}


def _colors(names: Sequence[str]) -> dict[str, tuple]:
    cmap = colormaps["tab10"]
    return {name: cmap(i % 10) for i, name in enumerate(names)}


def _log2_x(ax, ticks: Sequence[int]) -> None:
    ax.set_xscale("log", base=2)
    if 0 < len(ticks) <= 12:
        ax.set_xticks(list(ticks))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())


def score_curves_figure(summary: Summary, metrics: Sequence[str] = SCORE_PANELS, ncols: int = 3) -> Optional[Figure]:
    """Each metric against the number of edits (log x), one line per algorithm, a +-1 std band
    over runs. None when there is nothing to draw."""
    rows = [r for r in summary.rows if r["n_runs"] > 0 and r["checkpoint"] > 0]  # n = 0: the unedited model's checks
    metrics = [m for m in metrics if any(not _nan(r.get(f"{m}_mean")) for r in rows)]
    if not rows or not metrics:
        return None
    ncols = min(ncols, len(metrics))
    nrows = math.ceil(len(metrics) / ncols)
    fig = Figure(figsize=(4.2 * ncols, 3.3 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    algorithms = list(dict.fromkeys(r["algorithm"] for r in rows))
    colors = _colors(algorithms)
    ticks = sorted({r["checkpoint"] for r in rows})
    for ax, metric in zip(axes, metrics):
        for alg in algorithms:
            mine = sorted((r for r in rows if r["algorithm"] == alg), key=lambda r: r["checkpoint"])
            x = np.array([r["checkpoint"] for r in mine], dtype=float)
            mean = np.array([_num(r.get(f"{metric}_mean")) for r in mine])
            std = np.array([_num(r.get(f"{metric}_std")) for r in mine])
            runs = max(r["n_runs"] for r in mine)
            ax.plot(x, mean, marker="o", ms=3, color=colors[alg], label=f"{alg} ({runs} run{'' if runs == 1 else 's'})")
            ax.fill_between(x, mean - std, mean + std, color=colors[alg], alpha=0.2, linewidth=0)
        _log2_x(ax, ticks)
        if metric in BOUNDED:
            ax.set_ylim(-0.03, 1.03)
        ax.set_title(TITLES.get(metric, metric), fontsize=10)
        ax.set_xlabel("number of edits")
        ax.grid(alpha=0.3)
    for ax in axes[len(metrics):]:
        ax.set_visible(False)
    axes[0].legend(fontsize=8)
    return fig


# WILD beside its teacher-forced score, on the same axes (solid: teacher forced; dashed: WILD)
WILD_PAIRS = (("ES", "ES_wild"), ("GS", "GS_wild"), ("LS", "LS_wild"), ("LU", "LU_wild"), ("Port", "Port_wild"))


def _curve(rows: Sequence[dict], alg: str, metric: str) -> tuple[np.ndarray, np.ndarray]:
    mine = sorted((r for r in rows if r["algorithm"] == alg), key=lambda r: r["checkpoint"])
    return (np.array([r["checkpoint"] for r in mine], dtype=float),
            np.array([_num(r.get(f"{metric}_mean")) for r in mine]))


def _panels(count: int, ncols: int = 3) -> tuple[Figure, list]:
    ncols = min(ncols, count)
    nrows = math.ceil(count / ncols)
    fig = Figure(figsize=(4.2 * ncols, 3.3 * nrows), layout="constrained")
    axes = list(fig.subplots(nrows, ncols, squeeze=False).ravel())
    for ax in axes[count:]:
        ax.set_visible(False)
    return fig, axes[:count]


def wild_figure(summary: Summary) -> Optional[Figure]:
    """Each score read teacher-forced (solid) and WILD (dashed) against the number of edits, one
    colour per algorithm: where the two part, teacher forcing was leaking the answer."""
    rows = [r for r in summary.rows if r["n_runs"] > 0 and r["checkpoint"] > 0]
    pairs = [(tf, w) for tf, w in WILD_PAIRS if any(not _nan(r.get(f"{w}_mean")) for r in rows)]
    if not pairs:
        return None
    fig, axes = _panels(len(pairs), ncols=2)
    algorithms = list(dict.fromkeys(r["algorithm"] for r in rows))
    colors = _colors(algorithms)
    for ax, (tf, wild) in zip(axes, pairs):
        for alg in algorithms:
            for metric, style in ((tf, "-"), (wild, "--")):
                x, y = _curve(rows, alg, metric)
                ax.plot(x, y, style, marker="o", ms=3, color=colors[alg], label=f"{alg}, {metric}")
        _log2_x(ax, sorted({r["checkpoint"] for r in rows}))
        ax.set_ylim(-0.03, 1.03)
        ax.set_title(f"{tf}: teacher forced (solid) and WILD (dashed)", fontsize=9)
        ax.set_xlabel("number of edits")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    return fig


def capability_figure(summary: Summary) -> Optional[Figure]:
    """Each general ability against the number of edits, the unedited model's value as a dotted
    line in the algorithm's colour (the checks at n = 0)."""
    metrics = [m for m in summary.extra_metrics if m.endswith(("_acc", "_mcc")) or m == "perplexity"]
    rows = [r for r in summary.rows if r["n_runs"] > 0]
    if not metrics or not any(r["checkpoint"] > 0 for r in rows):
        return None
    fig, axes = _panels(len(metrics))
    algorithms = list(dict.fromkeys(r["algorithm"] for r in rows))
    colors = _colors(algorithms)
    for ax, metric in zip(axes, metrics):
        for alg in algorithms:
            x, y = _curve(rows, alg, metric)
            ax.plot(x[x > 0], y[x > 0], marker="o", ms=3, color=colors[alg], label=alg)
            if (x == 0).any() and not np.isnan(y[x == 0][0]):
                ax.axhline(y[x == 0][0], color=colors[alg], linestyle=":", linewidth=1)
        _log2_x(ax, sorted({r["checkpoint"] for r in rows if r["checkpoint"] > 0}))
        title = f"{metric} (dotted: unedited)"
        if metric == "perplexity" and _spans_a_decade(ax):
            ax.set_yscale("log")  # a collapsed model's 10^4-10^5 would flatten every other run to a line at 0
            title = f"{metric}, log scale (dotted: unedited)"
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("number of edits")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    return fig


def _spans_a_decade(ax: Any) -> bool:
    """Whether the positive values drawn on ``ax`` differ by more than a factor of 10."""
    values = np.concatenate([np.asarray(line.get_ydata(), dtype=float) for line in ax.get_lines()] or [np.array([])])
    values = values[np.isfinite(values) & (values > 0)]
    return values.size > 1 and float(values.max()) > 10 * float(values.min())


def has_layer_scan(run: Run) -> bool:
    """Whether the run recorded LA per candidate layer (WilKE) for at least one edit."""
    return any(isinstance(e.edit.get("layer_adaptability"), dict) and e.edit["layer_adaptability"] for e in run.edits)


def layer_adaptability_matrix(run: Run) -> tuple[list[int], np.ndarray]:
    """(candidate layers, LA[layer, edit]) with NaN where an edit did not scan a layer."""
    scans = [e.edit.get("layer_adaptability") or {} for e in run.edits]
    layers = sorted({int(k) for s in scans if isinstance(s, dict) for k in s})
    matrix = np.full((len(layers), len(scans)), np.nan)
    row = {layer: i for i, layer in enumerate(layers)}
    for j, scan in enumerate(scans):
        for k, la in (scan.items() if isinstance(scan, dict) else ()):
            if isinstance(la, (int, float)):
                matrix[row[int(k)], j] = float(la)
    return layers, matrix


def _chosen_layers(runs: Sequence[Run]) -> list[int]:
    return [int(e.edit["layer"]) for r in runs for e in r.edits
            if e.edit.get("layer_adaptability") and isinstance(e.edit.get("layer"), int)]


def layer_histogram_figure(runs: Sequence[Run], title: str = "") -> Optional[Figure]:
    """How often each candidate layer was chosen, over every scanned edit of ``runs``."""
    runs = [r for r in runs if has_layer_scan(r)]
    chosen = _chosen_layers(runs)
    if not chosen:
        return None
    candidates = sorted({l for r in runs for l in layer_adaptability_matrix(r)[0]} | set(chosen))
    layers = np.arange(min(candidates), max(candidates) + 1)
    counts = np.array([chosen.count(int(l)) for l in layers])
    fig = Figure(figsize=(max(4.0, 0.35 * len(layers) + 2), 3.2), layout="constrained")
    ax = fig.subplots()
    ax.bar(layers, counts, width=0.8, color="tab:blue")
    ax.set_xticks(layers if len(layers) <= 32 else layers[:: math.ceil(len(layers) / 32)])
    ax.set_xlabel("chosen layer")
    ax.set_ylabel("edits")
    ax.set_title(f"{title} chosen layers ({len(chosen)} edits, {len(runs)} run{'' if len(runs) == 1 else 's'})".strip(), fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    return fig


def la_heatmap_figure(runs: Sequence[Run], title: str = "") -> Optional[Figure]:
    """log10 LA per candidate layer (rows) per edit (columns), one panel per run; dots mark the
    chosen layer. Blank cells: layers an edit did not scan."""
    panels = []
    for run in runs:
        layers, matrix = layer_adaptability_matrix(run)
        with np.errstate(divide="ignore", invalid="ignore"):
            logged = np.where(matrix > 0, np.log10(matrix), np.nan)
        if layers and np.isfinite(logged).any():
            panels.append((run, layers, logged))
    if not panels:
        return None
    finite = np.concatenate([p[2][np.isfinite(p[2])] for p in panels])
    vmin, vmax = float(finite.min()), float(finite.max())
    vmax = vmax if vmax > vmin else vmin + 1e-6
    fig = Figure(figsize=(min(16.0, 4.0 + 0.08 * max(p[2].shape[1] for p in panels)) + 2, 0.9 + 2.6 * len(panels)),
                 layout="constrained")
    axes = fig.subplots(len(panels), 1, squeeze=False).ravel()
    cmap = colormaps["viridis"].with_extremes(bad="#dddddd")
    for ax, (run, layers, logged) in zip(axes, panels):
        n_edits = logged.shape[1]
        image = ax.imshow(np.ma.masked_invalid(logged), aspect="auto", origin="lower", cmap=cmap, vmin=vmin, vmax=vmax,
                          interpolation="nearest", extent=(0.5, n_edits + 0.5, -0.5, len(layers) - 0.5))
        row = {layer: i for i, layer in enumerate(layers)}
        picks = [(e.index, row[e.edit["layer"]]) for e in run.edits
                 if e.edit.get("layer_adaptability") and e.edit.get("layer") in row]
        if picks:
            ax.scatter(*zip(*picks), s=max(2.0, 40.0 / max(1.0, n_edits / 20)), c="white", edgecolors="black",
                       linewidths=0.4, label="chosen layer")
        step = max(1, math.ceil(len(layers) / 16))
        ax.set_yticks(range(0, len(layers), step), [str(l) for l in layers[::step]])
        ax.set_ylabel("layer")
        ax.set_title(f"{title} {run.name}: log10 LA per layer".strip(), fontsize=10)
        fig.colorbar(image, ax=ax, label="log10 LA", pad=0.01)
    axes[-1].set_xlabel("edit")
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return fig


def update_norm_figure(summary: Summary, flash_factor: Optional[float] = None, key: str = "update_norm") -> Optional[Figure]:
    """Update norm per edit, one panel per algorithm and one line per run; toxicity flashes
    (norm > flash_factor x the running median of earlier edits) are marked, and the dashed line is
    that threshold."""
    factor = summary.flash_factor if flash_factor is None else flash_factor
    groups = [(alg, summary.runs_of(alg)) for alg in summary.algorithms]
    groups = [(alg, runs) for alg, runs in groups if any(np.isfinite(update_norms(r, key)).any() for r in runs)]
    if not groups:
        return None
    fig = Figure(figsize=(8.0, 0.6 + 2.9 * len(groups)), layout="constrained")
    axes = fig.subplots(len(groups), 1, squeeze=False).ravel()
    for ax, (alg, runs) in zip(axes, groups):
        _draw_norms(ax, runs, factor, key)
        ax.set_title(f"{alg}: {key.replace('_', ' ')} per edit; x = flash (> {factor:g}x running median)", fontsize=10)
        ax.set_ylabel(key.replace("_", " "))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[-1].set_xlabel("edit (sequential runs: batch of edits)")
    return fig


def running_threshold(norms: Sequence[float], factor: float) -> np.ndarray:
    """factor x median of earlier edits' norms (NaN for the first edit), as toxicity_flashes uses."""
    out, history = [], []
    for norm in norms:
        out.append(factor * float(np.median(history)) if history else np.nan)
        if not math.isnan(norm):
            history.append(norm)
    return np.array(out)


def _draw_norms(ax, runs: Sequence[Run], factor: float, key: str) -> None:
    colors = _colors([r.name for r in runs])
    all_norms = []
    flash_label = "flash"
    for run in runs:
        norms = np.array(update_norms(run, key))
        x = np.arange(1, len(norms) + 1)
        flags = np.array(toxicity_flashes(norms, factor), dtype=bool)
        count = int(flags.sum())
        label = f"{run.name} ({count} flash{'' if count == 1 else 'es'})"
        ax.plot(x, norms, marker=".", ms=3, lw=1, color=colors[run.name], label=label)
        ax.plot(x, running_threshold(norms, factor), ls="--", lw=0.8, alpha=0.6, color=colors[run.name])
        if flags.any():
            ax.scatter(x[flags], norms[flags], marker="x", s=50, c="red", zorder=3, label=flash_label)
            flash_label = None  # one legend entry for the marker
        all_norms.append(norms)
    values = np.concatenate(all_norms)
    values = values[np.isfinite(values)]
    if values.size and (values > 0).all():
        ax.set_yscale("log")


@dataclasses.dataclass
class SavedPlots:
    paths: dict[str, Path]
    failures: dict[str, str]  # figure name -> error


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "algorithm"


def figure_builders(summary: Summary) -> dict[str, Callable[[], Optional[Figure]]]:
    """File name -> function drawing that figure (None when it would be empty)."""
    builders: dict[str, Callable[[], Optional[Figure]]] = {
        "scores.png": lambda: score_curves_figure(summary),
        "rome_scores.png": lambda: score_curves_figure(summary, (*PROBABILITY_SCORES, *GENERATION_SCORES)),
        "update_norms.png": lambda: update_norm_figure(summary),
        "wild_vs_teacher_forced.png": lambda: wild_figure(summary),
        "capabilities.png": lambda: capability_figure(summary),
        "norm_growth.png": lambda: norm_growth_figure([(a, summary.norm_curves_of(a)) for a in summary.algorithms],
                                                      _colors(summary.algorithms)),
        "memory_growth.png": lambda: memory_growth_figure([(a, summary.runs_of(a)) for a in summary.algorithms],
                                                          _colors(summary.algorithms)),
    }
    for alg in summary.algorithms:
        runs = summary.runs_of(alg)
        if any(has_layer_scan(r) for r in runs):
            builders[f"{_safe_name(alg)}_layer_histogram.png"] = lambda runs=runs, alg=alg: layer_histogram_figure(runs, alg)
            builders[f"{_safe_name(alg)}_la_heatmap.png"] = lambda runs=runs, alg=alg: la_heatmap_figure(runs, alg)
    return builders


def save_figure(fig: Figure, path: Path, dpi: int = 120) -> None:
    """PNG written to a temporary file and renamed: never a half-written image."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)


def save_figures(summary: Summary, out_dir: Path, dpi: int = 120) -> SavedPlots:
    """Every figure as a PNG in ``out_dir``. A figure that fails is logged and reported, not fatal."""
    saved = SavedPlots({}, {})
    for name, build in figure_builders(summary).items():
        try:
            fig = build()
            if fig is None:
                LOG.info("%s: nothing to draw", name)
                continue
            save_figure(fig, Path(out_dir) / name, dpi)
            saved.paths[name] = Path(out_dir) / name
        except Exception as e:  # one bad figure must not cost the others
            LOG.exception("could not draw %s", name)
            saved.failures[name] = f"{type(e).__name__}: {e}"
    return saved


def _nan(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _num(value) -> float:
    return math.nan if _nan(value) else float(value)
