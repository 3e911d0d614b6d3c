"""What tests/test_grace.py and tests/test_wise.py share: fixture tensors, requests, and a CLI run that
is killed after its second step and resumed."""
from __future__ import annotations

import base64
import json
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from experiments.evaluate import cli
from experiments.store.files import strip_timing
from util.tiny_models import TinyWorld

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def fixture(name: str) -> dict:
    return json.loads((FIXTURES / name).read_text())


def b64_tensor(text: str) -> torch.Tensor:
    """A float32 vector stored as little-endian bytes in base64 (the fixtures' compact form)."""
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.float32)


def request(prompt: str, target: str, true: str = " Berlin") -> dict:
    """A request whose whole prompt is the subject, so ``prompt`` is edited exactly as written."""
    return {"prompt": "{}", "subject": prompt, "target_new": {"str": target}, "target_true": {"str": true}}


def write_unrelated(world: TinyWorld, n: int = 3) -> None:
    """A small zsRE training file in the tiny world's data folder (WISE's unrelated rows)."""
    rows = [{"loc": f"nq question: who wrote book number {i}", "loc_ans": "the egyptians"} for i in range(n)]
    (world.root / "zsre_mem_train.json").write_text(json.dumps(rows))


def result_files(run_dir: Path) -> dict[str, Any]:
    names = [p.name for p in run_dir.glob("*.json") if p.name.startswith(("edit_", "batch_", "evaluation_", "retention_"))]
    return {n: strip_timing(json.loads((run_dir / n).read_text())) for n in sorted(names)}


def killed_and_resumed(world: TinyWorld, args: Callable[[str], list[str]], editor_class: type, monkeypatch) -> tuple[dict, dict]:
    """(files of an uninterrupted run, files of the same run stopped by SIGTERM during its second
    editor call and resumed with --continue_from_run)."""
    assert cli(args("whole")) == 0
    whole = result_files(world.results_dir / "whole" / "run_000")
    real_edit, calls = editor_class.edit, []

    def edit_then_sigterm(editor, requests):
        calls.append(1)
        outcome = real_edit(editor, requests)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # the run stops after this step, with a checkpoint
        return outcome

    monkeypatch.setattr(editor_class, "edit", edit_then_sigterm)
    assert cli(args("killed")) == 128 + signal.SIGTERM
    monkeypatch.undo()
    killed_dir = world.results_dir / "killed" / "run_000"
    assert cli(args("killed") + ["--continue_from_run=run_000"]) == 0
    return whole, result_files(killed_dir)
