"""The shipped plans (scripts/plans/*.txt) are runnable: a typo there costs a session of runs.

Each evaluate line is parsed and goes through ``check_without_model``, the checks ``experiments.evaluate``
makes before it loads the model (flags, algorithm, hyperparameter file, protocol flags, and where
this machine has the data, the dataset, the split and --edit_times); each bench line parses, and so
does each preparation command (statistics, known subset; a line may chain several with ``&&``). Every
evaluate line resumes (``--continue_from_run auto``), so a plan restarted after a kill goes on from
the killed run's last checkpoint instead of starting it again, and no two lines are the same (a plan
runs each distinct line once).
"""
from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from dsets import make_known
from experiments import collect_stats, evaluate
from experiments.bench import cli as bench
from experiments.run.setup import check_without_model
from util.globals import REPO_ROOT, load_paths
from util.hparams import resolve_hparams_file

PLANS = sorted((REPO_ROOT / "scripts" / "plans").glob("*.txt"))


def plan_commands(plan: Path) -> list[str]:
    lines = [l.strip() for l in plan.read_text().splitlines()]
    return [l for l in lines if l and not l.startswith("#")]


def python_module_args(command: str) -> list[tuple[str, list[str]]]:
    """(module, its arguments) of each ``python -m`` command a shell line chains with ``&&`` (a
    ``mkdir -p`` of an output folder may come between them)."""
    parts = []
    for part in command.split("&&"):
        words = shlex.split(part)
        if words[:2] == ["mkdir", "-p"]:
            continue
        assert words[:2] == ["python", "-m"], f"not a python -m command: {part.strip()}"
        parts.append((words[2], words[3:]))
    return parts


PREPARATION_PARSERS = {"experiments.bench": bench.parse_args, "experiments.collect_stats": collect_stats.parse_args,
                       "dsets.make_known": make_known.parse_args}


def test_there_is_a_plan():
    assert PLANS, "scripts/plans/ holds no plan"


@pytest.mark.parametrize("plan", PLANS, ids=lambda p: p.name)
def test_plan_lines_are_distinct_and_resumable(plan):
    commands = plan_commands(plan)
    assert len(set(commands)) == len(commands), f"{plan.name}: a line appears twice (it would run once)"
    for command in commands:
        for module, argv in python_module_args(command):
            if module == "experiments.evaluate":
                assert evaluate.parse_args(argv).continue_from_run == "auto", f"{plan.name}: no auto resume in {command}"


@pytest.mark.parametrize("plan", PLANS, ids=lambda p: p.name)
def test_plan_commands_pass_the_checks_made_before_a_model_loads(plan):
    for command in plan_commands(plan):
        for module, argv in python_module_args(command):
            if module in PREPARATION_PARSERS:
                args = PREPARATION_PARSERS[module](argv)
                if module == "experiments.collect_stats":  # the hparams that say which statistics exist
                    resolve_hparams_file(load_paths().hparams_dir, args.alg_name, args.hparams_fname, args.model_name)
                continue
            assert module == "experiments.evaluate", f"{plan.name}: unexpected command {command}"
            check_without_model(evaluate.parse_args(argv))  # a known subset still to be built stops it early


def test_status_finds_each_evaluate_lines_arguments_and_run_folder():
    """``plan --status`` looks up lines run by hand in their run folders (experiments/sweeps/run_folders.py):
    the evaluate command of a chained line is its last one, ``--flag=value`` is ``--flag value``, and the
    flags a resume may change do not count; every evaluate line of the shipped plans names a folder."""
    from experiments.sweeps.run_folders import evaluate_argv, flag_value, normalised

    line = "python -m dsets.make_known --model_name m && python -m experiments.evaluate --alg_name=ROME --seed 9 ; echo x"
    assert evaluate_argv(line) == ["--alg_name=ROME", "--seed", "9"]
    assert evaluate_argv("python -m experiments.collect_stats --model_name m") is None
    assert evaluate_argv("python -m experiments.evaluate --x 'unclosed") is None
    assert normalised(["--alg_name=ROME", "--num_threads=2", "--wild", "--continue_from_run", "auto", "--seed", "9"]) == \
        ["--alg_name", "ROME", "--wild", "--seed", "9"]
    assert flag_value(["--dir_name=A", "--alg_name", "B"], "--alg_name") == "B"
    for plan in PLANS:
        for command in plan_commands(plan):
            argv = evaluate_argv(command)
            if argv is not None:
                assert flag_value(argv, "--dir_name") or flag_value(argv, "--alg_name"), f"{plan.name}: {command}"
