"""What stops a lifelong run, and how: interrupts, and the exit codes a stop gives.

Numerical faults are raised by the checks of experiments/py/numerics.py. Interrupts (SIGINT/SIGTERM) are
handled in two steps so a run always stays resumable: the first signal asks the loop to stop
after the current edit (which is then checkpointed); a second one abandons that edit at once
(``RunInterrupted``), and a resume replays it from the last checkpoint.
"""
from __future__ import annotations

import contextlib
import logging
import signal
import threading
from typing import Any, Iterator, Optional

LOG = logging.getLogger(__name__)

EXIT_BAD_INPUT = 2  # a file, flag or record that cannot be used; nothing was edited
EXIT_NUMERICAL_FAULT = 3  # NaN/inf in edited weights or evaluation; earlier results are kept
HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def signal_exit_code(signum: int) -> int:
    """The shell convention: 128 + signal number (130 for Ctrl-C, 143 for SIGTERM)."""
    return 128 + int(signum)


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
