"""The shape every protocol's run folder is read into, and the checks the readers share.

A protocol (experiments/protocols/) writes its own files and reads them back into a ``RunContent``:
the steps it took (``EditResult``: what each edit or batch did, and for the protocols that evaluate
an edit right after it, that evaluation) and its checkpoints (``Checkpoint``: the per-record metrics
that count at n edits, and the ratios only that protocol measures, such as ERS/ORS or PS/PU). The
summaries (experiments/summary/) score any protocol's ``Run`` the same way from these.
"""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any, Optional, Sequence

from experiments.store.files import FAILURE_FILE

PROMPT_KINDS = ("rewrite", "paraphrase", "neighborhood")


class RunFolderError(ValueError):
    """A run folder that cannot be summarised as it is; the message says which file and why."""


@dataclasses.dataclass(frozen=True)
class EditResult:
    """One step of a run: an edit (roll-back: with its evaluation and roll-back) or a batch of edits."""

    index: int
    case_id: str  # a batch: its case ids joined by commas
    post: dict[str, Any]  # metrics right after this step's edit ({} where the protocol evaluates later)
    edit: dict[str, Any]  # what the edit did: layer, LA, update norms, seconds
    rollback: Optional[dict[str, Any]]


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """What counts at n edits: one metrics dict per record edited so far, in edit order, and the
    protocol's own ratios (roll-back: ERS, ORS; sequential: PS, PU)."""

    n: int
    posts: tuple[dict[str, Any], ...]
    ratios: dict[str, float]


@dataclasses.dataclass(frozen=True)
class RunContent:
    """What a protocol's reader found in a run folder."""

    steps: tuple[EditResult, ...]  # steps[i].index == i + 1
    step_ends: tuple[int, ...]  # edits done after each step
    checkpoints: dict[int, Checkpoint]
    partial: bool = False  # unfinished (read only on request)


@dataclasses.dataclass(frozen=True)
class Run:
    algorithm: str  # the results sub-folder (--dir_name), which is the algorithm's name by default
    name: str  # run_NNN
    path: Path
    meta: dict[str, Any]  # run.json ({} when absent)
    params: dict[str, Any]  # params.json ({} when absent)
    protocol: str
    edits: tuple[EditResult, ...]  # one per step: an edit, or a batch of edits
    step_ends: tuple[int, ...]
    checkpoints: dict[int, Checkpoint]
    partial: bool = False  # fewer edits than run.json's edit_times (allowed only on request)

    @property
    def n_edits(self) -> int:
        return self.step_ends[-1] if self.step_ends else 0

    @property
    def step_unit(self) -> tuple[str, str]:
        """("edit", "edits") when every step edits one record, else ("batch", "batches")."""
        single = list(self.step_ends) == list(range(1, len(self.step_ends) + 1))
        return ("edit", "edits") if single else ("batch", "batches")

    @property
    def label(self) -> str:
        return f"{self.algorithm}/{self.name}"


@dataclasses.dataclass(frozen=True)
class SkippedRun:
    path: Path
    reason: str


@dataclasses.dataclass
class LoadedRuns:
    runs: list[Run] = dataclasses.field(default_factory=list)
    skipped: list[SkippedRun] = dataclasses.field(default_factory=list)

    def by_algorithm(self) -> dict[str, list[Run]]:
        """Runs grouped by algorithm, in the order the algorithms were asked for."""
        groups: dict[str, list[Run]] = {}
        for run in self.runs:
            groups.setdefault(run.algorithm, []).append(run)
        return groups


# ---------------------------------------------------------------------------------------------
# What the readers of every protocol share


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RunFolderError(f"{path.name}: unreadable JSON ({e})") from None


def read_object(path: Path) -> dict[str, Any]:
    obj = read_json(path)
    if not isinstance(obj, dict):
        raise RunFolderError(f"{path.name}: expected a JSON object, found {type(obj).__name__}")
    return obj


def short_list(values: Sequence[int], limit: int = 8) -> str:
    shown = ", ".join(str(v) for v in values[:limit])
    return shown + (f", ... ({len(values)} in all)" if len(values) > limit else "")


def check_post(post: Any, where: str) -> dict[str, Any]:
    """A record's metrics must hold the greedy correctness of every prompt kind."""
    if not isinstance(post, dict) or not all(isinstance(post.get(f"{k}_prompts_correct"), list) for k in PROMPT_KINDS):
        raise RunFolderError(f"{where}: no '*_prompts_correct' metrics")
    return post


def numbered_files(path: Path, pattern: "re.Pattern[str]", what: str, shown: str) -> dict[int, Path]:
    """The files whose name ``pattern`` matches (group 1: a number), numbered 1..N without gaps
    (``what``: "edit", "batch", ...; ``shown``: the names for a message, e.g. "batch_*.json")."""
    found: dict[int, Path] = {}
    for f in path.iterdir():
        m = pattern.match(f.name)
        if m:
            n = int(m.group(1))
            if n in found:
                raise RunFolderError(f"two files for {what} {n}: {found[n].name} and {f.name}")
            found[n] = f
    if not found:
        raise RunFolderError(f"no {shown} files")
    gaps = sorted(set(range(1, max(found) + 1)) - set(found))
    if gaps:
        raise RunFolderError(f"missing {what} files for {what}(s) {short_list(gaps)}")
    return dict(sorted(found.items()))


def incomplete_reason(path: Path, meta: dict[str, Any], n_edits: int) -> Optional[str]:
    """Why the run is unfinished (None when it is finished), from run.json and failure.json."""
    status, planned = meta.get("status"), meta.get("edit_times")
    if isinstance(planned, int) and n_edits > planned:
        raise RunFolderError(f"{n_edits} edit files but run.json says edit_times {planned}")
    if status not in (None, "finished"):
        reason = f"run.json status is {status!r}"
        if (path / FAILURE_FILE).is_file():
            failure = read_json(path / FAILURE_FILE)
            reason += f" ({failure.get('problem', 'see failure.json')})" if isinstance(failure, dict) else ""
        return f"{reason}, {n_edits} of {planned if isinstance(planned, int) else '?'} edits"
    if isinstance(planned, int) and n_edits < planned:
        return f"incomplete: {n_edits} of {planned} edits"
    return None


def refuse_partial(reason: Optional[str], allow_partial: bool) -> None:
    if reason and not allow_partial:
        raise RunFolderError(f"{reason} (summarise its finished edits with --include_partial)")


def checkpoint_files(path: Path, pattern: "re.Pattern[str]", n_edits: int, planned: Any, last_ok: int,
                     file_name: str) -> dict[int, Path]:
    """The checkpoint files of a run (``pattern`` captures the edit count), checked: none beyond the
    last edit, none of the ``planned`` checkpoints up to ``last_ok`` missing (``file_name`` has
    ``{n}`` for the message)."""
    found = {int(m.group(1)): f for f in path.iterdir() if (m := pattern.match(f.name))}
    late = sorted(n for n in found if n > n_edits)
    if late:
        raise RunFolderError(f"{file_name.format(n='*')} for checkpoint(s) {short_list(late)} beyond the last edit {n_edits}")
    planned = planned if isinstance(planned, list) else list(found)
    missing = sorted(n for n in planned if isinstance(n, int) and n <= last_ok and n not in found)
    if missing:
        raise RunFolderError(f"missing {file_name.format(n=missing[0])}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    return dict(sorted(found.items()))
