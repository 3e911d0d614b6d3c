"""Reading a sequential run folder (run.json ``protocol: sequential``) into a ``Run``.

What a usable folder holds (experiments/protocols/sequential.py): ``batch_{b}.json`` for b = 1..B
without gaps, each with ``first_edit``/``last_edit`` following on from the previous batch and an
``edit`` object (the update norms); ``evaluation_after_edit_{n}.json`` for every planned checkpoint
n reached (run.json's ``eval_checkpoints``), each with one ``post`` per record edited so far and a
``preservation`` count. Unfinished runs follow the same rules as roll-back runs (runs.py).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from experiments.store.run_types import (
    PROMPT_KINDS,
    EditResult,
    Evaluation,
    Run,
    RunFolderError,
    _incomplete_reason,
    _read_object,
    _short_list,
    checkpoint_files,
)

BATCH_FILE_RE = re.compile(r"^batch_(\d+)\.json$")
EVALUATION_FILE_RE = re.compile(r"^evaluation_after_edit_(\d+)\.json$")
PRESERVATION_FIELDS = ("retained", "unchanged", "n_records")


def _read_batches(path: Path) -> tuple[list[EditResult], list[int]]:
    found = {int(m.group(1)): f for f in path.iterdir() if (m := BATCH_FILE_RE.match(f.name))}
    if not found:
        raise RunFolderError("no batch_*.json files")
    gaps = sorted(set(range(1, max(found) + 1)) - set(found))
    if gaps:
        raise RunFolderError(f"missing batch files for batch(es) {_short_list(gaps)}")
    edits, ends, previous = [], [], 0
    for b in sorted(found):
        obj = _read_object(found[b])
        first, last, edit = obj.get("first_edit"), obj.get("last_edit"), obj.get("edit")
        if first != previous + 1 or not isinstance(last, int) or last < first:
            raise RunFolderError(f"{found[b].name}: edits {first}..{last} do not follow edit {previous}")
        if not isinstance(edit, dict):
            raise RunFolderError(f"{found[b].name}: 'edit' is not an object")
        case_ids = ",".join(str(c) for c in obj.get("case_ids") or [])
        edits.append(EditResult(b, case_ids, {}, edit, None))
        ends.append(last)
        previous = last
    return edits, ends


def _read_evaluation(path: Path, n: int) -> Evaluation:
    obj = _read_object(path)
    records, kept = obj.get("records"), obj.get("preservation")
    if not isinstance(records, list) or len(records) != n:
        raise RunFolderError(f"{path.name}: expected {n} evaluated records, found "
                             f"{len(records) if isinstance(records, list) else 'none'}")
    posts = []
    for i, record in enumerate(records):
        post = record.get("post") if isinstance(record, dict) else None
        if not isinstance(post, dict) or not all(isinstance(post.get(f"{k}_prompts_correct"), list) for k in PROMPT_KINDS):
            raise RunFolderError(f"{path.name}: record {i} has no '*_prompts_correct' metrics")
        posts.append(post)
    if not isinstance(kept, dict) or not all(isinstance(kept.get(f), int) for f in PRESERVATION_FIELDS):
        raise RunFolderError(f"{path.name}: 'preservation' needs the counts {', '.join(PRESERVATION_FIELDS)}")
    return Evaluation(n, tuple(posts), kept)


def load_sequential_run(path: Path, algorithm: str, meta: dict[str, Any], params: dict[str, Any],
                        allow_partial: bool) -> Run:
    edits, ends = _read_batches(path)
    n_edits = ends[-1]
    unfinished = _incomplete_reason(path, meta, n_edits)
    if unfinished and not allow_partial:
        raise RunFolderError(f"{unfinished} (summarise its finished edits with --include_partial)")
    # an unfinished run may have been stopped between its last batch file and that batch's evaluation
    last_ok = ends[-2] if unfinished and len(ends) > 1 else (0 if unfinished else n_edits)
    found = checkpoint_files(path, EVALUATION_FILE_RE, n_edits, meta.get("eval_checkpoints"), last_ok,
                             "evaluation_after_edit_{n}.json")
    evaluations = {n: _read_evaluation(f, n) for n, f in sorted(found.items())}
    if not evaluations and not unfinished:
        raise RunFolderError("no evaluation_after_edit_*.json files")
    return Run(algorithm, path.name, path, meta, params, tuple(edits), {}, partial=unfinished is not None,
               protocol="sequential", evaluations=evaluations, batch_ends=tuple(ends))
