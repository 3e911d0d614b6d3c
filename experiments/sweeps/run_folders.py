"""Where a plan's evaluate line stands according to its run folder, for lines run outside the plan.

A long line is often started by hand (its command copied from the plan, perhaps with more threads, or
resumed by hand on a machine the plan was not submitted from); the plan's own state then says
``waiting`` or ``killed`` while the run is finished or half done. ``--status`` asks the run folder the
line writes (``<results>/<--dir_name or --alg_name>/run_NNN``) for a run whose ``run.json`` was
launched or resumed with the line's arguments, apart from what a resume may change (the thread count,
``--continue_from_run``), and reports it as ``done outside``, ``running outside`` or ``stopped
outside`` with its progress. Only run.json files are read: --status stays instant.
"""
from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from experiments.run.resume import still_running
from util.globals import load_paths

EVALUATE = ("-m", "experiments.evaluate")
IGNORED_FLAGS = ("--num_threads", "--continue_from_run")  # what a resume may change (experiments/run/resume.py)
COMMAND_ENDS = ("&&", "||", ";", "|")


def evaluate_argv(line: str) -> Optional[list[str]]:
    """The arguments of the line's ``python -m experiments.evaluate`` command (the last one, up to the
    next ``&&``, ``;`` or pipe); None when the line runs no evaluate or cannot be split."""
    try:
        tokens = shlex.split(line)
    except ValueError:
        return None
    starts = [i + 2 for i in range(len(tokens) - 1) if tuple(tokens[i : i + 2]) == EVALUATE]
    if not starts:
        return None
    rest = tokens[starts[-1]:]
    return rest[: next((i for i, t in enumerate(rest) if t in COMMAND_ENDS), len(rest))]


def normalised(argv: Sequence[str]) -> list[str]:
    """``--flag=value`` as ``--flag value``, without the flags a resume may change."""
    split = [part for token in argv for part in (token.split("=", 1) if token.startswith("--") else [token])]
    kept, skip = [], False
    for token in split:
        if skip:
            skip = False
        elif token in IGNORED_FLAGS:
            skip = True
        else:
            kept.append(token)
    return kept


def flag_value(argv: Sequence[str], flag: str) -> Optional[str]:
    tokens = normalised(argv)
    return next((tokens[i + 1] for i in range(len(tokens) - 1) if tokens[i] == flag), None)


@dataclass(frozen=True)
class FolderState:
    """``state`` done / running / stopped; ``progress`` what the row shows in brackets."""

    state: str
    progress: str


def _read_meta(run_json: Path) -> Optional[dict]:
    try:
        meta = json.loads(run_json.read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def launched_with(meta: dict, argv: Sequence[str]) -> bool:
    """Whether the run was started or resumed with these arguments (up to the flags a resume may change)."""
    launches = [meta.get("argv")] + [r.get("argv") for r in meta.get("resumes") or () if isinstance(r, dict)]
    wanted = normalised(argv)
    return any(isinstance(a, list) and normalised(a) == wanted for a in launches)


def run_folder_state(line: str) -> Optional[FolderState]:
    """The newest run folder the line's evaluate command wrote, as a state; None when the line runs no
    evaluate or no run folder has its arguments."""
    argv = evaluate_argv(line)
    if argv is None:
        return None
    folder = flag_value(argv, "--dir_name") or flag_value(argv, "--alg_name")
    if not folder:
        return None
    results = load_paths(results_dir=flag_value(argv, "--results_dir")).results_dir
    for run_json in sorted((results / folder).glob("run_*/run.json"), reverse=True):
        meta = _read_meta(run_json)
        if meta is None or not launched_with(meta, argv):
            continue
        name = f"{folder}/{run_json.parent.name}"
        total = meta.get("n_batches") or meta.get("edit_times")
        if meta.get("status") == "finished":
            return FolderState("done", f"{name} finished")
        state = "running" if still_running(meta) else "stopped"
        return FolderState(state, f"{name}: checkpoint after step {meta.get('last_checkpoint') or 0} of {total}")
    return None
