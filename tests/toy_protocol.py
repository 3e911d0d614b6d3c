"""A protocol written the way a fork would add one: this module alone, registered by one call.

``--protocol probe``: records edited one at a time in stream order, never rolled back; every
``--probe_every`` edits the model is probed on the rewrite prompts of all records edited so far,
into ``probe_after_edit_{n}.json``; nothing else is written per step but ``probe_step_{i}.json``.
Its reader gives the summaries the same shape as every other protocol's.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

from editing.requests import record_request
from experiments.protocols import FlagError, Protocol, register_protocol
from experiments.store.run_types import Checkpoint, EditResult, RunContent, numbered_files, read_object
from util.scoring import score_targets

STEP_FILE_RE = re.compile(r"^probe_step_(\d+)\.json$")
PROBE_FILE_RE = re.compile(r"^probe_after_edit_(\d+)\.json$")


class ProbeProtocol(Protocol):
    name = "probe"
    description = "a test's own protocol: edits in a row, rewrite prompts probed every --probe_every edits"

    @classmethod
    def add_arguments(cls, group: argparse._ArgumentGroup) -> None:
        group.add_argument("--probe_every", type=int, default=2, help="edits between probes")

    @classmethod
    def check_arguments(cls, args: argparse.Namespace, batch_edits: bool) -> None:
        if args.probe_every < 1:
            raise FlagError("--probe_every", f"is {args.probe_every}", "give a positive integer")

    @classmethod
    def settings(cls, args: argparse.Namespace, edit_times: int) -> dict:
        return {"probe_every": args.probe_every}

    @property
    def n_steps(self) -> int:
        return self.ctx.edit_times

    def step_records(self, i: int) -> list[dict]:
        return [self.ctx.split.edit_stream[i - 1]]

    def checkpoint_steps(self) -> set[int]:
        return {i for i in range(1, self.n_steps + 1) if i % self.settings["probe_every"] == 0}

    def first_unfinished_step(self) -> int:
        done = {int(m.group(1)) for p in self.ctx.run_dir.iterdir() if (m := STEP_FILE_RE.match(p.name))}
        return next(i for i in range(1, self.n_steps + 2) if i not in done)

    def step(self, i: int) -> None:
        ctx = self.ctx
        record = self.step_records(i)[0]
        _, info = ctx.edit(lambda: ctx.editor.edit([record_request(record)]), "edit")
        ctx.write(f"probe_step_{i}.json", {"case_id": record["case_id"], "edit": info})
        if i in self.checkpoint_steps():
            rewrites = [r["requested_rewrite"] for r in ctx.split.edit_stream[:i]]
            scores = score_targets(ctx.model, ctx.tok, [rw["prompt"].format(rw["subject"]) for rw in rewrites],
                                   [rw["target_new"]["str"] for rw in rewrites])
            ctx.write(f"probe_after_edit_{i}.json", {"edit_index": i, "correct": [bool(s.correct) for s in scores]})

    @classmethod
    def read_run(cls, path: Path, meta: dict, allow_partial: bool) -> RunContent:
        steps = tuple(EditResult(n, str(read_object(f)["case_id"]), {}, read_object(f)["edit"], None)
                      for n, f in numbered_files(path, STEP_FILE_RE, "step", "probe_step_*.json").items())
        checkpoints = {}
        for f in path.iterdir():
            if m := PROBE_FILE_RE.match(f.name):
                n, correct = int(m.group(1)), read_object(f)["correct"]
                posts = tuple({"rewrite_prompts_correct": [c], "paraphrase_prompts_correct": [],
                               "neighborhood_prompts_correct": []} for c in correct)
                checkpoints[n] = Checkpoint(n, posts, {})
        return RunContent(steps, tuple(range(1, len(steps) + 1)), checkpoints)


def register() -> None:
    register_protocol(ProbeProtocol)
