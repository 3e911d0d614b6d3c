"""The WilKE paper's protocol: edit, evaluate, roll back; perturbations accumulate.

For n = 1..edit_times: record n of the edit stream is edited, evaluated with its dataset's metrics
into ``edit_{n}_on_case_{id}.json``, then rolled back by the editor (the request again with its
targets swapped; WilKE on the same layer). Weights are never restored from a copy. At the retention
checkpoints (powers of two and multiples of 50) ``retention_of_edit_{n}.json`` counts how many of
records 1..n and of the original-retention set the model still answers with target_true.
``locality_of_edit_{n}.json`` holds the edit's unchanged-prediction locality (before its roll-back),
and with ``--wild`` ``wild_of_edit_{n}.json`` its WILD scores, kept apart so the per-edit files stay the
paper's. With ``--capability_checks`` the general abilities are checked on the unedited model and at
the retention checkpoints (or every ``--capability_every`` edits), after the roll-back.

Summarised at each retention checkpoint n: the per-edit metrics of edits 1..n (each read right after
its own edit), ERS = edit_retention / n and ORS = orig_retention / orig_retention_len.
"""
from __future__ import annotations

import dataclasses
import re
import time
from pathlib import Path
from typing import Any

from dsets.registry import EditDataset
from editing.requests import record_request
from experiments.protocols.base import FlagError, Protocol, RunContext, UneditedAnswers
from experiments.protocols.split import count_retained, retention_checkpoints
from experiments.py.numerics import check_metrics
from experiments.store.run_types import (
    Checkpoint,
    EditResult,
    RunContent,
    RunFolderError,
    check_post,
    checkpoint_files,
    incomplete_reason,
    numbered_files,
    read_object,
    refuse_partial,
)

EDIT_FILE_RE = re.compile(r"^edit_(\d+)_on_case_(.+)\.json$")
RETENTION_FILE_RE = re.compile(r"^retention_of_edit_(\d+)\.json$")
RETENTION_FIELDS = ("edit_retention", "edit_retention_len", "orig_retention", "orig_retention_len")


def edit_file_name(n: int, case_id: Any) -> str:
    return f"edit_{n}_on_case_{case_id}.json"


def retention_file_name(n: int) -> str:
    return f"retention_of_edit_{n}.json"


def locality_file_name(n: int) -> str:
    return f"locality_of_edit_{n}.json"


def wild_file_name(n: int) -> str:
    return f"wild_of_edit_{n}.json"


