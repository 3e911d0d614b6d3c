"""experiments/sweeps/plan.py: plans of tiny evaluate runs through submitit's local executor.

One plan runs four lines with --max_parallel 3: an uninterrupted reference run (6 edits), two short
runs and a line with a bad flag. The reference is what a preempted run (requeued by submitit) and a
killed run (resumed by submitting the plan again) must reproduce, timing fields aside. The SLURM form
is checked up to sbatch: a fake sbatch on PATH receives the job array the real SlurmExecutor writes.
"""
from __future__ import annotations

import contextlib
import datetime
import io
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import NamedTuple

import pytest

pytest.importorskip("submitit")

from experiments.sweeps import plan, plan_state  # noqa: E402
from tests.test_reliability import assert_same_results, many_records  # noqa: E402
from util.globals import REPO_ROOT  # noqa: E402
from util.tiny_models import TinyWorld, rank_one_hparams  # noqa: E402

LONG_EDITS, SHORT_EDITS, CAP = 6, 2, 3


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    w = TinyWorld(tmp_path_factory.mktemp("plan_engine"), "llama")
    w.data_file.write_text(json.dumps(many_records()))
    w.hparams_path = w.write_hparams("ROME", rank_one_hparams("llama", 4, mom2_adjustment=False))
    return w


def evaluate_line(world, dir_name: str, edits: int = LONG_EDITS, *extra: str) -> str:
    args = world.cli_args("ROME", world.hparams_path, edit_times=edits, num_threads=1, dir_name=dir_name,
                          continue_from_run="auto")
    return shlex.join([sys.executable, "-m", "experiments.evaluate", *args, *extra])


def write_plan(path: Path, lines: list[str]) -> Path:
    path.write_text("# a tiny plan\n\n" + "\n".join(lines) + "\n")
    return path


def files_of(state_dir: Path, line: str) -> plan.LineFiles:
    return plan.LineFiles.of(state_dir, line)


