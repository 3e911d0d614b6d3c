"""Run a plan of experiments through submitit: SLURM job arrays on a cluster, processes on one machine.

    python -m experiments.sweeps.plan scripts/plans/smollm2_lifelong.txt --max_parallel 2
    python -m experiments.sweeps.plan scripts/plans/smollm2_lifelong.txt --status
    python -m experiments.sweeps.plan scripts/plans/smollm2_lifelong.txt --executor slurm --max_parallel 8 \
        --slurm_partition gpu --slurm_gpus_per_task 1 --slurm_time_min 240

A plan is a text file of shell commands, one a line, each run from the repository root; blank lines
and ``#`` comments are skipped. Each line is one submitit task (one element of the SLURM array), run
by the same ``PlanTask`` on both executors. Evaluate lines carry ``--continue_from_run auto``, so a
line may run again at no cost: a finished configuration does nothing, an unfinished one resumes from
its weight checkpoint. Submitting a plan again therefore skips finished lines and resumes the rest.

State, under ``results/plans/<plan>/`` (``--plans_dir``), per line, named by the md5 of the line as
scripts/run_plan.sh named them (its marks carry over): ``<key>.done`` once it exited 0, ``<key>.rc``
its last exit code (or ``requeued``), ``<key>.lock`` held (flock) while it runs, ``<key>.job`` where
and when it last started, ``<key>.log`` a link to its submitit log (stdout and stderr, kept under
``submitit/``); ``plan.log`` holds one line per start, end and requeue.

Time limits and preemption: the task is checkpointable. On the signal submitit relays (SLURM sends it
``--signal_delay_s`` before the time limit, or on preemption) it sends its command SIGTERM (evaluate
stops after its current step, checkpointed; after 3/4 of the delay a second SIGTERM abandons the step)
and hands itself back to submitit, which requeues it; the requeued task runs the line again, which
resumes. The local executor has no time limit here; a task that gets the signal is restarted at once
by submitit's local controller, and one killed outright (SIGKILL, reboot) is not: its line shows
``killed`` and the next submission of the plan resumes it.

Concurrency: ``--max_parallel N`` is ``slurm_array_parallelism`` on SLURM. submitit's local executor
starts every job it is given at once, so locally this command keeps a window of N jobs (it submits
the next line when one ends) and waits for the plan to finish.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import fcntl
import functools
import hashlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Iterator, Optional, Sequence

from util.atomic_files import write_json_atomic, write_text_atomic
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


def shown(line: str) -> str:
    return line if len(line) <= SHOWN_CHARS else "..." + line[-(SHOWN_CHARS - 3):]  # evaluate lines differ at their end


def state_row(state: str, files: LineFiles, line: str) -> str:
    return f"{state:<14} {files.key}  {shown(line)}"


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


# --------------------------------------------------------------------------------------------
# Submitting a plan


def command_env(args: argparse.Namespace) -> dict[str, Optional[str]]:
    """The environment each line's command gets on top of the task's: single-threaded locally; on SLURM
    one thread per allocated CPU. submitit's local executor hides GPUs (CUDA_VISIBLE_DEVICES="" unless
    told how many), so locally the command gets the caller's own setting back (None: unset)."""
    threads = "1" if args.executor == "local" else str(args.slurm_cpus_per_task)
    env: dict[str, Optional[str]] = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    if args.executor == "local":
        env["CUDA_VISIBLE_DEVICES"] = os.environ.get("CUDA_VISIBLE_DEVICES")
    return env


def plan_tasks(args: argparse.Namespace, lines: Sequence[str], state_dir: Path) -> list[PlanTask]:
    nice = args.nice if args.executor == "local" else 0  # a SLURM allocation is the job's own
    return [PlanTask(line, state_dir, command_env(args), nice=nice, stop_grace_s=0.75 * args.signal_delay_s)
            for line in lines]


def make_executor(args: argparse.Namespace, state_dir: Path) -> Any:
    """One submitit AutoExecutor for either cluster: it keeps the parameters of the chosen one."""
    import submitit

    executor = submitit.AutoExecutor(folder=state_dir / "submitit", cluster=args.executor,
                                     slurm_max_num_timeout=args.max_timeouts,
                                     local_max_num_timeout=args.max_timeouts)
    executor.update_parameters(
        name=f"plan-{state_dir.name}", stderr_to_stdout=True, local_timeout_min=NO_TIME_LIMIT_MIN,
        slurm_timeout_min=args.slurm_time_min, slurm_cpus_per_task=args.slurm_cpus_per_task,
        slurm_mem_gb=args.slurm_mem_gb, slurm_partition=args.slurm_partition,
        slurm_gpus_per_task=args.slurm_gpus_per_task, slurm_account=args.slurm_account,
        slurm_qos=args.slurm_qos, slurm_setup=args.slurm_setup or None,
        slurm_array_parallelism=args.max_parallel, slurm_signal_delay_s=args.signal_delay_s)
    return executor


def run_window(executor: Any, tasks: Sequence[PlanTask], max_parallel: int, poll_s: float = POLL_S) -> None:
    """Local executor: at most ``max_parallel`` jobs at once, the next submitted when one ends."""
    waiting, running = deque(tasks), {}
    while waiting or running:
        while waiting and len(running) < max_parallel:
            task = waiting.popleft()
            running[task.files.key] = (task, executor.submit(task))
        time.sleep(poll_s)
        for key, (task, job) in list(running.items()):
            if job.done():
                del running[key]
                print(state_row(line_state(task.files), task.files, task.line), flush=True)


