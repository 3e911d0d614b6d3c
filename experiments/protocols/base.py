"""What every protocol shares: the contract, the run's context, and the unedited model's answers.

A protocol owns everything about how edits are run and read back: its command-line flags
(``add_arguments``), their checks (``check_arguments`` before any file is read, ``settings`` once
the number of edits is known), what a step does and which files it writes, and how its run folders
are read into the summaries' shape (``read_run``). The run loop (experiments/run/loop.py) decides
nothing of that: it calls ``step(i)`` for i = 1..n_steps and checkpoints the weights (and the
editor's state) between steps; nothing outside a protocol's module branches on its name.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable, ClassVar, Optional, Sequence

from torch import nn
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from dsets.registry import EditDataset
from editing.editor import Editor, EditOutcome, update_norms
from experiments.protocols.split import ProtocolSplit, retention_prompt
from experiments.py.capability import CapabilityProbe
from experiments.py.dataset_metrics import DatasetMetrics
from experiments.py.locality import argmax_answers, unchanged
from experiments.py.numerics import check_weights
from experiments.py.wild import WildSettings, unedited_wild_answers, wild_scores_many
from experiments.store.checkpoints import WeightLedger
from experiments.store.files import read_json, strip_timing, write_json_atomic
from experiments.store.run_types import RunContent

LOG = logging.getLogger(__name__)
UNEDITED_FILE = "unedited_predictions.json"


def capability_file_name(n: int) -> str:
    return f"capability_after_edit_{n}.json"


class FlagError(ValueError):
    """A protocol flag that cannot be used: which flag, what is wrong, how to fix it."""

    def __init__(self, flag: str, message: str, fix: str):
        self.flag, self.message, self.fix = flag, message, fix
        super().__init__(f"{flag}: {message}")


@dataclasses.dataclass
class RunContext:
    """What a protocol works with: the model and its editor, the records, the run folder."""

    model: nn.Module
    tok: PreTrainedTokenizerBase
    editor: Editor
    metrics: DatasetMetrics
    split: ProtocolSplit
    edit_times: int
    run_dir: Path
    generation: Optional[Any] = None  # experiments.py.generation_metrics.GenerationTests
    generation_interval: int = 1
    conserve_memory: bool = False
    wild: Optional[WildSettings] = None  # WILD scores beside the teacher-forced ones
    capability: Optional[CapabilityProbe] = None  # general abilities, checked at capability points
    capability_every: Optional[int] = None  # check every N edits instead of at the protocol's checkpoints
    ledger: WeightLedger = dataclasses.field(default_factory=WeightLedger)
    replays: dict[str, bool] = dataclasses.field(default_factory=dict)  # file -> same as the killed run's
    wild_seconds: float = 0.0  # time spent in WILD generation so far by this process (evaluation files note their share)

    def edit(self, apply: Callable[[], EditOutcome], stage: str) -> tuple[EditOutcome, dict]:
        """Run one edit (or roll-back), check its weights, and measure its update."""
        start = time.perf_counter()
        outcome = apply()
        if self.conserve_memory:
            outcome.orig_weights = {k: v.cpu() for k, v in outcome.orig_weights.items()}
        self.ledger.note(outcome.orig_weights)
        check_weights(self.model, list(outcome.orig_weights), stage)
        info = {**outcome.details, **update_norms(self.model, outcome.orig_weights), "seconds": time.perf_counter() - start}
        return outcome, info

    def generation_for(self, n: int) -> Optional[Any]:
        """The generation tests for the record edited n-th (every ``generation_interval``-th record)."""
        return self.generation if self.generation is not None and (n - 1) % self.generation_interval == 0 else None

    def capability_due(self, n: int, at_checkpoint: bool) -> bool:
        """Whether general abilities are checked after n edits (0: the unedited model)."""
        if self.capability is None:
            return False
        if n == 0 or self.capability_every is None:
            return n == 0 or at_checkpoint
        return n % self.capability_every == 0 or n == self.edit_times

    def check_capabilities(self, n: int, at_checkpoint: bool) -> None:
        """``capability_after_edit_{n}.json`` when due: the probes' scores on the current model. The
        unedited model's (n = 0) is computed once, before the first edit, and kept for a resumed run."""
        name = capability_file_name(n)
        if not self.capability_due(n, at_checkpoint) or (n == 0 and (self.run_dir / name).is_file()):
            return
        LOG.info("general abilities after %d edits: %s", n, ", ".join(self.capability.settings.tasks) or "perplexity")
        self.write(name, {"edit_index": n, **self.capability.run(self.model, self.tok)})

    def wild_scores(self, records: Sequence[dict], unedited: "UneditedAnswers") -> list[dict]:
        """WILD scores of ``records`` on the current model ([{}] * n without --wild)."""
        if self.wild is None:
            return [{} for _ in records]
        references = [unedited.wild[str(r["case_id"])] for r in records]
        start = time.perf_counter()
        scores = wild_scores_many(self.model, self.tok, records, self.metrics.kind, references, self.wild)
        self.wild_seconds += time.perf_counter() - start
        return scores

    def write(self, name: str, result: dict) -> None:
        """Write a result file; when a resumed run replays a step, say whether it matches the old file."""
        path = self.run_dir / name
        if path.is_file():
            same = strip_timing(read_json(path)) == strip_timing(json.loads(json.dumps(result)))
            self.replays[name] = same
            (LOG.info if same else LOG.warning)("replayed %s: %s the interrupted run's", name,
                                                "identical to" if same else "DIFFERENT from")
        write_json_atomic(path, result)


