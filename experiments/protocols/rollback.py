"""The WilKE paper's protocol: edit, evaluate, roll back; perturbations accumulate.

For n = 1..edit_times: record n of the edit stream is edited, evaluated with its dataset's metrics
into ``edit_{n}_on_case_{id}.json``, then rolled back by the editor (the request again with its
targets swapped; WilKE on the same layer). Weights are never restored from a copy. At the retention
checkpoints (powers of two and multiples of 50) ``retention_of_edit_{n}.json`` counts how many of
records 1..n and of the original-retention set the model still answers with target_true.
``locality_of_edit_{n}.json`` holds the edit's unchanged-prediction locality (before its roll-back),
kept apart so the per-edit files stay the paper's.
"""
from __future__ import annotations

import time

from editing.requests import record_request
from experiments.py.numerics import check_metrics
from experiments.protocols.base import Protocol, RunContext, UneditedAnswers
from experiments.protocols.split import count_retained, retention_checkpoints
from experiments.store.files import edit_file_name, locality_file_name, retention_file_name


class RollbackProtocol(Protocol):
    name = "rollback"

    def __init__(self, ctx: RunContext):
        super().__init__(ctx)
        self.retention_points = retention_checkpoints(ctx.edit_times)
        self.unedited = UneditedAnswers(ctx, watched=[])

    @property
    def n_steps(self) -> int:
        return self.ctx.edit_times

    def prepare(self) -> None:
        self.unedited.load_or_compute()

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
        return {"protocol": self.name, "rollback": True, "retention_checkpoints": self.retention_points}

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
        if n in self.retention_points:
            with ctx.editor.for_evaluation():
                self.write_retention(n)

    def write_retention(self, n: int) -> None:
        ctx = self.ctx
        edited = ctx.split.edit_stream[:n]
        ctx.write(retention_file_name(n), {
            "edit_index": n,
            "edit_retention": count_retained(ctx.model, ctx.tok, edited),
            "edit_retention_len": len(edited),
            "orig_retention": count_retained(ctx.model, ctx.tok, ctx.split.orig_retention),
            "orig_retention_len": len(ctx.split.orig_retention),
            # the names the WilKE notebooks read
            "edit_length": len(edited),
            "orig_length": len(ctx.split.orig_retention),
        })