def submit_array(executor: Any, tasks: Sequence[PlanTask], args: argparse.Namespace) -> None:
    """SLURM: the lines as one job array, at most ``--max_parallel`` elements running at once."""
    jobs = executor.submit_array(list(tasks))
    array_id = jobs[0].job_id.split("_")[0]
    log_event(tasks[0].state_dir, f"submitted slurm job {array_id}: {len(jobs)} lines")
    print(f"submitted {len(jobs)} lines as SLURM job {array_id} (at most {args.max_parallel} at once); "
          f"follow with: python -m experiments.sweeps.plan {args.plan} --status")


@contextlib.contextmanager
def project_importable() -> Iterator[None]:
    """Tasks unpickle PlanTask by name, in processes started wherever the caller was: put the repository
    on their PYTHONPATH (the local controller and sbatch both pass the environment on)."""
    from submitit.helpers import environment_variables

    with environment_variables(PYTHONPATH=os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)):
        yield


# --------------------------------------------------------------------------------------------
# Command line


def int_from(low: int) -> Any:
    """An argparse type: an integer >= ``low``, else one message naming the value."""
    def parse(text: str) -> int:
        if not text.isdigit() or int(text) < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text!r}")
        return int(text)

    return parse


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Flags, checked (the plan file exists and has commands) before anything is started."""
    p = argparse.ArgumentParser(prog="python -m experiments.sweeps.plan", description=__doc__.split("\n")[0],
                                usage="%(prog)s PLAN [--status] [--executor local|slurm] [--max_parallel N] [options]")
    p.add_argument("plan", type=Path, help="a plan file: one shell command a line (scripts/plans/*.txt)")
    p.add_argument("--executor", choices=("local", "slurm"), default="local")
    p.add_argument("--max_parallel", type=int_from(1), default=1, help="lines running at once")
    p.add_argument("--status", action="store_true", help="print each line's state (no run)")
    p.add_argument("--plans_dir", type=Path, default=DEFAULT_PLANS_DIR, help="state and logs go to PLANS_DIR/<plan>/")
    p.add_argument("--nice", type=int, default=LOCAL_NICE, choices=range(20), metavar="0..19",
                   help="local executor: the commands' niceness")
    p.add_argument("--signal_delay_s", type=int_from(1), default=120,
                   help="SLURM signals a job this long before its time limit; a command gets 3/4 of it to stop")
    p.add_argument("--max_timeouts", type=int_from(0), default=3, help="requeues after reaching the time limit, per line")
    s = p.add_argument_group("--executor slurm")
    s.add_argument("--slurm_partition")
    s.add_argument("--slurm_gpus_per_task", type=int_from(0))
    s.add_argument("--slurm_time_min", type=int_from(1), default=240, help="time limit of each line")
    s.add_argument("--slurm_cpus_per_task", type=int_from(1), default=2)
    s.add_argument("--slurm_mem_gb", type=int_from(1))
    s.add_argument("--slurm_account")
    s.add_argument("--slurm_qos")
    s.add_argument("--slurm_setup", action="append", default=[],
                   help="a shell line run before each task (e.g. 'source .venv/bin/activate'); repeatable")
    args = p.parse_args(argv)
    if not args.plan.is_file():
        p.error(f"no plan file {args.plan}")
    if not plan_lines(args.plan):
        p.error(f"{args.plan} holds no command (only blank lines and # comments)")
    return args


def check_executor(args: argparse.Namespace) -> Optional[str]:
    """Why the chosen executor cannot run here, or None."""
    try:
        import submitit  # noqa: F401
    except ImportError:
        return f"submitit is not installed: pip install {SUBMITIT_PIN}"
    import shutil

    if args.executor == "slurm" and shutil.which("srun") is None:
        return "--executor slurm: no SLURM here (srun is not on PATH); run on the cluster's login node"
    return None


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    lines = plan_lines(args.plan)
    state_dir = (args.plans_dir / args.plan.stem).resolve()
    states = {line: line_state(LineFiles.of(state_dir, line)) for line in lines}
    if args.status:
        for line in lines:
            print(state_row(states[line], LineFiles.of(state_dir, line), line))
        return 0
    problem = check_executor(args)
    if problem:
        print(f"plan: {problem}", file=sys.stderr)
        return 2
    todo = [line for line in lines if states[line] not in ("done", "running")]
    if len(todo) < len(lines):
        print(f"{len(lines) - len(todo)} of {len(lines)} lines done or running elsewhere: not submitted")
    if todo:
        state_dir.mkdir(parents=True, exist_ok=True)
        tasks = plan_tasks(args, todo, state_dir)
        with project_importable():
            executor = make_executor(args, state_dir)
            if args.executor == "slurm":
                submit_array(executor, tasks, args)
                return 0
            try:
                run_window(executor, tasks, args.max_parallel)
            except KeyboardInterrupt:
                print("plan: interrupted; started lines stop at their checkpoint; submit the plan again to go on",
                      file=sys.stderr)
                return 130
    done = sum(line_state(LineFiles.of(state_dir, line)) == "done" for line in lines)
    print(f"plan {args.plan}: {done} of {len(lines)} lines done; logs {state_dir}/<key>.log, events {state_dir}/plan.log")
    return 0 if done == len(lines) else 1


if __name__ == "__main__":
    from experiments.sweeps import plan  # tasks must pickle as experiments.sweeps.plan.PlanTask, not __main__'s

    sys.exit(plan.main())