class UneditedAnswers:
    """The unedited model's answers that unchanged-prediction locality compares against.

    Read once on the freshly loaded model, before any edit, and kept in ``unedited_predictions.json``
    so a resumed run (whose model already carries edits) compares against the same answers.
    """

    def __init__(self, ctx: RunContext, watched: Sequence[dict]):
        self.ctx = ctx
        self.path = ctx.run_dir / UNEDITED_FILE
        self.watched = list(watched)
        self.neighborhood: dict[str, list[list[int]]] = {}
        self.retention: dict[str, list[int]] = {}
        self.wild: dict[str, list[list[int]]] = {}  # --wild: the generated answers to the neighbourhood prompts

    def load_or_compute(self) -> None:
        if self.path.is_file():
            data = read_json(self.path)
            self.neighborhood, self.retention = data["neighborhood"], data["retention"]
            self.wild = data.get("wild_neighborhood", {})
            return
        ctx = self.ctx
        records = ctx.split.edit_stream[: ctx.edit_times]
        for record in tqdm(records, desc="unedited answers (neighbourhood prompts)", unit="record", leave=False):
            self.neighborhood[str(record["case_id"])] = argmax_answers(ctx.model, ctx.tok, ctx.metrics.neighborhood_pairs(record))
        LOG.info("unedited answers: %d edited records' neighbourhood prompts, %d watched records",
                 len(records), len(self.watched))
        answers = argmax_answers(ctx.model, ctx.tok, [retention_prompt(r, ctx.split.watched_answer) for r in self.watched])
        self.retention = {str(r["case_id"]): a for r, a in zip(self.watched, answers)}
        data = {"neighborhood": self.neighborhood, "retention": self.retention}
        if ctx.wild is not None:
            LOG.info("unedited WILD answers of %d records' neighbourhood prompts", len(records))
            self.wild = unedited_wild_answers(ctx.model, ctx.tok, records, ctx.metrics.kind, ctx.wild)
            data["wild_neighborhood"] = self.wild
        write_json_atomic(self.path, data)

    def locality(self, record: dict) -> dict[str, list]:
        """Unchanged-prediction locality of ``record``'s neighbourhood prompts on the current model."""
        ctx = self.ctx
        now = argmax_answers(ctx.model, ctx.tok, ctx.metrics.neighborhood_pairs(record))
        return unchanged(self.neighborhood[str(record["case_id"])], now)

    def retention_unchanged(self, records: Sequence[dict]) -> int:
        """How many of ``records`` (watched ones) the current model answers as the unedited one did."""
        answer = self.ctx.split.watched_answer
        now = argmax_answers(self.ctx.model, self.ctx.tok, [retention_prompt(r, answer) for r in records])
        return sum(list(a) == self.retention[str(r["case_id"])] for r, a in zip(records, now))


class Protocol:
    """One way of running edits; subclasses define their flags, steps, files and reader."""

    name: ClassVar[str]
    description: ClassVar[str] = ""  # one line, for --help

    # --- the command line -------------------------------------------------------------------

    @classmethod
    def add_arguments(cls, group: argparse._ArgumentGroup) -> None:
        """Declare this protocol's own flags (``python -m experiments.evaluate`` adds them when
        ``--protocol`` names it, and all protocols' for ``--help``)."""

    @classmethod
    def check_arguments(cls, args: argparse.Namespace, batch_edits: bool) -> None:
        """Checks that need only the command (``batch_edits``: whether the editor takes batches);
        raise ``FlagError``."""

    @classmethod
    def check_dataset(cls, dataset: EditDataset) -> None:
        """Checks of the dataset this protocol would run on (``FlagError``)."""

    @classmethod
    def settings(cls, args: argparse.Namespace, edit_times: int) -> dict:
        """This run's settings of the protocol, checked against the number of edits (``FlagError``):
        part of the run's configuration (a run resumes only under the same) and of run.json."""
        return {}

    def __init__(self, ctx: RunContext, settings: Optional[dict] = None):
        self.ctx = ctx
        self.settings = dict(settings or {})

    # --- the run ------------------------------------------------------------------------------

    @property
    def n_steps(self) -> int:
        raise NotImplementedError

    def step(self, i: int) -> None:
        raise NotImplementedError

    def prepare(self) -> None:
        """Work on the unedited model before step 1 (called before a resumed run restores weights)."""

    def checkpoint_steps(self) -> set[int]:
        """Steps after which the weights are always checkpointed (where evaluations are written)."""
        return set()

    def first_unfinished_step(self) -> int:
        """1 + the number of leading steps whose files exist."""
        raise NotImplementedError

    def step_records(self, i: int) -> list[dict]:
        """The records step i edits (for failure reports)."""
        raise NotImplementedError

    def run_fields(self) -> dict:
        """What run.json records about the protocol (its name and settings, and what it derived)."""
        return {"protocol": self.name, **self.settings}

    # --- reading a run folder back ---------------------------------------------------------------

    @classmethod
    def read_run(cls, path: Path, meta: dict, allow_partial: bool) -> RunContent:
        """The run folder's steps and checkpoints (``RunFolderError`` naming the file that is wrong)."""
        raise NotImplementedError(f"protocol {cls.name!r} has no reader: its runs cannot be summarised")
