"""Reading run folders written by ``experiments.evaluate`` (one per ``results/<dir_name>/run_NNN``).

Roll-back runs are read here; sequential runs (run.json ``protocol: sequential``) by
``experiments.summary.sequential_runs``, into the same ``Run`` shape: one ``EditResult`` per batch
(its ``edit`` holds the update norms) and an ``Evaluation`` per checkpoint.

A summary must never silently average a half-written or damaged run into the others, and must
never crash because one folder is bad: every problem becomes a ``RunFolderError`` naming the
file, and ``load_runs`` turns it into a ``SkippedRun`` that the caller reports.

What a usable run folder holds (see ``experiments.evaluate.LifelongRun``):
- ``edit_{n}_on_case_{id}.json`` for n = 1..E without gaps (E = run.json's ``edit_times`` unless
  partial runs are allowed), each with ``post.{rewrite,paraphrase,neighborhood}_prompts_correct``;
- ``retention_of_edit_{n}.json`` for every planned checkpoint n <= E (run.json's
  ``retention_checkpoints``; without run.json, the retention files found); the ``edit`` details
  (layer, LA, norms) are optional, so folders of the reference code can be summarised too;
- ``run.json`` and ``params.json`` are read when present (and must then be valid JSON objects); a
  run.json ``status`` other than 'finished' (running, interrupted, failed: see ``failure.json``)
  marks the run incomplete, as do fewer edits than ``edit_times``.
Incomplete runs are skipped unless partial runs are allowed; then their finished edits count (a
retention file not yet written after the last edit is tolerated).
"""
from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path
from typing import Iterable, Optional, Sequence

from experiments.store.files import PARAMS_FILE, RUN_DIR_RE, RUN_META_FILE
from experiments.store.run_types import (
    PROMPT_KINDS,
    EditResult,
    LoadedRuns,
    Retention,
    Run,
    RunFolderError,
    SkippedRun,
    _incomplete_reason,
    _read_object,
    _short_list,
    checkpoint_files,
)
from experiments.summary.sequential_runs import load_sequential_run

LOG = logging.getLogger(__name__)

EDIT_FILE_RE = re.compile(r"^edit_(\d+)_on_case_(.+)\.json$")
RETENTION_FILE_RE = re.compile(r"^retention_of_edit_(\d+)\.json$")
RETENTION_FIELDS = ("edit_retention", "edit_retention_len", "orig_retention", "orig_retention_len")


def _read_edit(path: Path, index: int, case_id: str) -> EditResult:
    obj = _read_object(path)
    post, edit = obj.get("post"), obj.get("edit")
    if not isinstance(post, dict):
        raise RunFolderError(f"{path.name}: no 'post' metrics")
    for kind in PROMPT_KINDS:
        if not isinstance(post.get(f"{kind}_prompts_correct"), list):
            raise RunFolderError(f"{path.name}: missing post.{kind}_prompts_correct")
    if edit is None:
        edit = {}  # files of the reference code have no edit details: no norms or layers, scores still count
    if not isinstance(edit, dict):
        raise RunFolderError(f"{path.name}: 'edit' is not an object")
    if obj.get("edit_index", index) != index:
        raise RunFolderError(f"{path.name}: edit_index {obj.get('edit_index')} does not match the file name")
    rollback = obj.get("rollback")
    return EditResult(index, case_id, post, edit, rollback if isinstance(rollback, dict) else None)


def _read_retention(path: Path, n: int) -> Retention:
    obj = _read_object(path)
    values = {}
    for field in RETENTION_FIELDS:
        value = obj.get(field)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise RunFolderError(f"{path.name}: field {field!r} is {value!r}, expected a count")
        values[field] = value
    if values["edit_retention_len"] != n:
        raise RunFolderError(f"{path.name}: edit_retention_len is {values['edit_retention_len']}, expected {n}")
    if values["edit_retention"] > n or values["orig_retention"] > values["orig_retention_len"]:
        raise RunFolderError(f"{path.name}: more facts retained than checked")
    return Retention(edit_index=n, **values)


