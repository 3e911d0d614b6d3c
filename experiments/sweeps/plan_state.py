"""The state of a plan's lines (experiments/sweeps/plan.py): which are done, running, failed or waiting.

Under ``results/plans/<plan>/``, per line, named by the md5 of the line as scripts/run_plan.sh named
them: ``<key>.done``, ``<key>.rc`` (last exit code, or ``requeued``), ``<key>.lock`` (flock, held while
the line runs), ``<key>.job``, ``<key>.log``; ``plan.log`` one line per start, end and requeue.
Plans may share lines (a plan of the seeds several issues need, beside each issue's own plan): the
same command is the same key in every plan's folder, so a line done or running under one plan of the
plans folder is shown as such by the others (``done in <plan>``) and not submitted by them.
"""
from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterator, Optional

from experiments.sweeps.run_folders import run_folder_state
from util.globals import REPO_ROOT

LOG = logging.getLogger("experiments.sweeps.plan")
DEFAULT_PLANS_DIR = REPO_ROOT / "results" / "plans"
SUBMITIT_PIN = "submitit==1.5.4"
LOCAL_NICE = 10  # as scripts/run_plan.sh: plans run for days on machines people also work on
NO_TIME_LIMIT_MIN = 365 * 24 * 60  # submitit's local executor stops a job after 2 min unless told otherwise
POLL_S = 0.5
LOCK_TRIES = 20  # a --status probe holds a line's lock for microseconds; a starting task waits that out
KILL_WAIT_S = 10.0
SHOWN_CHARS = 110
REQUEUED = "requeued"
OUTSIDE = "outside"  # the state's second word for a line whose run folder says more than the plan knows




# --------------------------------------------------------------------------------------------
# The plan and the state of its lines


def plan_lines(path: Path) -> list[str]:
    """The plan's commands: every line but blank ones and ``#`` comments, unstripped (a line's key is its md5)."""
    return [line for line in Path(path).read_text().split("\n") if line.strip() and not line.lstrip().startswith("#")]


@dataclass(frozen=True)
class LineFiles:
    """Where one plan line's state lives: ``<state_dir>/<key>.<suffix>``, the names scripts/run_plan.sh used."""

    state_dir: Path
    key: str

    @classmethod
    def of(cls, state_dir: Path, line: str) -> "LineFiles":
        return cls(Path(state_dir), hashlib.md5(line.encode()).hexdigest()[:12])

    def path(self, suffix: str) -> Path:
        return self.state_dir / f"{self.key}.{suffix}"


def is_locked(lock: Path) -> bool:
    """Whether a process holds ``lock`` (a task while its line runs, and the line's command)."""
    if not lock.exists():
        return False
    with open(lock, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
    return False


def line_state(files: LineFiles) -> str:
    """done / running / failed rc=N / requeued / killed (started, ended with no exit code) / waiting."""
    if files.path("done").exists():
        return "done"
    if is_locked(files.path("lock")):
        return "running"
    if files.path("rc").exists():
        rc = files.path("rc").read_text().strip()
        return REQUEUED if rc == REQUEUED else f"failed rc={rc}"
    return "killed" if files.path("job").exists() else "waiting"


def twin_state(files: LineFiles) -> Optional[tuple[str, LineFiles]]:
    """("done in P" or "running in P", its files) when the same line is done or running under another
    plan P of the same plans folder; None otherwise."""
    plans_dir = files.state_dir.parent
    others = sorted(d for d in plans_dir.iterdir() if d.is_dir() and d != files.state_dir) if plans_dir.is_dir() else []
    for other in others:
        twin = LineFiles(other, files.key)
        if twin.path("done").exists():
            return f"done in {other.name}", twin
        if is_locked(twin.path("lock")):
            return f"running in {other.name}", twin
    return None


def plan_state_of(files: LineFiles, line: Optional[str] = None) -> tuple[str, LineFiles]:
    """The line's state in its plan (``line_state``), or, unless it is done or running there, its state
    under another plan that ran it; with the files that state (and its progress bar) comes from. Given
    the ``line``, an evaluate line no plan finished or is running is looked up in its run folder
    (experiments/sweeps/run_folders.py): ``done outside``, ``running outside``, ``stopped outside`` (a
    line the plan started and that was killed stays ``killed``, unless it was finished or restarted by hand)."""
    state = line_state(files)
    if state in ("done", "running"):
        return state, files
    twin = twin_state(files)
    if twin is not None or line is None:
        return twin or (state, files)
    folder = run_folder_state(line)
    if folder is None or (folder.state == "stopped" and state == "killed"):
        return state, files
    return f"{folder.state} {OUTSIDE}", files


def settled(state: str) -> bool:
    """Done or running, here or under another plan: nothing to submit."""
    return state.split()[0] in ("done", "running")


# a tqdm bar as it writes itself: "AlphaEdit sequential:   6%|▌    | 15/256 [03:30<54:46, 13.64s/step]"
TQDM_BAR = re.compile(r"(?P<desc>[A-Za-z][^\r\n|:]{0,60}): +\d+%\|[^|\r\n]*\| *(?P<done>\d+)/(?P<total>\d+) "
                      r"\[[\d:]+<(?P<left>[\d:?]+)")
LOG_TAIL_BYTES = 65536


def last_progress(log: Path) -> Optional[str]:
    """The latest unfinished progress bar of the log's tail, else its last bar, as "AlphaEdit sequential
    15/256 (~54:46 left)" (None: no log, or no bar yet). One bar only: a bar closed with leave=False never
    writes its end, so an earlier one may look unfinished. Only the tail is read: --status stays instant."""
    try:
        with open(log, "rb") as f:
            f.seek(max(0, f.seek(0, 2) - LOG_TAIL_BYTES))
            tail = f.read().decode("utf-8", "replace")
    except OSError:
        return None
    latest: dict[str, re.Match] = {}
    for bar in TQDM_BAR.finditer(tail):  # each bar's last state, the most recently written bar last
        latest.pop(bar["desc"].strip(), None)
        latest[bar["desc"].strip()] = bar
    bars = list(latest.values())
    unfinished = [b for b in bars if b["done"] != b["total"]]
    bar = (unfinished or bars or [None])[-1]
    return None if bar is None else f"{bar['desc'].strip()} {bar['done']}/{bar['total']} (~{bar['left']} left)"


def shown(line: str) -> str:
    return line if len(line) <= SHOWN_CHARS else "..." + line[-(SHOWN_CHARS - 3):]  # evaluate lines differ at their end


def state_row(state: str, files: LineFiles, line: str) -> str:
    """``state key line``; a line that started and did not finish also shows its last progress bar, and
    a line run outside the plan where its run folder stands."""
    if state.endswith(OUTSIDE):
        folder = run_folder_state(line)
        progress = folder.progress if folder else None
    else:
        progress = None if state.split()[0] in ("done", "waiting") else last_progress(files.path("log"))
    return f"{state:<15} {files.key}  " + (f"[{progress}]  " if progress else "") + shown(line)


def log_event(state_dir: Path, text: str) -> None:
    """One line of ``plan.log`` (a single append, so concurrent tasks do not interleave within a line)."""
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")
    with open(state_dir / "plan.log", "a") as f:
        f.write(f"{now} {text}\n")


@contextlib.contextmanager
def line_lock(lock: Path) -> Iterator[Optional[IO[str]]]:
    """The line's lock file, held, or None when another process holds it."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as f:
        for _ in range(LOCK_TRIES):
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                time.sleep(0.1)
        else:
            yield None
            return
        yield f


