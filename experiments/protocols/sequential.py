"""Sequential editing, the setting of AlphaEdit and EasyEdit's ``sequential_edit``: edits in a row,
in batches, never rolled back; every record edited so far evaluated at chosen checkpoints.

The edit stream is edited in order, ``--num_edits`` records per editor call (one MEMIT update for a
batch; ROME and WilKE take batches of 1). Step b writes ``batch_{b}.json`` (what the edit did:
case ids, the editor's details, update norms, seconds). After the last edit of a checkpoint n
(``--eval_checkpoints``; default the powers of two on batch boundaries, and the last edit), every
record edited so far is evaluated on the current model with its dataset's metrics and its
unchanged-prediction locality, and the untouched original-retention half measures preservation
(answered with target_true; answered as the unedited model did): ``evaluation_after_edit_{n}.json``.
This is AlphaEdit's "evaluated after the last edit" (and EasyEdit's before 2026-06); the
``immediate`` protocol is EasyEdit's since then.

Summarised at each checkpoint n: the metrics of records 1..n as evaluated after n edits, PS = share
of the untouched records still answered with target_true, PU = share answered as before editing.
"""
from __future__ import annotations

import argparse
import random
import re
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from tqdm import tqdm

from editing.requests import record_request
from experiments.protocols.base import FlagError, Protocol, RunContext, UneditedAnswers
from experiments.protocols.split import count_retained, powers_of_two
from experiments.py.dataset_metrics import evaluate_records
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

EVAL_CHUNK = 16  # records per scoring pass of an evaluation (their prompts share length-sorted batches)
BATCH_FILE_RE = re.compile(r"^batch_(\d+)\.json$")
EVALUATION_FILE_RE = re.compile(r"^evaluation_after_edit_(\d+)\.json$")
PRESERVATION_FIELDS = ("retained", "unchanged", "n_records")


def batch_file_name(b: int) -> str:
    return f"batch_{b}.json"


def evaluation_file_name(n: int) -> str:
    return f"evaluation_after_edit_{n}.json"


