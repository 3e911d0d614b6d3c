"""The shapes of summarised runs, shared by the readers of both protocols' run folders."""
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
    """One ``edit_{n}_on_case_{id}.json``: metrics after the edit and what the edit did."""

    index: int
    case_id: str
    post: dict[str, Any]
    edit: dict[str, Any]
    rollback: Optional[dict[str, Any]]


@dataclasses.dataclass(frozen=True)
class Retention:
    """One ``retention_of_edit_{n}.json``: how many facts survive after n edits."""

    edit_index: int
    edit_retention: int
    edit_retention_len: int
    orig_retention: int
    orig_retention_len: int


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """One ``evaluation_after_edit_{n}.json`` of a sequential run: every edited record's metrics and
    how the untouched records fared."""

    edit_index: int
    posts: tuple[dict[str, Any], ...]  # one per record edited so far, in edit order
    preservation: dict[str, Any]  # retained, unchanged, n_records


@dataclasses.dataclass(frozen=True)
class Run:
    algorithm: str  # the results sub-folder (--dir_name), which is the algorithm's name by default
    name: str  # run_NNN
    path: Path
    meta: dict[str, Any]  # run.json ({} when absent)
    params: dict[str, Any]  # params.json ({} when absent)
    edits: tuple[EditResult, ...]  # edits[i].index == i + 1 (sequential: one per batch)
    retention: dict[int, Retention]  # roll-back protocol
    partial: bool = False  # fewer edits than run.json's edit_times (allowed only on request)
    protocol: str = "rollback"
    evaluations: dict[int, Evaluation] = dataclasses.field(default_factory=dict)  # sequential protocol
    batch_ends: tuple[int, ...] = ()  # sequential: the last edit of each batch

    @property
    def n_edits(self) -> int:
        return self.batch_ends[-1] if self.batch_ends else len(self.edits)

    @property
    def checkpoints(self) -> list[int]:
        return sorted(self.evaluations if self.protocol == "sequential" else self.retention)

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


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RunFolderError(f"{path.name}: unreadable JSON ({e})") from None


def _read_object(path: Path) -> dict[str, Any]:
    obj = _read_json(path)
    if not isinstance(obj, dict):
        raise RunFolderError(f"{path.name}: expected a JSON object, found {type(obj).__name__}")
    return obj


def _short_list(values: Sequence[int], limit: int = 8) -> str:
    shown = ", ".join(str(v) for v in values[:limit])
    return shown + (f", ... ({len(values)} in all)" if len(values) > limit else "")


def _incomplete_reason(path: Path, meta: dict[str, Any], n_edits: int) -> Optional[str]:
    """Why the run is unfinished (None when it is finished), from run.json and failure.json."""
    status, planned = meta.get("status"), meta.get("edit_times")
    if isinstance(planned, int) and n_edits > planned:
        raise RunFolderError(f"{n_edits} edit files but run.json says edit_times {planned}")
    if status not in (None, "finished"):
        reason = f"run.json status is {status!r}"
        if (path / FAILURE_FILE).is_file():
            failure = _read_json(path / FAILURE_FILE)
            reason += f" ({failure.get('problem', 'see failure.json')})" if isinstance(failure, dict) else ""
        return f"{reason}, {n_edits} of {planned if isinstance(planned, int) else '?'} edits"
    if isinstance(planned, int) and n_edits < planned:
        return f"incomplete: {n_edits} of {planned} edits"
    return None


def checkpoint_files(path: Path, pattern: "re.Pattern[str]", n_edits: int, planned: Any, last_ok: int,
                     file_name: str) -> dict[int, Path]:
    """The checkpoint files of a run (``pattern`` captures the edit count), checked: none beyond the
    last edit, none of the ``planned`` checkpoints up to ``last_ok`` missing (``file_name`` has
    ``{n}`` for the message)."""
    found = {int(m.group(1)): f for f in path.iterdir() if (m := pattern.match(f.name))}
    late = sorted(n for n in found if n > n_edits)
    if late:
        raise RunFolderError(f"{file_name.format(n='*')} for checkpoint(s) {_short_list(late)} beyond the last edit {n_edits}")
    planned = planned if isinstance(planned, list) else list(found)
    missing = sorted(n for n in planned if isinstance(n, int) and n <= last_ok and n not in found)
    if missing:
        raise RunFolderError(f"missing {file_name.format(n=missing[0])}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    return found
