"""What stops a lifelong run, and how: numerical faults, interrupts, and the exit codes they give.

A run of 1024 edits must not be poisoned by one NaN: after every edit the weights it changed are
checked, after every evaluation its numbers, and the first non-finite value stops the run with a
``NumericalFault`` naming the edit, the stage and the tensors. Interrupts (SIGINT/SIGTERM) are
handled in two steps so a run always stays resumable: the first signal asks the loop to stop
after the current edit (which is then checkpointed); a second one abandons that edit at once
(``RunInterrupted``), and a resume replays it from the last checkpoint.
"""
from __future__ import annotations

import contextlib
import logging
import math
import signal
import threading
from typing import Any, Iterator, Optional, Sequence

import torch
from torch import nn

from util import nethook

LOG = logging.getLogger(__name__)

EXIT_BAD_INPUT = 2  # a file, flag or record that cannot be used; nothing was edited
EXIT_NUMERICAL_FAULT = 3  # NaN/inf in edited weights or evaluation; earlier results are kept
HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def signal_exit_code(signum: int) -> int:
    """The shell convention: 128 + signal number (130 for Ctrl-C, 143 for SIGTERM)."""
    return 128 + int(signum)


class NumericalFault(RuntimeError):
    """A non-finite value produced by an edit or found by an evaluation."""

    def __init__(self, stage: str, problem: str, details: Optional[dict] = None):
        self.stage, self.problem, self.details = stage, problem, dict(details or {})
        super().__init__(f"{stage}: {problem}")


class RunStopped(Exception):
    """The run ended early but cleanly (interrupt or fault); ``exit_code`` is what the CLI returns."""

    def __init__(self, exit_code: int, message: str):
        self.exit_code = exit_code
        super().__init__(message)


class RunInterrupted(BaseException):
    """Raised from the signal handler on a second signal: abandon the current edit now.

    A BaseException, like KeyboardInterrupt, so that no ``except Exception`` swallows it.
    """

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"abandoned on signal {signal.Signals(signum).name}")


@torch.no_grad()
def nonfinite_weights(model: nn.Module, names: Sequence[str]) -> dict[str, int]:
    """Number of NaN/inf entries of each named parameter that has any."""
    bad = {}
    for name in names:
        n = int((~torch.isfinite(nethook.get_parameter(model, name))).sum())
        if n:
            bad[name] = n
    return bad


def check_weights(model: nn.Module, names: Sequence[str], stage: str) -> None:
    bad = nonfinite_weights(model, names)
    if bad:
        listing = ", ".join(f"{k} ({v} entries)" for k, v in bad.items())
        raise NumericalFault(stage, f"non-finite values in edited weights: {listing}", {"nonfinite_entries": bad})


def nonfinite_numbers(obj: Any, where: str = "") -> list[str]:
    """JSON-style paths of every NaN/inf float inside nested dicts and lists."""
    if isinstance(obj, float):
        return [] if math.isfinite(obj) else [where or "<value>"]
    if isinstance(obj, dict):
        return [p for k, v in obj.items() for p in nonfinite_numbers(v, f"{where}.{k}" if where else str(k))]
    if isinstance(obj, (list, tuple)):
        return [p for i, v in enumerate(obj) for p in nonfinite_numbers(v, f"{where}[{i}]")]
    return []


def check_metrics(metrics: dict, stage: str = "evaluation") -> None:
    bad = nonfinite_numbers(metrics)
    if bad:
        raise NumericalFault(stage, f"non-finite metrics (NLL of NaN/inf logits): {', '.join(bad[:10])}", {"fields": bad})


def precision_advice(model: nn.Module) -> str:
    """For a fault in a half-precision model, the fix to try first: float32."""
    dtype = next(model.parameters()).dtype
    if dtype not in (torch.float16, torch.bfloat16):
        return ""
    name = str(dtype).replace("torch.", "")
    return (f"; the model runs in {name}, where edits and activations overflow or round away sooner: "
            "rerun with --dtype float32")


def check_logits(logits: torch.Tensor, stage: str) -> None:
    if not bool(torch.isfinite(logits).all()):
        raise NumericalFault(stage, "non-finite logits")


class StopRequest:
    """Set by the first SIGINT/SIGTERM; the run loop checks it between edits."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def handle(self, signum: int, _frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.signum is None:
            self.signum = signum
            LOG.warning("%s received: stopping after the current edit (send it again to abandon that edit)", name)
            return
        LOG.warning("%s received again: abandoning the current edit", name)
        raise RunInterrupted(signum)


@contextlib.contextmanager
def interrupt_handlers(stop: StopRequest) -> Iterator[StopRequest]:
    """Route SIGINT/SIGTERM to ``stop`` while the block runs; the previous handlers come back after.

    Signal handlers can only be installed from the main thread; elsewhere (a run started from a
    worker thread) the block runs with the process's handlers unchanged.
    """
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = {s: signal.getsignal(s) for s in HANDLED_SIGNALS}
    try:
        for s in HANDLED_SIGNALS:
            signal.signal(s, stop.handle)
        yield stop
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
