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
``submitit/``); ``plan.log`` holds one line per start, end and requeue. An evaluate line run outside
the plan (by hand) is found in its run folder (``experiments.sweeps.run_folders``).

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
import logging
import os
import signal
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from experiments.sweeps.plan_state import (
    DEFAULT_PLANS_DIR,
    LOCAL_NICE,
    NO_TIME_LIMIT_MIN,
    POLL_S,
    SUBMITIT_PIN,
    LineFiles,
    line_state,
    log_event,
    plan_lines,
    plan_state_of,
    settled,
    state_row,
)
from experiments.sweeps.plan_task import PlanTask
from util.globals import REPO_ROOT

LOG = logging.getLogger("experiments.sweeps.plan")



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


class PlanStopped(Exception):
    """The controller got SIGTERM (``kill``, a service manager): it stops its lines as Ctrl-C does."""


def _raise_plan_stopped(signum: int, frame: Any) -> None:
    raise PlanStopped(f"signal {signum}")


def run_window(executor: Any, tasks: Sequence[PlanTask], max_parallel: int, poll_s: float = POLL_S) -> None:
    """Local executor: at most ``max_parallel`` jobs at once, the next submitted when one ends.

    Ctrl-C reaches the tasks from the terminal (one process group); SIGTERM reaches only this
    controller, so on PlanStopped each running task is cancelled (SIGINT), which stops its command at
    its checkpoint (SIGTERM to the command); the commands run in sessions of their own and would
    otherwise go on unmanaged."""
    waiting, running = deque(tasks), {}
    try:
        while waiting or running:
            while waiting and len(running) < max_parallel:
                task = waiting.popleft()
                running[task.files.key] = (task, executor.submit(task))
            time.sleep(poll_s)
            for key, (task, job) in list(running.items()):
                if job.done():
                    del running[key]
                    print(state_row(line_state(task.files), task.files, task.line), flush=True)
    except PlanStopped:
        for _task, job in running.values():
            job.cancel(check=False)
        raise


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
    states = {line: plan_state_of(LineFiles.of(state_dir, line), line) for line in lines}
    if args.status:
        for line in lines:
            print(state_row(*states[line], line))
        return 0
    problem = check_executor(args)
    if problem:
        print(f"plan: {problem}", file=sys.stderr)
        return 2
    todo = [line for line in lines if not settled(states[line][0])]
    if len(todo) < len(lines):
        print(f"{len(lines) - len(todo)} of {len(lines)} lines done or running (here or under another plan): not submitted")
    if todo:
        state_dir.mkdir(parents=True, exist_ok=True)
        tasks = plan_tasks(args, todo, state_dir)
        with project_importable():
            executor = make_executor(args, state_dir)
            if args.executor == "slurm":
                submit_array(executor, tasks, args)
                return 0
            previous = signal.signal(signal.SIGTERM, _raise_plan_stopped)
            # the local executor cancels a job with SIGINT; started in the background (``nohup ... &``)
            # this process ignores SIGINT and its jobs would inherit that, so cancelling would do nothing
            previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
            try:
                run_window(executor, tasks, args.max_parallel)
            except (KeyboardInterrupt, PlanStopped) as stop:
                print("plan: interrupted; started lines stop at their checkpoint; submit the plan again to go on",
                      file=sys.stderr)
                return 143 if isinstance(stop, PlanStopped) else 130
            finally:
                signal.signal(signal.SIGTERM, previous)
                signal.signal(signal.SIGINT, previous_int)
    done = sum(plan_state_of(LineFiles.of(state_dir, line))[0].startswith("done") for line in lines)
    print(f"plan {args.plan}: {done} of {len(lines)} lines done; logs {state_dir}/<key>.log, events {state_dir}/plan.log")
    return 0 if done == len(lines) else 1


if __name__ == "__main__":
    from experiments.sweeps import plan  # tasks must pickle as experiments.sweeps.plan.PlanTask, not __main__'s

    sys.exit(plan.main())