def run_main(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = plan.main([str(a) for a in argv])
    return code, out.getvalue()


def events(state_dir: Path) -> list[tuple[float, str, str]]:
    """(time, what, key) of each start and end in plan.log."""
    rows = []
    for row in (state_dir / "plan.log").read_text().splitlines():
        stamp, what, rest = row.split(" ", 2)
        key = rest.split()[1] if what == "end" else rest.split()[0]
        rows.append((datetime.datetime.fromisoformat(stamp).timestamp(), what, key))
    return rows


def most_at_once(rows: list[tuple[float, str, str]]) -> int:
    running, most = 0, 0
    for _, what, _ in sorted(rows, key=lambda r: (r[0], r[1] == "start")):  # an end before a start at the same ms
        running += {"start": 1, "end": -1}.get(what, 0)
        most = max(most, running)
    return most


def wait_for(condition, what: str, timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


class Ran(NamedTuple):
    path: Path
    state_dir: Path
    lines: list[str]
    code: int
    out: str


@pytest.fixture(scope="module")
def ran(world, tmp_path_factory) -> Ran:
    """The four-line plan, run once."""
    lines = [evaluate_line(world, "reference"), evaluate_line(world, "short_a", SHORT_EDITS),
             evaluate_line(world, "bad", LONG_EDITS, "--no_such_flag"), evaluate_line(world, "short_b", SHORT_EDITS)]
    root = tmp_path_factory.mktemp("plans")
    path = write_plan(root / "tiny.txt", lines)
    code, out = run_main(path, "--plans_dir", root / "state", "--max_parallel", CAP)
    return Ran(path, root / "state" / "tiny", lines, code, out)


# --------------------------------------------------------------------------------------------
# A plan on the local executor


def test_the_local_executor_runs_lines_at_once_up_to_the_cap(world, ran):
    state_dir, lines = ran.state_dir, ran.lines
    rows = events(state_dir)
    assert sorted(key for _, what, key in rows if what == "start") == sorted(files_of(state_dir, l).key for l in lines)
    assert most_at_once(rows) == CAP  # three ran together, never four
    for name, edits in (("reference", LONG_EDITS), ("short_a", SHORT_EDITS), ("short_b", SHORT_EDITS)):
        run_dir = world.results_dir / name / "run_000"
        assert json.loads((run_dir / "run.json").read_text())["status"] == "finished"
        assert len(list(run_dir.glob("edit_*_on_case_*.json"))) == edits


def test_a_bad_line_fails_alone_with_its_message_in_its_log(ran):
    state_dir, lines = ran.state_dir, ran.lines
    assert ran.code == 1 and f"3 of {len(lines)} lines done" in ran.out
    code, status = run_main(ran.path, "--plans_dir", state_dir.parent, "--status")
    states = [row.split()[0] for row in status.splitlines()]
    assert code == 0 and states == ["done", "done", "failed", "done"]
    bad = files_of(state_dir, lines[2])
    assert status.splitlines()[2].startswith("failed rc=2 ")  # evaluate's exit code for bad input
    log = bad.path("log").read_text()  # the link to its submitit log: the command's stderr is there
    assert "unrecognized arguments: --no_such_flag" in log and "exited with 2" in log
    assert not bad.path("done").exists()
    for line in (lines[0], lines[1], lines[3]):
        assert "unrecognized arguments" not in files_of(state_dir, line).path("log").read_text()


def test_commands_run_single_threaded_and_niced_from_the_repository_root(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")  # submitit's local executor would hand jobs ""
    line = 'echo "threads=$OMP_NUM_THREADS nice=$(nice) cwd=$PWD gpus=$CUDA_VISIBLE_DEVICES"'
    path = write_plan(tmp_path / "env.txt", [line])
    code, _ = run_main(path, "--plans_dir", tmp_path / "state", "--nice", "7")
    log = files_of(tmp_path / "state" / "env", line).path("log").read_text()
    assert code == 0 and f"threads=1 nice={min(os.nice(0) + 7, 19)} cwd={REPO_ROOT} gpus=0,1" in log


def test_a_line_shared_by_two_plans_runs_once_and_each_plan_shows_where(tmp_path):
    shared, own = "echo shared >> " + shlex.quote(str(tmp_path / "ran.txt")), "echo own"
    first, second = write_plan(tmp_path / "first.txt", [shared]), write_plan(tmp_path / "second.txt", [shared, own])
    state = tmp_path / "state"
    twin = files_of(state / "first", shared)
    twin.state_dir.mkdir(parents=True)
    with plan_state.line_lock(twin.path("lock")) as held:  # the first plan is running the shared line
        assert held is not None
        code, status = run_main(second, "--plans_dir", state, "--status")
        assert status.split()[:3] == ["running", "in", "first"]
    assert run_main(first, "--plans_dir", state)[0] == 0
    code, status = run_main(second, "--plans_dir", state, "--status")
    rows = status.splitlines()
    assert rows[0].split()[:4] == ["done", "in", "first", twin.key] and rows[1].split()[0] == "waiting"
    code, out = run_main(second, "--plans_dir", state)
    assert code == 0 and "1 of 2 lines done or running (here or under another plan): not submitted" in out
    assert "2 of 2 lines done" in out
    assert (tmp_path / "ran.txt").read_text() == "shared\n"  # the shared line ran once, under the first plan


# --------------------------------------------------------------------------------------------
# Interrupted lines end with the files of the uninterrupted run


def _as_a_background_job() -> None:
    """``nohup python -m experiments.sweeps.plan ... &`` from a script: SIGINT ignored, inherited by every child."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def start_plan_cli(path: Path, state_root: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.Popen([sys.executable, "-m", "experiments.sweeps.plan", str(path), "--plans_dir", str(state_root)],
                            cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, preexec_fn=_as_a_background_job)


def wait_for_first_edit(world, dir_name: str, files: plan.LineFiles) -> dict:
    """The line's job record once its run wrote its first edit (the run is then mid-way)."""
    run_dir = world.results_dir / dir_name / "run_000"
    wait_for(lambda: files.path("job").exists() and list(run_dir.glob("edit_1_on_case_*.json")), "the first edit")
    return json.loads(files.path("job").read_text())


def assert_resumed_like_the_reference(world, dir_name: str) -> None:
    run_dir = world.results_dir / dir_name / "run_000"
    meta = json.loads((run_dir / "run.json").read_text())
    assert meta["status"] == "finished" and meta["resumes"], "the run was not interrupted mid-way"
    assert not (world.results_dir / dir_name / "run_001").exists()
    assert_same_results(run_dir, world.results_dir / "reference" / "run_000")


def test_a_preempted_line_is_requeued_and_ends_like_the_uninterrupted_run(world, ran, tmp_path):
    line = evaluate_line(world, "preempted")
    files = files_of(tmp_path / "state" / "one", line)
    cli = start_plan_cli(write_plan(tmp_path / "one.txt", [line]), tmp_path / "state")
    job = wait_for_first_edit(world, "preempted", files)
    os.kill(job["pid"], signal.SIGUSR2)  # what SLURM (before its time limit) and the local controller send
    out, _ = cli.communicate(timeout=300)
    assert cli.returncode == 0, out
    rows = (tmp_path / "state" / "one" / "plan.log").read_text().splitlines()
    assert [r.split()[1] for r in rows] == ["start", "requeued", "start", "end"] and rows[-1].endswith(f"rc=0 {files.key}")
    log = files.path("log").read_text()
    assert "this job is preempted" in log and "Requeued job" in log
    assert_resumed_like_the_reference(world, "preempted")


def test_status_shows_the_latest_unfinished_progress_bars_from_the_logs_tail(tmp_path):
    log = tmp_path / "line.log"
    bars = ["Loading weights: 100%|##| 3/3 [00:01<00:00, 2.0it/s]",
            *(f"AlphaEdit sequential:  {n}%|#   | {n}/256 [0{n}:00<54:{n:02d}, 13.6s/step]" for n in (1, 2, 15)),
            "unedited answers (neighbourhood prompts):  50%|##  | 128/256 [01:00<01:00, 2.1it/s]",
            "capability:  10%|#   | 1/7 [00:20<02:00, 20s/it]"]
    log.write_text("x" * plan_state.LOG_TAIL_BYTES + "\r".join(bars) + "\nINFO something logged after\n")
    assert plan_state.last_progress(log) == "capability 1/7 (~02:00 left)"
    log.write_text("\r".join(bars[:4]))  # finished bars are left out while one is unfinished
    assert plan_state.last_progress(log) == "AlphaEdit sequential 15/256 (~54:15 left)"
    log.write_text("\r".join([*bars[:5], bars[4].replace("128/256", "256/256")]))  # a bar's last state counts
    assert plan_state.last_progress(log) == "AlphaEdit sequential 15/256 (~54:15 left)"
    log.write_text("\r".join(bars[:1]))
    assert plan_state.last_progress(log) == "Loading weights 3/3 (~00:00 left)"
    log.write_text("no bar here\n")
    assert plan_state.last_progress(log) is None and plan_state.last_progress(tmp_path / "absent") is None
    files = plan_state.LineFiles(tmp_path, "k")
    (tmp_path / "k.log").write_text("\r".join(bars[:4]))
    assert plan_state.state_row("running", files, "echo a") == "running         k  [AlphaEdit sequential 15/256 (~54:15 left)]  echo a"
    assert plan_state.state_row("done", files, "echo a") == "done            k  echo a"


def test_status_reads_the_run_folders_of_lines_run_outside_the_plan(world, ran, tmp_path):
    """Lines run by hand (here: under another plans folder, so this one holds no marks): --status reads
    each evaluate line's run folder. A finished run is done (and would not be submitted again); a run
    another process is writing, started with more threads, is running; once that process is gone it is
    stopped, with its checkpoint; a line with other arguments, or that wrote no run folder, waits."""
    import shutil
    import socket

    from experiments.sweeps.run_folders import evaluate_argv

    code, status = run_main(ran.path, "--plans_dir", tmp_path / "elsewhere", "--status")
    rows = status.splitlines()
    assert [" ".join(r.split()[:2]) for r in rows] == ["done outside", "done outside", f"waiting {rows[2].split()[1]}",
                                                      "done outside"]
    assert "[reference/run_000 finished]" in rows[0]
    assert plan_state.settled("done outside") and plan_state.settled("running outside")
    assert not plan_state.settled("stopped outside")  # submitting the plan resumes it

    line = evaluate_line(world, "by_hand")
    shutil.copytree(world.results_dir / "reference" / "run_000", world.results_dir / "by_hand" / "run_000")
    meta_path = world.results_dir / "by_hand" / "run_000" / "run.json"
    argv = [{"--dir_name=reference": "--dir_name=by_hand", "--num_threads=1": "--num_threads=2"}.get(a, a)
            for a in evaluate_argv(evaluate_line(world, "reference"))]
    assert "--dir_name=by_hand" in argv and "--num_threads=2" in argv
    writer = subprocess.Popen(["sleep", "60"])
    meta = {**json.loads(meta_path.read_text()), "status": "running", "pid": writer.pid, "host": socket.gethostname(),
            "last_checkpoint": 3, "argv": argv}
    meta_path.write_text(json.dumps(meta))
    plan_path = write_plan(tmp_path / "by_hand.txt", [line, evaluate_line(world, "by_hand", SHORT_EDITS)])
    try:
        code, status = run_main(plan_path, "--plans_dir", tmp_path / "elsewhere", "--status")
    finally:
        writer.kill()
        writer.wait()
    rows = status.splitlines()
    assert rows[0].startswith("running outside ") and "[by_hand/run_000: checkpoint after step 3 of 6]" in rows[0]
    assert rows[1].startswith("waiting ")  # 2 edits: not the run's arguments
    code, status = run_main(plan_path, "--plans_dir", tmp_path / "elsewhere", "--status")
    assert status.startswith("stopped outside ") and "checkpoint after step 3 of 6" in status


def test_a_killed_line_shows_killed_and_the_next_submission_finishes_it(world, ran, tmp_path):
    line = evaluate_line(world, "killed")
    path, files = write_plan(tmp_path / "one.txt", [line]), files_of(tmp_path / "state" / "one", line)
    cli = start_plan_cli(path, tmp_path / "state")
    job = wait_for_first_edit(world, "killed", files)
    for group in (cli.pid, job["command_pid"]):  # everything at once, as a reboot would
        os.killpg(group, signal.SIGKILL)
    cli.wait(timeout=60)
    wait_for(lambda: not Path(f"/proc/{job['command_pid']}").exists(), "the killed run to be reaped", 60)
    code, status = run_main(path, "--plans_dir", tmp_path / "state", "--status")
    assert status.split()[0] == "killed"
    shown = re.search(r"\[ROME rollback (\d+)/6 \(~[\d:?]+ left\)\]", status)  # where it stopped, from its log
    assert shown and int(shown[1]) < 6, status
    code, out = run_main(path, "--plans_dir", tmp_path / "state")
    assert code == 0 and "1 of 1 lines done" in out
    assert_resumed_like_the_reference(world, "killed")


def test_sigterm_to_the_controller_stops_its_lines_as_ctrl_c_does(world, ran, tmp_path):
    """``kill`` of a controller running in the background: its commands (sessions of their own) are
    stopped at their checkpoint, not left running unmanaged; the next submission finishes the line."""
    line = evaluate_line(world, "terminated")
    path, files = write_plan(tmp_path / "one.txt", [line]), files_of(tmp_path / "state" / "one", line)
    cli = start_plan_cli(path, tmp_path / "state")
    job = wait_for_first_edit(world, "terminated", files)
    cli.send_signal(signal.SIGTERM)
    out, _ = cli.communicate(timeout=120)
    assert cli.returncode == 143 and "started lines stop at their checkpoint" in out, out
    wait_for(lambda: not Path(f"/proc/{job['command_pid']}").exists(), "the command to stop", 120)
    meta = json.loads((world.results_dir / "terminated" / "run_000" / "run.json").read_text())
    assert meta["status"] != "finished"  # stopped mid-way, not run to the end unmanaged
    code, out = run_main(path, "--plans_dir", tmp_path / "state")
    assert code == 0 and "1 of 1 lines done" in out
    assert_resumed_like_the_reference(world, "terminated")


def test_checkpoint_stops_the_command_and_returns_the_same_task(tmp_path):
    """The contract submitit relies on at a SLURM timeout or preemption (its handler calls checkpoint(),
    pickles what it returns and requeues): the command is stopped first, then the same task comes back."""
    from submitit.helpers import DelayedSubmission

    started, stopped = tmp_path / "started", tmp_path / "stopped"
    line = f"trap 'echo $? > {stopped}; exit 143' TERM; touch {started}; while true; do sleep 0.05; done"
    task = plan.PlanTask(line, tmp_path / "state", {"OMP_NUM_THREADS": "1"}, stop_grace_s=30)
    outcome = []
    runner = threading.Thread(target=lambda: outcome.append(task()))
    runner.start()
    wait_for(started.exists, "the command to start", 60)
    assert plan.line_state(task.files) == "running"
    delayed = task.checkpoint()
    assert stopped.exists()  # SIGTERM reached the command before checkpoint() returned
    assert isinstance(delayed, DelayedSubmission) and delayed.function is task and not delayed.args
    runner.join(timeout=30)
    assert outcome == [plan_state.REQUEUED] and plan.line_state(task.files) == plan_state.REQUEUED
    delayed.dump(tmp_path / "requeued.pkl")
    again = DelayedSubmission.load(tmp_path / "requeued.pkl").function
    assert isinstance(again, plan.PlanTask) and again.line == line and again._command is None


# --------------------------------------------------------------------------------------------
# The SLURM form, up to sbatch


FAKE_SBATCH = """#!/bin/sh
cp "$1" "{copy}"
echo "$PYTHONPATH" > "{copy}.pythonpath"
echo "Submitted batch job 4242"
"""


def test_slurm_gets_one_array_with_the_cap_partition_gpus_and_time(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(FAKE_SBATCH.format(copy=tmp_path / "sbatch.sh"))
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")
    for tool in ("sbatch", "srun"):
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    lines = ["echo a", "echo b", "echo c", "echo d"]
    path, state_root = write_plan(tmp_path / "gpu.txt", lines), tmp_path / "state"
    files_of(state_root / "gpu", lines[1]).path("done").parent.mkdir(parents=True)
    files_of(state_root / "gpu", lines[1]).path("done").touch()  # finished earlier: not submitted again
    code, out = run_main(path, "--plans_dir", state_root, "--executor", "slurm", "--max_parallel", 2,
                         "--slurm_partition", "gpu", "--slurm_gpus_per_task", 1, "--slurm_time_min", 90,
                         "--slurm_setup", "source .venv/bin/activate")
    assert code == 0 and "submitted 3 lines as SLURM job 4242 (at most 2 at once)" in out
    sbatch = (tmp_path / "sbatch.sh").read_text().splitlines()
    for flag in ("--array=0-2%2", "--partition=gpu", "--gpus-per-task=1", "--time=90", "--cpus-per-task=2",
                 "--signal=USR2@120", "--job-name=plan-gpu"):
        assert f"#SBATCH {flag}" in sbatch, flag
    assert not any(row.startswith("#SBATCH --error") for row in sbatch)  # stderr goes to the one log
    assert "source .venv/bin/activate" in sbatch
    assert (tmp_path / "sbatch.sh.pythonpath").read_text().strip().split(os.pathsep)[0] == str(REPO_ROOT)
    from submitit.helpers import DelayedSubmission

    tasks = [DelayedSubmission.load(state_root / "gpu" / "submitit" / f"4242_{i}_submitted.pkl").function for i in range(3)]
    assert [t.line for t in tasks] == ["echo a", "echo c", "echo d"]
    assert all(t.nice == 0 and t.env == {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"} for t in tasks)
    _, status = run_main(path, "--plans_dir", state_root, "--status")
    assert [row.split()[0] for row in status.splitlines()] == ["waiting", "done", "waiting", "waiting"]


# --------------------------------------------------------------------------------------------
# Bad input, and what needs submitit


@pytest.mark.parametrize("case", ["no plan file", "cap of 0", "only comments"])
def test_bad_input_is_one_message_and_starts_nothing(tmp_path, capsys, case):
    path = tmp_path / "plan.txt"
    path.write_text("# nothing\n\n" if case == "only comments" else "echo a\n")
    argv = {"no plan file": [tmp_path / "none.txt"], "cap of 0": [path, "--max_parallel", "0"],
            "only comments": [path]}[case]
    with pytest.raises(SystemExit) as stop:
        run_main(*argv, "--plans_dir", tmp_path / "state")
    err = capsys.readouterr().err
    assert stop.value.code == 2
    assert {"no plan file": f"no plan file {tmp_path / 'none.txt'}", "cap of 0": "--max_parallel: must be an integer >= 1, got '0'",
            "only comments": "holds no command"}[case] in err
    assert not (tmp_path / "state").exists()


def test_slurm_where_there_is_none_is_one_message(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # no srun
    code, _ = run_main(write_plan(tmp_path / "p.txt", ["echo a"]), "--plans_dir", tmp_path / "state", "--executor", "slurm")
    assert code == 2 and "no SLURM here (srun is not on PATH)" in capsys.readouterr().err
    assert not (tmp_path / "state").exists()


def test_only_a_run_imports_submitit():
    code = "import sys, experiments.sweeps.plan as p; p.parse_args(['scripts/plans/smollm2_lifelong.txt']); " \
           "assert 'submitit' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
