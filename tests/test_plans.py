"""The shipped plans (scripts/plans/*.txt) are runnable: a typo there costs a session of runs.

Each evaluate line is parsed and goes through ``check_without_model``, the checks ``experiments.evaluate``
makes before it loads the model (flags, algorithm, hyperparameter file, protocol flags, and where
this machine has the data, the dataset, the split and --edit_times); each bench line parses. Every
evaluate line resumes (``--continue_from_run auto``), so a plan restarted after a kill goes on from
the killed run's last checkpoint instead of starting it again, and no two lines are the same (a plan
runs each distinct line once).
"""
from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from experiments import evaluate
from experiments.bench import cli as bench
from experiments.run.setup import check_without_model
from util.globals import REPO_ROOT

PLANS = sorted((REPO_ROOT / "scripts" / "plans").glob("*.txt"))


def plan_commands(plan: Path) -> list[str]:
    lines = [l.strip() for l in plan.read_text().splitlines()]
    return [l for l in lines if l and not l.startswith("#")]


def python_module_args(command: str) -> tuple[str, list[str]]:
    """(module, its arguments) of the last ``python -m`` command of a shell line."""
    words = shlex.split(command.split("&&")[-1])
    assert words[:2] == ["python", "-m"], f"not a python -m command: {command}"
    return words[2], words[3:]


def test_there_is_a_plan():
    assert PLANS, "scripts/plans/ holds no plan"


@pytest.mark.parametrize("plan", PLANS, ids=lambda p: p.name)
def test_plan_lines_are_distinct_and_resumable(plan):
    commands = plan_commands(plan)
    assert len(set(commands)) == len(commands), f"{plan.name}: a line appears twice (it would run once)"
    for command in commands:
        module, argv = python_module_args(command)
        if module == "experiments.evaluate":
            assert evaluate.parse_args(argv).continue_from_run == "auto", f"{plan.name}: no auto resume in {command}"


@pytest.mark.parametrize("plan", PLANS, ids=lambda p: p.name)
def test_plan_commands_pass_the_checks_made_before_a_model_loads(plan):
    for command in plan_commands(plan):
        module, argv = python_module_args(command)
        if module == "experiments.bench":
            bench.parse_args(argv)
            continue
        assert module == "experiments.evaluate", f"{plan.name}: unexpected command {command}"
        check_without_model(evaluate.parse_args(argv))  # a known subset still to be built stops it early, not wrongly
