"""EasyEdit's sequential editing since 2026-06: edits in a row, each request evaluated right after
its own edit.

The edit stream is edited in order in batches of ``--num_edits``, never rolled back, as in the
``sequential`` protocol; but each batch's records are evaluated right after that batch's edit
(their dataset metrics and unchanged-prediction locality, in ``batch_{b}.json`` under
``records``), not again later. At the ``--eval_checkpoints`` only the untouched original-retention
records are checked (``preservation_after_edit_{n}.json``), which is cheap. Its numbers are
therefore not comparable with "evaluated after the last edit" (AlphaEdit, older EasyEdit: the
``sequential`` protocol); EasyEdit #518 shows the same method scoring 0.24 or 94.6 depending on
which. Summarised at checkpoint n: records 1..n as each was read right after its own edit, PS, PU.
"""
from __future__ import annotations

import argparse
import re
import time
from pathlib import Path
from typing import Sequence

from experiments.protocols.sequential import (
    SequentialProtocol,
    add_batch_arguments,
    batch_file_name,
    last_checked,
    read_batches,
    read_preservation,
)
from experiments.store.run_types import (
    Checkpoint,
    RunContent,
    RunFolderError,
    check_post,
    checkpoint_files,
    incomplete_reason,
    read_object,
    refuse_partial,
)

PRESERVATION_FILE_RE = re.compile(r"^preservation_after_edit_(\d+)\.json$")


def preservation_file_name(n: int) -> str:
    return f"preservation_after_edit_{n}.json"


class ImmediateProtocol(SequentialProtocol):
    name = "immediate"
    description = "EasyEdit's (since 2026-06): edits in a row, in batches; each request evaluated right after its own edit"

    @classmethod
    def add_arguments(cls, group: argparse._ArgumentGroup) -> None:
        add_batch_arguments(group)

    def evaluates_after(self, last: int) -> bool:
        return True

    def evaluate_after(self, b: int, records: Sequence[dict]) -> dict:
        """The batch's records right after their edit (kept in its file); preservation at checkpoints."""
        ctx = self.ctx
        first, last = self.batches[b - 1]
        start, wild_before = time.perf_counter(), ctx.wild_seconds
        rows = self.evaluate_edited(records, range(first, last + 1), f"evaluation of batch {b}")
        eval_seconds = time.perf_counter() - start
        if last in self.eval_points:
            ctx.write(preservation_file_name(last), {"edit_index": last, "preservation": self.preservation()})
        ctx.check_capabilities(last, last in self.eval_points)
        return {"records": rows, "eval_seconds": eval_seconds, "wild_seconds": ctx.wild_seconds - wild_before}

    @classmethod
    def read_run(cls, path: Path, meta: dict, allow_partial: bool) -> RunContent:
        steps, ends = read_batches(path)
        posts = []
        for step in steps:
            records = read_object(path / batch_file_name(step.index)).get("records")
            if not isinstance(records, list):
                raise RunFolderError(f"{batch_file_name(step.index)}: no 'records' evaluated right after the edit")
            posts += [check_post(r.get("post") if isinstance(r, dict) else None, f"{batch_file_name(step.index)}: record {i}")
                      for i, r in enumerate(records)]
        unfinished = incomplete_reason(path, meta, ends[-1])
        refuse_partial(unfinished, allow_partial)
        found = checkpoint_files(path, PRESERVATION_FILE_RE, ends[-1], meta.get("eval_checkpoints"),
                                 last_checked(ends, unfinished), "preservation_after_edit_{n}.json")
        checkpoints = {n: Checkpoint(n, tuple(posts[:n]), read_preservation(read_object(f).get("preservation"), f.name))
                       for n, f in found.items()}
        return RunContent(steps, ends, checkpoints, partial=unfinished is not None)
