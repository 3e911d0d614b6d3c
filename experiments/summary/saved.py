"""Saved summaries (``experiments.summarize --out X.json``) read back, alone or beside new runs.

A summary JSON holds the table (its rows and per-run rows) and every run's norm curves, so it outlives
the run folders it was made from. That matters for long streams: a 2,000-edit run takes hours, its folder
(weights included) is not committed, and the machine it ran on may be gone when the next run of the same
comparison finishes. ``--with_summary X.json`` puts a saved summary's algorithms beside the runs read
now, in the table and in every figure drawn from the table or the norm curves; what needs the run
folders themselves (paired differences by seed, timing, layer scans) stays with the runs read now.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from experiments.summary.metrics import METRICS, Summary
from experiments.summary.norm_growth import NormCurves


def summary_from_json(data: dict[str, Any], where: str = "summary") -> Summary:
    """A summary JSON (``summarize.summary_json``) back as a ``Summary`` with its rows and norm curves but
    no runs: enough to print its tables and draw its figures. ValueError naming ``where`` when the
    file is not one."""
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
        raise ValueError(f"{where}: not a summary JSON written by experiments.summarize (no 'rows' list)")
    rows = [{k: math.nan if v is None else v for k, v in row.items()} for row in data["rows"]]
    extras = [m for m in data.get("metrics", []) if m not in METRICS]
    curves = [NormCurves.from_json(c, f"{where}: norm_curves[{i}]") for i, c in enumerate(data.get("norm_curves", []))]
    return Summary(rows, data.get("per_run", []), [], [], list(data.get("notes", [])), data.get("flash_factor", 0.0),
                   extras, curves)


def read_summary(path: Path) -> Summary:
    """A saved summary file; ValueError naming the file when it is missing or not a summary."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read a summary JSON ({e})") from None
    return summary_from_json(data, str(path))


def with_saved(summary: Summary, saved: Summary, where: str) -> Summary:
    """``summary`` with the saved one's algorithms put before its own: rows, per-run rows, notes, general
    abilities and norm curves. ValueError when an algorithm is in both (which rows would count is unclear)."""
    clash = sorted(set(saved.algorithms) & set(summary.algorithms))
    if clash:
        raise ValueError(f"{where}: {', '.join(clash)} also among the runs read now; summarise them from one place")
    return dataclasses.replace(
        summary,
        rows=saved.rows + summary.rows,
        per_run=saved.per_run + summary.per_run,
        notes=[f"{where}: {n}" for n in saved.notes] + summary.notes,
        extra_metrics=list(dict.fromkeys(saved.extra_metrics + summary.extra_metrics)),
        saved_curves=saved.saved_curves + summary.saved_curves,
    )