def _read_edits(path: Path) -> list[EditResult]:
    found: dict[int, Path] = {}
    for f in path.iterdir():
        m = EDIT_FILE_RE.match(f.name)
        if not m:
            continue
        n = int(m.group(1))
        if n in found:
            raise RunFolderError(f"two files for edit {n}: {found[n].name} and {f.name}")
        found[n] = f
    if not found:
        raise RunFolderError("no edit_*_on_case_*.json files")
    gaps = sorted(set(range(1, max(found) + 1)) - set(found))
    if gaps:
        raise RunFolderError(f"missing edit files for edit(s) {_short_list(gaps)}")
    edits = [_read_edit(found[n], n, EDIT_FILE_RE.match(found[n].name).group(2)) for n in sorted(found)]
    return [_with_locality(path, e) for e in edits]


def _with_locality(path: Path, edit: EditResult) -> EditResult:
    """The edit with its unchanged-prediction locality (``locality_of_edit_{n}.json``) in its post."""
    f = path / f"locality_of_edit_{edit.index}.json"
    if not f.is_file():
        return edit  # runs of earlier versions, or of the reference code
    extra = _read_object(f).get("post")
    if not isinstance(extra, dict):
        raise RunFolderError(f"{f.name}: no 'post' object")
    return dataclasses.replace(edit, post={**edit.post, **extra})


def load_run(path: Path, algorithm: str, allow_partial: bool = False) -> Run:
    """Read and check one run folder; raises ``RunFolderError`` saying what is wrong."""
    path = Path(path)
    if not path.is_dir():
        raise RunFolderError("no such run folder")
    meta = _read_object(path / RUN_META_FILE) if (path / RUN_META_FILE).exists() else {}
    params = _read_object(path / PARAMS_FILE) if (path / PARAMS_FILE).exists() else {}
    if meta.get("protocol") == "sequential":
        return load_sequential_run(path, algorithm, meta, params, allow_partial)
    edits = _read_edits(path)
    n_edits = len(edits)
    unfinished = _incomplete_reason(path, meta, n_edits)
    if unfinished and not allow_partial:
        raise RunFolderError(f"{unfinished} (summarise its finished edits with --include_partial)")
    # an unfinished run may have been stopped between its last edit file and that edit's retention file
    last_ok = n_edits - 1 if unfinished else n_edits
    retention_files = checkpoint_files(path, RETENTION_FILE_RE, n_edits, meta.get("retention_checkpoints"), last_ok,
                                       "retention_of_edit_{n}.json")
    retention = {n: _read_retention(f, n) for n, f in sorted(retention_files.items())}
    if not retention:
        raise RunFolderError("no retention_of_edit_*.json files")
    return Run(algorithm, path.name, path, meta, params, tuple(edits), retention, partial=unfinished is not None)


def available_dir_names(results_dir: Path) -> list[str]:
    """Sub-folders of ``results_dir`` that hold at least one run_NNN folder."""
    if not Path(results_dir).is_dir():
        return []
    return sorted(
        d.name for d in Path(results_dir).iterdir()
        if d.is_dir() and any(p.is_dir() and RUN_DIR_RE.match(p.name) for p in d.iterdir())
    )


def _run_folders(alg_dir: Path, run_names: Optional[Iterable[str]]) -> list[Path]:
    if run_names is not None:
        return [alg_dir / name for name in run_names]
    if not alg_dir.is_dir():
        return []
    folders = [p for p in alg_dir.iterdir() if p.is_dir() and RUN_DIR_RE.match(p.name)]
    return sorted(folders, key=lambda p: int(RUN_DIR_RE.match(p.name).group(1)))


def load_runs(
    results_dir: Path,
    dir_names: Sequence[str],
    run_names: Optional[Sequence[str]] = None,
    allow_partial: bool = False,
) -> LoadedRuns:
    """Every usable run of every ``dir_name``; unusable folders are logged and listed as skipped."""
    loaded = LoadedRuns()
    for dir_name in dir_names:
        alg_dir = Path(results_dir) / dir_name
        folders = _run_folders(alg_dir, run_names)
        if not folders:
            loaded.skipped.append(SkippedRun(alg_dir, "no run_NNN folders"))
        for folder in folders:
            try:
                loaded.runs.append(load_run(folder, dir_name, allow_partial))
            except RunFolderError as e:
                loaded.skipped.append(SkippedRun(folder, str(e)))
    for s in loaded.skipped:
        LOG.warning("skipping %s: %s", s.path, s.reason)
    return loaded