def edit_counts(text: str) -> list[int]:
    try:
        return sorted({int(t) for t in text.split(",") if t.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated edit counts, got {text!r}") from None


def add_batch_arguments(group: argparse._ArgumentGroup) -> None:
    """The flags of every protocol that edits the stream in batches, never rolled back."""
    group.add_argument("--num_edits", type=int, default=1, help="records per editor call (a batch)")
    group.add_argument("--eval_checkpoints", type=edit_counts, default=None,
                       help="edit counts after which records are evaluated (immediate: preservation only), "
                       "comma-separated (default: powers of two that end a batch, and the last edit)")


def eval_sample(n: int, size: Optional[int], seed: int, final: bool) -> list[int]:
    """Which of records 1..n a checkpoint evaluates: all of them at the last checkpoint or without a
    sample size, else a sample of ``size`` drawn by a generator seeded with (run seed, n), so a
    resumed run evaluates the same records."""
    if size is None or final or size >= n:
        return list(range(1, n + 1))
    return sorted(random.Random(f"eval_sample:{seed}:{n}").sample(range(1, n + 1), size))


def default_eval_checkpoints(edit_times: int, num_edits: int) -> list[int]:
    """Powers of two that end a batch, and the last edit."""
    return sorted({n for n in powers_of_two(edit_times) if n % num_edits == 0} | {edit_times})


def check_eval_checkpoints(points: Sequence[int], edit_times: int, num_edits: int) -> list[int]:
    """The checkpoints, or a FlagError naming one that no batch ends at."""
    fix = "give edit counts that end a batch, at most --edit_times"
    for n in points:
        if not 1 <= n <= edit_times:
            raise FlagError("--eval_checkpoints", f"evaluation checkpoint {n} is outside 1..{edit_times} (--edit_times)", fix)
        if n % num_edits and n != edit_times:
            raise FlagError("--eval_checkpoints", f"evaluation checkpoint {n} falls inside a batch of {num_edits} "
                            "(--num_edits); use multiples of --num_edits or the last edit", fix)
    return sorted(set(points))


class SequentialProtocol(Protocol):
    name = "sequential"
    description = "AlphaEdit's: edits in a row, in batches, never rolled back; all edited records evaluated at checkpoints"

    @classmethod
    def add_arguments(cls, group: argparse._ArgumentGroup) -> None:
        add_batch_arguments(group)
        group.add_argument("--eval_sample", type=int, default=None,
                           help="evaluate a fixed, seeded sample of this many of the records edited so far at each "
                           "checkpoint but the last (all records at the last); default: all records at every checkpoint")

    @classmethod
    def check_arguments(cls, args: argparse.Namespace, batch_edits: bool) -> None:
        if args.num_edits < 1:
            raise FlagError("--num_edits", f"is {args.num_edits}", "give a positive integer")
        if args.num_edits > 1 and not batch_edits:
            raise FlagError("--num_edits", f"{args.alg_name} edits one fact at a time",
                            "use --num_edits 1 (batches need a batch editor: MEMIT, FT, ...)")

    @classmethod
    def settings(cls, args: argparse.Namespace, edit_times: int) -> dict:
        sample = getattr(args, "eval_sample", None)
        if sample is not None and not 1 <= sample <= edit_times:
            raise FlagError("--eval_sample", f"is {sample}, outside 1..{edit_times} (the records edited)",
                            "give a sample size between 1 and --edit_times, or drop the flag to evaluate every record")
        points = args.eval_checkpoints or default_eval_checkpoints(edit_times, args.num_edits)
        settings = {"num_edits": args.num_edits, "eval_checkpoints": check_eval_checkpoints(points, edit_times, args.num_edits)}
        return settings if sample is None else {**settings, "eval_sample": sample}

    def __init__(self, ctx: RunContext, settings: Optional[dict] = None):
        settings = settings if settings is not None else {"num_edits": 1, "eval_checkpoints": None}
        super().__init__(ctx, settings)
        self.num_edits = settings["num_edits"]
        if self.num_edits > 1 and not ctx.editor.batch_edits:
            raise ValueError(f"{type(ctx.editor).__name__} edits one fact at a time: use --num_edits 1")
        n = ctx.edit_times
        self.batches = [(first, min(first + self.num_edits - 1, n)) for first in range(1, n + 1, self.num_edits)]
        points = settings["eval_checkpoints"] or default_eval_checkpoints(n, self.num_edits)
        self.eval_points = check_eval_checkpoints(points, n, self.num_edits)
        self.unedited = UneditedAnswers(ctx, watched=ctx.split.orig_retention)

    @property
    def n_steps(self) -> int:
        return len(self.batches)

    def prepare(self) -> None:
        self.unedited.load_or_compute()
        self.ctx.check_capabilities(0, True)

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
        fields = {"protocol": self.name, "rollback": False, "num_edits": self.num_edits,
                  "eval_checkpoints": self.eval_points, "n_batches": self.n_steps}
        if self.settings.get("eval_sample") is not None:
            fields["eval_sample"] = self.settings["eval_sample"]
        return fields

    def step(self, b: int) -> None:
        """Edit batch b; then what this protocol evaluates after it; then ``batch_{b}.json``."""
        ctx = self.ctx
        first, last = self.batches[b - 1]
        records = self.step_records(b)
        requests = [record_request(r) for r in records]
        _, info = ctx.edit(lambda: ctx.editor.edit(requests), "edit")
        extra = {}
        if self.evaluates_after(last):
            with ctx.editor.for_evaluation():
                extra = self.evaluate_after(b, records)
        ctx.write(batch_file_name(b), {
            "batch_index": b,
            "first_edit": first,
            "last_edit": last,
            "case_ids": [r["case_id"] for r in records],
            "time": info["seconds"],
            "edit": info,
            **extra,
        })

    def evaluates_after(self, last: int) -> bool:
        """Whether the model is evaluated after the batch that ends at edit ``last``."""
        return last in self.eval_points or self.ctx.capability_due(last, False)

    def evaluate_after(self, b: int, records: Sequence[dict]) -> dict:
        """At a checkpoint every record edited so far and the untouched half; general abilities where due.
        Returns what the batch's file adds (nothing here)."""
        last = self.batches[b - 1][1]
        if last in self.eval_points:
            self.evaluate(last)
        self.ctx.check_capabilities(last, last in self.eval_points)
        return {}

    def evaluate_edited(self, records: Sequence[dict], indices: Sequence[int], desc: str) -> list[dict]:
        """Each record's metrics and unchanged-prediction locality on the current model, many records
        per scoring pass (``evaluate_records`` of experiments/py/dataset_metrics.py); ``indices``: their
        places in the edit stream (which records get generation tests)."""
        ctx, rows = self.ctx, []
        chunks = [range(i, min(i + EVAL_CHUNK, len(records))) for i in range(0, len(records), EVAL_CHUNK)]
        for chunk in tqdm(chunks, desc=desc, unit=f"{EVAL_CHUNK} records", leave=False, disable=len(chunks) < 2):
            part = [records[i] for i in chunk]
            unedited = [self.unedited.neighborhood[str(r["case_id"])] for r in part]
            posts = evaluate_records(ctx.model, ctx.tok, ctx.metrics, part, unedited)
            for post, wild in zip(posts, ctx.wild_scores(part, self.unedited)):
                post.update(wild)
            for i, record, post in zip(chunk, part, posts):
                generation = ctx.generation_for(indices[i])
                if generation is not None:
                    post.update(generation(ctx.model, ctx.tok, record))
                check_metrics(post, "evaluation")
                rows.append({"case_id": record["case_id"], "edit_index": indices[i], "post": post})
        return rows

    def preservation(self) -> dict[str, int]:
        """How the untouched original-retention records fare on the current model."""
        ctx, kept = self.ctx, self.ctx.split.orig_retention
        return {"retained": count_retained(ctx.model, ctx.tok, kept, ctx.split.watched_answer),
                "unchanged": self.unedited.retention_unchanged(kept), "n_records": len(kept)}

    def evaluate(self, n: int) -> None:
        """Every record edited so far (or the seeded sample of them), and the untouched half."""
        start, wild_before = time.perf_counter(), self.ctx.wild_seconds
        indices = eval_sample(n, self.settings.get("eval_sample"), self.ctx.split.seed, final=n == self.ctx.edit_times)
        records = [self.ctx.split.edit_stream[k - 1] for k in indices]
        rows = self.evaluate_edited(records, indices, f"evaluation after {n} edits")
        self.ctx.write(evaluation_file_name(n), {
            "edit_index": n,
            "records": rows,
            "preservation": self.preservation(),
            "eval_seconds": time.perf_counter() - start,
            "wild_seconds": self.ctx.wild_seconds - wild_before,  # of eval_seconds
        })

    # --- reading -------------------------------------------------------------------------------

    @classmethod
    def read_run(cls, path: Path, meta: dict, allow_partial: bool) -> RunContent:
        """``batch_{b}.json`` for b = 1..B without gaps, each following on from the previous batch,
        and ``evaluation_after_edit_{n}.json`` for every planned checkpoint n reached."""
        steps, ends = read_batches(path)
        unfinished = incomplete_reason(path, meta, ends[-1])
        refuse_partial(unfinished, allow_partial)
        found = checkpoint_files(path, EVALUATION_FILE_RE, ends[-1], meta.get("eval_checkpoints"),
                                 last_checked(ends, unfinished), "evaluation_after_edit_{n}.json")
        if not found and not unfinished:
            raise RunFolderError("no evaluation_after_edit_*.json files")
        sample, last = meta.get("eval_sample"), meta.get("edit_times")
        checkpoints = {n: _read_evaluation(f, n, sample, n == last) for n, f in found.items()}
        return RunContent(steps, ends, checkpoints, partial=unfinished is not None)


def last_checked(ends: Sequence[int], unfinished: Optional[str]) -> int:
    """The last edit whose checkpoint file must exist: an unfinished run may have been stopped
    between its last batch file and that batch's evaluation."""
    if not unfinished:
        return ends[-1]
    return ends[-2] if len(ends) > 1 else 0


def read_batches(path: Path) -> tuple[tuple[EditResult, ...], tuple[int, ...]]:
    edits, ends, previous = [], [], 0
    for b, f in numbered_files(path, BATCH_FILE_RE, "batch", "batch_*.json").items():
        obj = read_object(f)
        first, last, edit = obj.get("first_edit"), obj.get("last_edit"), obj.get("edit")
        if first != previous + 1 or not isinstance(last, int) or last < first:
            raise RunFolderError(f"{f.name}: edits {first}..{last} do not follow edit {previous}")
        if not isinstance(edit, dict):
            raise RunFolderError(f"{f.name}: 'edit' is not an object")
        case_ids = ",".join(str(c) for c in obj.get("case_ids") or [])
        edits.append(EditResult(b, case_ids, {}, edit, None))
        ends.append(last)
        previous = last
    return tuple(edits), tuple(ends)


def read_preservation(obj: Any, where: str) -> dict[str, float]:
    if not isinstance(obj, dict) or not all(isinstance(obj.get(f), int) for f in PRESERVATION_FIELDS):
        raise RunFolderError(f"{where}: 'preservation' needs the counts {', '.join(PRESERVATION_FIELDS)}")
    n = obj["n_records"]
    return {"PS": obj["retained"] / n, "PU": obj["unchanged"] / n} if n else {}


def _read_evaluation(path: Path, n: int, sample: Optional[int], final: bool) -> Checkpoint:
    obj = read_object(path)
    records = obj.get("records")
    expected = n if sample is None or final else min(sample, n)
    if not isinstance(records, list) or len(records) != expected:
        raise RunFolderError(f"{path.name}: expected {expected} evaluated records, found "
                             f"{len(records) if isinstance(records, list) else 'none'}")
    posts = tuple(check_post(r.get("post") if isinstance(r, dict) else None, f"{path.name}: record {i}")
                  for i, r in enumerate(records))
    return Checkpoint(n, posts, read_preservation(obj.get("preservation"), path.name))
