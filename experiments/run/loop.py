"""The loop of a run: a protocol's steps, with checkpoints, clean stops and failure reports.

The loop knows nothing of what a step does (experiments/protocols/). It runs steps start..n, saves
the edited weights and the editor's state every ``checkpoint_every`` steps, after a step that ends
``checkpoint_minutes`` or more after the last checkpoint (a kill then redoes at most that much work,
however long a step is), and after every step the protocol marks (where evaluations are written),
and records how the run ended: ``finished`` in run.json, ``failure.json`` for a numerical fault
(exit code 3), ``interrupted`` after a signal (a first SIGINT/SIGTERM stops after the current step,
a second abandons it).
"""
from __future__ import annotations

import logging
import time
import traceback
from pathlib import Path
from typing import Optional

from tqdm import tqdm

from experiments.protocols.base import Protocol
from experiments.py.numerics import NumericalFault, precision_advice
from experiments.run.faults import EXIT_NUMERICAL_FAULT, RunInterrupted, RunStopped, StopRequest, signal_exit_code
from experiments.store.checkpoints import (
    CHECKPOINT_FILE,
    checkpoint_index,
    load_checkpoint,
    load_editor_state,
    save_checkpoint,
)
from experiments.store.files import FAILURE_FILE, RunMeta, write_json_atomic

LOG = logging.getLogger("experiments.evaluate")
DEFAULT_CHECKPOINT_EVERY = 5
DEFAULT_CHECKPOINT_MINUTES = 10.0


class RunLoop:
    """One run of one protocol in one run folder."""

    def __init__(self, protocol: Protocol, meta: RunMeta, checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
                 label: str = "edits", stop: Optional[StopRequest] = None,
                 checkpoint_minutes: float = DEFAULT_CHECKPOINT_MINUTES):
        self.protocol, self.meta = protocol, meta
        self.ctx = protocol.ctx
        self.checkpoint_every = checkpoint_every
        self.checkpoint_seconds = 60.0 * checkpoint_minutes  # 0: by step count and marks only
        self.last_checkpoint_time = time.monotonic()
        self.label = label
        self.stop = stop or StopRequest()  # the one the run's signal handlers set (experiments/evaluate.py)
        self.last_checkpoint = 0
        self.current_step = 0

    @property
    def run_dir(self) -> Path:
        return self.ctx.run_dir

    @property
    def checkpoint_path(self) -> Path:
        return self.run_dir / CHECKPOINT_FILE

    def restore(self) -> int:
        """Load the last checkpoint (weights and editor state) into the fresh model; the first step to run."""
        index = checkpoint_index(self.checkpoint_path)
        if index is None:
            return 1
        self.last_checkpoint = load_checkpoint(self.checkpoint_path, self.ctx.model, self.ctx.ledger)
        self.ctx.editor.load_state_dict(load_editor_state(self.checkpoint_path))
        return self.last_checkpoint + 1

    def execute(self, start: int = 1) -> None:
        """``run`` plus the bookkeeping of how it ended (run.json status, failure.json)."""
        try:
            self.run(start)
        except RunStopped:
            raise
        except NumericalFault as fault:
            advice = precision_advice(self.ctx.model)
            self.record_failure(fault.stage, fault.problem + advice, fault.details)
            raise RunStopped(EXIT_NUMERICAL_FAULT, f"numerical fault at step {self.current_step} ({fault}{advice}); "
                             f"the {self.current_step - 1} finished step(s) are kept; see {self.run_dir / FAILURE_FILE}") from fault
        except RunInterrupted as e:
            self.meta.update(status="interrupted", stopped_during_step=self.current_step)
            raise RunStopped(signal_exit_code(e.signum), self.resume_hint(f"abandoned step {self.current_step}")) from None
        except Exception as e:
            self.record_failure("unexpected error", f"{type(e).__name__}: {e}", {"traceback": traceback.format_exc()})
            raise
        resources = self.ctx.editor.resources
        self.meta.update(
            status="finished",
            replayed_files=self.replay_summary(),
            covariance_bytes=getattr(resources, "covariance_bytes", 0),  # one factorised covariance per layer used
            statistics_seconds=getattr(resources, "stats_seconds", 0.0),
        )

    def run(self, start: int = 1) -> None:
        n_steps = self.protocol.n_steps
        marked = self.protocol.checkpoint_steps()
        if self.stop.requested:  # the signal came while the run was being prepared (its files are written)
            self.meta.update(status="interrupted", stopped_after_step=start - 1)
            raise RunStopped(signal_exit_code(self.stop.signum), self.resume_hint(f"stopped before step {start}"))
        for i in tqdm(range(start, n_steps + 1), initial=start - 1, total=n_steps, desc=self.label, unit="step"):
            self.current_step = i
            self.protocol.step(i)
            if i in marked or i % self.checkpoint_every == 0 or self.stop.requested or self.checkpoint_due():
                self.save_checkpoint(i)
            if self.stop.requested and i < n_steps:
                self.meta.update(status="interrupted", stopped_after_step=i, replayed_files=self.replay_summary())
                raise RunStopped(signal_exit_code(self.stop.signum), self.resume_hint(f"stopped after step {i}"))

    def checkpoint_due(self) -> bool:
        return 0 < self.checkpoint_seconds <= time.monotonic() - self.last_checkpoint_time

    def save_checkpoint(self, i: int) -> None:
        if i != self.last_checkpoint:
            save_checkpoint(self.checkpoint_path, self.ctx.model, self.ctx.ledger, i, self.ctx.editor.state_dict())
            self.last_checkpoint, self.last_checkpoint_time = i, time.monotonic()
            self.meta.update(last_checkpoint=i)

    def record_failure(self, stage: str, problem: str, details: dict) -> None:
        i = self.current_step
        case_ids = [r["case_id"] for r in self.protocol.step_records(i)] if i else []
        failure = {"step": i, "case_ids": case_ids, "stage": stage, "problem": problem, "details": details,
                   "finished_steps": i - 1 if i else 0, "last_checkpoint": self.last_checkpoint}
        write_json_atomic(self.run_dir / FAILURE_FILE, failure)
        self.meta.update(status="failed", failure=f"step {i}, {stage}: {problem}")
        LOG.error("step %s (case %s) failed at %s: %s", i, case_ids, stage, problem)

    def resume_hint(self, what: str) -> str:
        return (f"{what}; results of finished steps are kept in {self.run_dir}. Resume with the same command plus "
                f"--continue_from_run {self.run_dir.name} (restarts from the checkpoint after step {self.last_checkpoint})")

    def replay_summary(self) -> dict:
        return dict(sorted(self.ctx.replays.items()))
