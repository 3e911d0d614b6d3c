"""One plan line as a submitit task: run it, stop it cleanly on a time limit or preemption, requeue it.

The task is checkpointable (submitit calls ``checkpoint`` on the signal SLURM sends before the time
limit or on preemption): it sends its command SIGTERM (evaluate stops after its current step,
checkpointed), a second one after 3/4 of the delay, SIGKILL last, and hands itself back to submitit,
which requeues it; the requeued task runs the line again, which resumes (``--continue_from_run auto``).
"""
from __future__ import annotations

import contextlib
import datetime
import functools
import logging
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import IO, Any, Optional

from experiments.sweeps.plan_state import KILL_WAIT_S, POLL_S, REQUEUED, LineFiles, line_lock, log_event
from util.atomic_files import write_json_atomic, write_text_atomic
from util.globals import REPO_ROOT

LOG = logging.getLogger("experiments.sweeps.plan")




# --------------------------------------------------------------------------------------------
# One line as a submitit task


class PlanLineFailed(RuntimeError):
    """The line's command exited non-zero: submitit records the task as failed (SLURM: FAILED)."""


def exit_code(returncode: int) -> int:
    """Popen's -N for a command killed by signal N, as a shell reports it (128 + N)."""
    return returncode if returncode >= 0 else 128 - returncode


def _command_setup(nice: int, preemption_signal: int) -> None:
    """In the command's process before exec: lower its priority, and leave the preemption signal to the task
    (SLURM may send it to every process of the job; the task stops the command with SIGTERM instead)."""
    if nice:
        os.nice(nice)
    signal.signal(preemption_signal, signal.SIG_IGN)


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def ended(proc: subprocess.Popen, timeout_s: float) -> bool:
    """Whether the command and every process of its group ended within ``timeout_s`` (polled, never
    blocking on Popen's lock: this also runs inside a signal handler that may interrupt a poll)."""
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None and not group_alive(proc.pid):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def _task_logging() -> None:
    """In the task's process (submitit's, whose own logger is set up): this module's messages to its log."""
    if not LOG.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        LOG.addHandler(handler)
        LOG.setLevel(logging.INFO)
        LOG.propagate = False


def submitit_job() -> tuple[Optional[str], Optional[Path]]:
    """(job id, log file) of the submitit job running this process; (None, None) outside one."""
    try:
        from submitit import JobEnvironment

        env = JobEnvironment()
        return env.job_id, env.paths.stdout
    except (ImportError, RuntimeError):
        return None, None


class PlanTask:
    """One plan line: runs it (``bash -c``, from the repository root, in its own process group, niced,
    with ``env`` applied: a None value unsets), records its state, and is checkpointable.

    Checkpointable as submitit's ``helpers.Checkpointable`` is: submitit requeues any task with a
    ``checkpoint`` method that returns a ``DelayedSubmission``. Not a subclass, so that this module
    (``--status``, ``parse_args``) imports without submitit.
    """

    def __init__(self, line: str, state_dir: Path, env: dict[str, Optional[str]], nice: int = 0,
                 stop_grace_s: float = 90.0, root: Path = REPO_ROOT):
        self.line, self.state_dir, self.env = line, Path(state_dir), dict(env)
        self.nice, self.stop_grace_s, self.root = nice, stop_grace_s, Path(root)
        self.files = LineFiles.of(self.state_dir, line)
        self._command: Optional[subprocess.Popen] = None
        self._requeued = False

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.update(_command=None, _requeued=False)  # a requeued task starts afresh
        return state

    def __call__(self) -> str:
        _task_logging()
        with line_lock(self.files.path("lock")) as lock:
            if lock is None:
                LOG.warning("line %s is running in another process; not run here", self.files.key)
                return "running elsewhere"
            if self.files.path("done").exists():
                return "done"
            self.files.path("rc").unlink(missing_ok=True)
            rc = self._run(lock)
            if self._requeued:
                return REQUEUED
            write_text_atomic(self.files.path("rc"), f"{rc}\n")
            if rc == 0:
                self.files.path("done").touch()
            log_event(self.state_dir, f"end rc={rc} {self.files.key}")
        if rc != 0:
            raise PlanLineFailed(f"plan line {self.files.key} exited with {rc}: {self.line}")
        return "done"

    def _run(self, lock: IO[str]) -> int:
        from submitit import JobEnvironment

        env = {**os.environ, **{k: v for k, v in self.env.items() if v is not None}}
        for name in (k for k, v in self.env.items() if v is None):
            env.pop(name, None)
        preemption_signal = getattr(signal, "SIG" + JobEnvironment.USR_SIG)
        LOG.info("plan line %s: %s", self.files.key, self.line)
        self._command = subprocess.Popen(
            ["bash", "-c", self.line], cwd=self.root, env=env, start_new_session=True,
            pass_fds=(lock.fileno(),),  # the command holds the lock too, so a line runs once even if its task dies
            preexec_fn=functools.partial(_command_setup, self.nice, preemption_signal))
        self._record_start()
        try:
            while self._command.poll() is None:
                time.sleep(POLL_S)
        except BaseException:  # the requeue's SystemExit, Ctrl-C: the command must not outlive its task unstopped
            self._stop_command()
            raise
        return exit_code(self._command.returncode)

    def _record_start(self) -> None:
        job_id, log = submitit_job()
        write_json_atomic(self.files.path("job"), {
            "line": self.line, "job_id": job_id, "host": socket.gethostname(), "pid": os.getpid(),
            "command_pid": self._command.pid, "log": str(log) if log else None,
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")})
        if log:
            link = self.files.path("log")
            if link.exists() and not link.is_symlink():  # scripts/run_plan.sh's log of this line: keep it
                link.rename(self.files.path("run_plan.log"))
            tmp = link.with_name(f".{link.name}.{os.getpid()}.tmp")
            tmp.unlink(missing_ok=True)
            tmp.symlink_to(log)
            os.replace(tmp, link)
        log_event(self.state_dir, f"start {self.files.key} job={job_id} pid={os.getpid()} {self.line}")

    def _stop_command(self) -> None:
        """SIGTERM to the command's group (evaluate stops after its current step, checkpointed); a second
        one after the grace abandons that step (a resume replays it); SIGKILL as the last resort."""
        proc = self._command
        if proc is None:
            return
        for sig, wait_s in ((signal.SIGTERM, self.stop_grace_s), (signal.SIGTERM, KILL_WAIT_S),
                            (signal.SIGKILL, KILL_WAIT_S)):
            if ended(proc, 0):
                return
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            if ended(proc, wait_s):
                return

    def checkpoint(self) -> Any:
        """Called by submitit on timeout or preemption: stop the command, then hand back this same
        task, which submitit requeues (SLURM: scontrol requeue; local: the controller restarts it)."""
        from submitit.helpers import DelayedSubmission

        self._requeued = True  # first: the command's end now belongs to the requeued task
        self._stop_command()
        write_text_atomic(self.files.path("rc"), f"{REQUEUED}\n")
        log_event(self.state_dir, f"{REQUEUED} {self.files.key}")
        return DelayedSubmission(self)


