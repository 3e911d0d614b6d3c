"""A run of the evaluate CLI killed and resumed, for any stateful editor: kill it with SIGKILL while it
edits (nothing gets to clean up), and stop it after its first edit with its state then lost on resume
(the check that a resume can fail). tests/test_encore.py uses these; test_ultraedit.py and
test_protocols.py hold the same steps written out for their editors."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from util.globals import REPO_ROOT

# The run with every edit of the editor class named in argv[1] ("module:Class") half a second longer.
SLOW_RUN = """
import importlib, sys, time
from experiments.evaluate import cli
module, _, name = sys.argv[1].partition(":")
editor = getattr(importlib.import_module(module), name)
real = editor.edit
def slow(self, requests):
    time.sleep(0.5)
    return real(self, requests)
editor.edit = slow
sys.exit(cli(sys.argv[2:]))
"""


def sigkill_while_editing(editor_ref: str, args: list[str], run_dir: Path, after: str = "batch_2.json") -> None:
    """Run ``args`` in a subprocess (edits slowed down) and SIGKILL it once ``run_dir / after`` exists;
    the run's status is then still "running": nothing got to record that it stopped."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", SLOW_RUN, editor_ref, *args], cwd=REPO_ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not (run_dir / after).exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == -signal.SIGKILL, err[-2000:]
    assert json.loads((run_dir / "run.json").read_text())["status"] == "running"


def resume_with_state_lost(monkeypatch, editor_class: type, cli: Callable[[list[str]], int], args: list[str]) -> None:
    """Run ``args`` stopped by SIGTERM after its first edit (it checkpoints), then resume it with the
    editor's ``load_state_dict`` doing nothing: what a resume without the saved state would give."""
    real_edit = editor_class.edit
    calls = []

    def edit_then_sigterm(editor, requests):
        outcome = real_edit(editor, requests)
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return outcome

    monkeypatch.setattr(editor_class, "edit", edit_then_sigterm)
    assert cli(args) == 128 + signal.SIGTERM
    monkeypatch.setattr(editor_class, "edit", real_edit)
    monkeypatch.setattr(editor_class, "load_state_dict", lambda editor, state: None)
    assert cli(args + ["--continue_from_run=run_000"]) == 0
