"""scripts/run_plan.sh, the short form of experiments/sweeps/plan.py: every line of a plan runs once, a
rerun goes on where it stopped, and WORKERS, --status and PLAN_STATE_DIR mean what they meant."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from util.globals import REPO_ROOT

SCRIPT = REPO_ROOT / "scripts" / "run_plan.sh"


def run_plan(state: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PLAN_STATE_DIR": str(state)}
    return subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=300)


def test_each_line_runs_once_and_a_rerun_retries_only_what_failed(tmp_path):
    pytest.importorskip("submitit")
    out, flag = tmp_path / "ran.txt", tmp_path / "may_pass"
    lines = [f"sleep 0.3; echo {name} >> {out}" for name in ("a", "b", "c", "d")]
    lines.insert(2, f"echo e >> {out}; test -e {flag}")  # fails until the flag exists
    plan = tmp_path / "plan.txt"
    plan.write_text("# a comment\n\n" + "\n".join(lines) + "\n")
    state = tmp_path / "state"

    first = run_plan(state, str(plan), "2")
    assert first.returncode == 1, first.stderr  # a line failed
    assert sorted(out.read_text().split()) == ["a", "b", "c", "d", "e"]  # two at once, no line twice
    assert "4 of 5 lines done" in first.stdout
    status = run_plan(state, "--status", str(plan)).stdout.splitlines()
    assert run_plan(state, str(plan), "--status").stdout.splitlines() == status  # the flag anywhere
    assert [row.split()[0] for row in status] == ["done", "done", "failed", "done", "done"]
    assert status[2].startswith("failed rc=1 ") and status[2].endswith(f"test -e {flag}")  # a long line shows its end
    assert (state / "plan" / f"{status[2].split()[2]}.log").exists()  # under PLAN_STATE_DIR/<plan>/

    flag.touch()
    second = run_plan(state, str(plan))
    assert second.returncode == 0 and "5 of 5 lines done" in second.stdout
    assert sorted(out.read_text().split()) == ["a", "b", "c", "d", "e", "e"]  # only the failed line again


def test_a_missing_plan_is_an_error(tmp_path):
    result = run_plan(tmp_path, str(tmp_path / "none.txt"))
    assert result.returncode == 2 and "no plan file" in result.stderr


def test_workers_must_be_a_positive_integer(tmp_path):
    out = tmp_path / "ran.txt"
    plan = tmp_path / "plan.txt"
    plan.write_text(f"echo a >> {out}\n")
    for bad in ("0", "two", "--stauts"):
        result = run_plan(tmp_path / "state", str(plan), bad)
        assert result.returncode == 2 and f"--max_parallel: must be an integer >= 1, got '{bad}'" in result.stderr
    assert not out.exists() and not (tmp_path / "state").exists()  # nothing ran
