"""Sequential editing, the setting of AlphaEdit and EasyEdit's ``sequential_edit``: edits in a row,
in batches, never rolled back; every record edited so far evaluated at chosen checkpoints.

The edit stream is edited in order, ``num_edits`` records per editor call (one MEMIT update for a
batch; ROME and WilKE take batches of 1). Step b writes ``batch_{b}.json`` (what the edit did:
case ids, the editor's details, update norms, seconds). After the last edit of a checkpoint n
(``--eval_checkpoints``; default the powers of two on batch boundaries, and the last edit), every
record edited so far is evaluated on the current model with its dataset's metrics and its
unchanged-prediction locality, and the untouched original-retention half measures preservation
(answered with target_true; answered as the unedited model did): ``evaluation_after_edit_{n}.json``.
"""
from __future__ import annotations

import time
from typing import Optional, Sequence

from editing.requests import record_request
from experiments.py.numerics import check_metrics
from experiments.protocols.base import Protocol, RunContext, UneditedAnswers
from experiments.protocols.split import count_retained, powers_of_two
from experiments.store.files import batch_file_name, evaluation_file_name


def default_eval_checkpoints(edit_times: int, num_edits: int) -> list[int]:
    """Powers of two that end a batch, and the last edit."""
    return sorted({n for n in powers_of_two(edit_times) if n % num_edits == 0} | {edit_times})


def check_eval_checkpoints(points: Sequence[int], edit_times: int, num_edits: int) -> list[int]:
    """The checkpoints, or a ValueError naming one that no batch ends at."""
    for n in points:
        if not 1 <= n <= edit_times:
            raise ValueError(f"evaluation checkpoint {n} is outside 1..{edit_times} (--edit_times)")
        if n % num_edits and n != edit_times:
            raise ValueError(f"evaluation checkpoint {n} falls inside a batch of {num_edits} (--num_edits); "
                             "use multiples of --num_edits or the last edit")
    return sorted(set(points))


class SequentialProtocol(Protocol):
    name = "sequential"

    def __init__(self, ctx: RunContext, num_edits: int = 1, eval_checkpoints: Optional[Sequence[int]] = None):
        super().__init__(ctx)
        if num_edits > 1 and not ctx.editor.batch_edits:
            raise ValueError(f"{type(ctx.editor).__name__} edits one fact at a time: use --num_edits 1")
        self.num_edits = num_edits
        n = ctx.edit_times
        self.batches = [(first, min(first + num_edits - 1, n)) for first in range(1, n + 1, num_edits)]
        points = eval_checkpoints if eval_checkpoints is not None else default_eval_checkpoints(n, num_edits)
        self.eval_points = check_eval_checkpoints(points, n, num_edits)
        self.unedited = UneditedAnswers(ctx, watched=ctx.split.orig_retention)

    @property
    def n_steps(self) -> int:
        return len(self.batches)

    def prepare(self) -> None:
        self.unedited.load_or_compute()

    def checkpoint_steps(self) -> set[int]:
        return {b for b, (_, last) in enumerate(self.batches, start=1) if last in self.eval_points}

    def step_records(self, b: int) -> list[dict]:
        first, last = self.batches[b - 1]
        return self.ctx.split.edit_stream[first - 1 : last]

    def first_unfinished_step(self) -> int:
        for b in range(1, self.n_steps + 1):
            if not (self.ctx.run_dir / batch_file_name(b)).is_file():
                return b
        return self.n_steps + 1

    def run_fields(self) -> dict:
        return {"protocol": self.name, "rollback": False, "num_edits": self.num_edits,
                "eval_checkpoints": self.eval_points, "n_batches": self.n_steps}

    def step(self, b: int) -> None:
        ctx = self.ctx
        first, last = self.batches[b - 1]
        records = self.step_records(b)
        requests = [record_request(r) for r in records]
        _, info = ctx.edit(lambda: ctx.editor.edit(requests), "edit")
        ctx.write(batch_file_name(b), {
            "batch_index": b,
            "first_edit": first,
            "last_edit": last,
            "case_ids": [r["case_id"] for r in records],
            "time": info["seconds"],
            "edit": info,
        })
        if last in self.eval_points:
            with ctx.editor.for_evaluation():
                self.evaluate(last)

    def evaluate(self, n: int) -> None:
        """Every record edited so far, and the untouched half, on the current model."""
        ctx = self.ctx
        start = time.perf_counter()
        rows = []
        for k, record in enumerate(ctx.split.edit_stream[:n], start=1):
            post = ctx.metrics.rewrite_quality(ctx.model, ctx.tok, record, ctx.generation_for(k))
            check_metrics(post, "evaluation")
            post.update(self.unedited.locality(record))
            rows.append({"case_id": record["case_id"], "edit_index": k, "post": post})
        kept = ctx.split.orig_retention
        ctx.write(evaluation_file_name(n), {
            "edit_index": n,
            "records": rows,
            "preservation": {
                "retained": count_retained(ctx.model, ctx.tok, kept),
                "unchanged": self.unedited.retention_unchanged(kept),
                "n_records": len(kept),
            },
            "eval_seconds": time.perf_counter() - start,
        })
