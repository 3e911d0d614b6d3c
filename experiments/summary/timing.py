"""Where a run's time went, from the times its own files record: editing, teacher-forced evaluation,
WILD generation, the general-ability probes and the statistics, and the share of each.

The question it answers is the one a researcher asks before adding ``--wild`` or
``--capability_checks`` to a long run: what do they add? The files of every protocol record their
parts: each step's ``edit.seconds`` (and its roll-back's), ``eval_seconds`` of the files that hold
evaluations (of which ``wild_seconds`` was WILD's, where the protocol evaluates and generates in one
pass), ``seconds`` of each roll-back ``wild_of_edit_{n}.json``, the per-probe ``seconds`` of each
``capability_after_edit_{n}.json`` and run.json's ``statistics_seconds`` (covariances and NAS's reference norms made, not read, by the run). A resumed run's files are
those of the attempt that wrote them last, so time lost to a kill is not counted; a file written
before a field existed contributes nothing to it (the table says which parts are missing)."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

from experiments.store.run_types import Run

PARTS = ("editing", "evaluation", "wild", "capability", "statistics")


def _number(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0


def _json_files(path: Path, pattern: str) -> list[dict]:
    out = []
    for f in sorted(path.glob(pattern)):
        try:
            data = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(data, dict):
            out.append(data)
    return out


def run_timing(run: Run) -> dict[str, float]:
    """Seconds per part of ``PARTS`` (evaluation without WILD) and their ``total``."""
    editing = sum(_number(s.edit.get("seconds")) + _number((s.rollback or {}).get("seconds")) for s in run.edits)
    evaluated = [d for d in _json_files(run.path, "*.json") if "eval_seconds" in d]
    eval_total = sum(_number(d["eval_seconds"]) for d in evaluated)
    wild_inside = sum(_number(d.get("wild_seconds")) for d in evaluated)  # part of eval_seconds
    wild_apart = sum(_number(d.get("seconds")) for d in _json_files(run.path, "wild_of_edit_*.json"))
    capability = sum(sum(_number(v) for v in d.get("seconds", {}).values())
                     for d in _json_files(run.path, "capability_after_edit_*.json") if isinstance(d.get("seconds"), dict))
    parts = {"editing": editing, "evaluation": eval_total - wild_inside, "wild": wild_inside + wild_apart,
             "capability": capability, "statistics": _number(run.meta.get("statistics_seconds"))}
    # switched on but timed nowhere: files written before their timing was recorded (NaN, not 0)
    for part, setting in (("wild", "wild"), ("capability", "capability")):
        if run.meta.get(setting) and parts[part] == 0.0:
            parts[part] = math.nan
    parts["total"] = sum(v for v in parts.values() if not math.isnan(v))
    return parts


def format_timing(runs: Sequence[Run]) -> str:
    """A Markdown table: minutes per part and, in brackets, its share of the run's recorded total."""
    head = "| run | edits | " + " | ".join(PARTS) + " | total |"
    lines = [head, "|" + "---|" * (len(PARTS) + 3)]
    for run in runs:
        t = run_timing(run)
        total = t["total"]
        cells = ["not recorded" if math.isnan(t[p]) else f"{t[p] / 60:.1f} min ({t[p] / total:.0%})" if total > 0 else "-"
                 for p in PARTS]
        lines.append(f"| {run.algorithm}/{run.name} | {run.n_edits} | " + " | ".join(cells) + f" | {total / 60:.1f} min |")
    return "\n".join(lines)