class RollbackProtocol(Protocol):
    name = "rollback"
    description = "the WilKE paper's: edit, evaluate, roll back; one record at a time"

    @classmethod
    def check_dataset(cls, dataset: EditDataset) -> None:
        if not dataset.target_true_is_answer:  # ROME's zsRE: target_true is a placeholder, nothing to return to
            raise FlagError("--protocol rollback", f"{dataset.source_path.name}: its records' target_true is a "
                            "placeholder, not an answer the model gave, so an edit cannot be rolled back to it",
                            "use --protocol sequential (or immediate), or --ds_name zsre_mend (MEND's targets)")

    def __init__(self, ctx: RunContext, settings: dict | None = None):
        super().__init__(ctx, settings)
        self.retention_points = retention_checkpoints(ctx.edit_times)
        self.unedited = UneditedAnswers(ctx, watched=[])

    @property
    def n_steps(self) -> int:
        return self.ctx.edit_times

    def prepare(self) -> None:
        self.unedited.load_or_compute()
        self.ctx.check_capabilities(0, True)

    def checkpoint_steps(self) -> set[int]:
        return set(self.retention_points)

    def step_records(self, i: int) -> list[dict]:
        return [self.ctx.split.edit_stream[i - 1]]

    def first_unfinished_step(self) -> int:
        for n, record in enumerate(self.ctx.split.edit_stream[: self.n_steps], start=1):
            if not (self.ctx.run_dir / edit_file_name(n, record["case_id"])).is_file():
                return n
        return self.n_steps + 1

    def run_fields(self) -> dict:
        return {**super().run_fields(), "rollback": True, "retention_checkpoints": self.retention_points}

    def step(self, n: int) -> None:
        ctx = self.ctx
        record = ctx.split.edit_stream[n - 1]
        request = record_request(record)
        outcome, edit_info = ctx.edit(lambda: ctx.editor.edit([request]), "edit")
        start = time.perf_counter()
        with ctx.editor.for_evaluation():
            post = ctx.metrics.rewrite_quality(ctx.model, ctx.tok, record, ctx.generation_for(n))
            check_metrics(post, "evaluation")
            eval_seconds = time.perf_counter() - start
            locality = self.unedited.locality(record)
            wild_before = ctx.wild_seconds
            wild = ctx.wild_scores([record], self.unedited)[0]
            wild_seconds = ctx.wild_seconds - wild_before
        _, rollback_info = ctx.edit(lambda: ctx.editor.rollback([request], outcome), "rollback")
        ctx.write(edit_file_name(n, record["case_id"]), {
            "case_id": record["case_id"],
            "edit_index": n,
            "requested_rewrite": record["requested_rewrite"],
            "time": edit_info["seconds"],
            "post": post,
            "edit": edit_info,
            "rollback": rollback_info,
            "eval_seconds": eval_seconds,
        })
        ctx.write(locality_file_name(n), {"edit_index": n, "case_id": record["case_id"], "post": locality})
        if wild:
            ctx.write(wild_file_name(n), {"edit_index": n, "case_id": record["case_id"], "post": wild,
                                          "seconds": wild_seconds})
        if n in self.retention_points or ctx.capability_due(n, False):
            with ctx.editor.for_evaluation():
                if n in self.retention_points:
                    self.write_retention(n)
                ctx.check_capabilities(n, n in self.retention_points)

    def write_retention(self, n: int) -> None:
        ctx = self.ctx
        edited = ctx.split.edit_stream[:n]
        ctx.write(retention_file_name(n), {
            "edit_index": n,
            "edit_retention": count_retained(ctx.model, ctx.tok, edited),
            "edit_retention_len": len(edited),
            "orig_retention": count_retained(ctx.model, ctx.tok, ctx.split.orig_retention, ctx.split.watched_answer),
            "orig_retention_len": len(ctx.split.orig_retention),
            # the names the WilKE paper's notebooks read (tests/test_protocols.py: NOTEBOOK_KEYS)
            "edit_length": len(edited),
            "orig_length": len(ctx.split.orig_retention),
        })

    # --- reading -------------------------------------------------------------------------------

    @classmethod
    def read_run(cls, path: Path, meta: dict, allow_partial: bool) -> RunContent:
        """Edit files 1..E without gaps (E = run.json's edit_times unless partial runs are allowed) and
        a retention file at every planned checkpoint; the ``edit`` details are optional, so folders
        of the paper's own code can be summarised too."""
        files = numbered_files(path, EDIT_FILE_RE, "edit", "edit_*_on_case_*.json")
        edits = tuple(_with_locality(path, _read_edit(f, n, EDIT_FILE_RE.match(f.name).group(2)))
                      for n, f in files.items())
        n_edits = len(edits)
        unfinished = incomplete_reason(path, meta, n_edits)
        refuse_partial(unfinished, allow_partial)
        # an unfinished run may have been stopped between its last edit file and that edit's retention file
        last_ok = n_edits - 1 if unfinished else n_edits
        found = checkpoint_files(path, RETENTION_FILE_RE, n_edits, meta.get("retention_checkpoints"), last_ok,
                                 "retention_of_edit_{n}.json")
        if not found:
            raise RunFolderError("no retention_of_edit_*.json files")
        checkpoints = {n: _read_retention(f, n, edits) for n, f in found.items()}
        return RunContent(edits, tuple(range(1, n_edits + 1)), checkpoints, partial=unfinished is not None)


def _read_edit(path: Path, index: int, case_id: str) -> EditResult:
    obj = read_object(path)
    post = check_post(obj.get("post"), path.name)
    edit = obj.get("edit")
    if edit is None:
        edit = {}  # files of the reference code have no edit details: no norms or layers, scores still count
    if not isinstance(edit, dict):
        raise RunFolderError(f"{path.name}: 'edit' is not an object")
    if obj.get("edit_index", index) != index:
        raise RunFolderError(f"{path.name}: edit_index {obj.get('edit_index')} does not match the file name")
    rollback = obj.get("rollback")
    return EditResult(index, case_id, post, edit, rollback if isinstance(rollback, dict) else None)


def _with_locality(path: Path, edit: EditResult) -> EditResult:
    """The edit with what is kept beside its file in its post: its unchanged-prediction locality
    (``locality_of_edit_{n}.json``) and its WILD scores (``wild_of_edit_{n}.json``, with --wild)."""
    post = dict(edit.post)
    for f in (path / locality_file_name(edit.index), path / wild_file_name(edit.index)):
        if not f.is_file():
            continue  # runs of earlier versions or of the reference code; runs without --wild
        extra = read_object(f).get("post")
        if not isinstance(extra, dict):
            raise RunFolderError(f"{f.name}: no 'post' object")
        post.update(extra)
    return dataclasses.replace(edit, post=post)


def _read_retention(path: Path, n: int, edits: tuple[EditResult, ...]) -> Checkpoint:
    obj = read_object(path)
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
    kept = values["orig_retention_len"]
    ratios = {"ERS": values["edit_retention"] / n, "ORS": values["orig_retention"] / kept if kept else float("nan")}
    return Checkpoint(n, tuple(e.post for e in edits[:n]), ratios)
