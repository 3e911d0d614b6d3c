"""What a memory-based editor costs as edits accumulate (issue 28): the bytes its memory holds.

GRACE adds a key, a value and a radius per new key (merges and splits add nothing); WISE holds one side
memory the size of the edited weight and one more matrix per stored shard until the shards are merged.
Both record ``memory_bytes`` after every edit (baselines/grace, baselines/wise); this module reads the
curve and draws it against the number of edits, so the per-edit growth each paper states can be seen.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
from matplotlib.figure import Figure

from experiments.store.run_types import Run

MIB = 2.0**20


def memory_curve(run: Run) -> tuple[np.ndarray, np.ndarray]:
    """(edits done, bytes the editor's memory holds after that step) for every step that recorded them."""
    xs, ys = [], []
    for end, step in zip(run.step_ends, run.edits):
        size = step.edit.get("memory_bytes")
        if isinstance(size, (int, float)):
            xs.append(end)
            ys.append(float(size))
    return np.array(xs, dtype=float), np.array(ys, dtype=float)


def bytes_per_edit(run: Run) -> Optional[float]:
    """Least-squares slope of the memory curve (bytes added per edit); None below two recorded steps."""
    x, y = memory_curve(run)
    if x.size < 2 or np.ptp(x) == 0:
        return None
    return float(np.polyfit(x, y, 1)[0])


def memory_growth_figure(groups: Sequence[tuple[str, Sequence[Run]]], colors: dict[str, tuple]) -> Optional[Figure]:
    """Memory in MiB against the number of edits, one colour per algorithm, the slope in the legend.
    None when no run recorded its memory (editors that write into the weights)."""
    curves = [(alg, run, memory_curve(run)) for alg, runs in groups for run in runs]
    curves = [(alg, run, xy) for alg, run, xy in curves if xy[0].size]
    if not curves:
        return None
    fig = Figure(figsize=(6.0, 3.8), layout="constrained")
    ax = fig.subplots()
    labelled: set[str] = set()
    for alg, run, (x, y) in curves:
        slope = bytes_per_edit(run)
        label = None
        if alg not in labelled:
            labelled.add(alg)
            label = alg if slope is None else f"{alg} ({slope / 1024:.1f} KiB per edit)"
        ax.plot(x, y / MIB, lw=1.5, color=colors[alg], label=label)
    ax.set_title("editor memory after each edit", fontsize=10)
    ax.set_xlabel("number of edits")
    ax.set_ylabel("MiB")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig
