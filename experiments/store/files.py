"""The run folder: numbered runs, atomic JSON files, and what makes a run reproducible.

The files every run has (each protocol names its own, in experiments/protocols/):
``unedited_predictions.json`` (what unchanged-prediction locality
compares against), ``run.json`` (what ran, where, with what;
``status`` is running/finished/interrupted/failed), ``params.json`` (the hparams),
``skipped_records.json`` (bad records left out, with why), ``failure.json`` (what stopped a failed
run) and the weight checkpoint of experiments/store/checkpoints.py.

Per-edit files are deterministic except for timing fields: every key ending in ``seconds`` or
``time`` (``strip_timing`` removes them before comparing two runs).
"""
from __future__ import annotations

import contextlib
import json
import os
import platform
import random
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator, Sequence

from util.atomic_files import write_json_atomic  # noqa: F401  (the run files' writer)
from util.globals import REPO_ROOT

RUN_DIR_RE = re.compile(r"^run_(\d{3,})$")
VERSIONED_PACKAGES = ("torch", "transformers", "numpy", "tokenizers", "safetensors", "gguf", "scipy", "scikit-learn", "nltk")
TIMING_SUFFIXES = ("seconds", "time")
RUN_META_FILE = "run.json"
PARAMS_FILE = "params.json"
SKIPPED_FILE = "skipped_records.json"
FAILURE_FILE = "failure.json"


def strip_timing(obj: Any) -> Any:
    """``obj`` without timing fields (keys ending in 'seconds' or 'time'), at any depth."""
    if isinstance(obj, dict):
        return {k: strip_timing(v) for k, v in obj.items() if not str(k).endswith(TIMING_SUFFIXES)}
    if isinstance(obj, list):
        return [strip_timing(v) for v in obj]
    return obj


def read_json(path: Path) -> Any:
    with open(path) as f:
        return json.load(f)


def existing_runs(alg_dir: Path) -> list[Path]:
    if not alg_dir.is_dir():
        return []
    return sorted((p for p in alg_dir.iterdir() if p.is_dir() and RUN_DIR_RE.match(p.name)), key=lambda p: int(RUN_DIR_RE.match(p.name).group(1)))


def new_run_dir(alg_dir: Path) -> Path:
    """The next free run_NNN folder, created (by this process alone: when another process creates the
    same number first, the next one is taken)."""
    runs = existing_runs(alg_dir)
    n = int(RUN_DIR_RE.match(runs[-1].name).group(1)) + 1 if runs else 0
    alg_dir.mkdir(parents=True, exist_ok=True)
    while True:
        path = alg_dir / f"run_{n:03d}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            n += 1


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def git_dirty() -> bool | None:
    """Whether tracked files differ from the commit (then the commit alone does not pin the code)."""
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return bool(out.stdout.strip()) if out.returncode == 0 else None


def environment_record(argv: Sequence[str] | None = None) -> dict:
    """Versions, commit, command and the torch settings that decide bit-level results."""
    import torch

    versions = {}
    for pkg in VERSIONED_PACKAGES:
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": versions,
        "git_commit": git_commit(),
        "git_dirty": git_dirty(),
        "command": [sys.executable, *sys.argv],
        "argv": list(sys.argv[1:] if argv is None else argv),
        "cwd": os.getcwd(),
        "torch_num_threads": torch.get_num_threads(),
        "torch_deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
    }


class RunMeta:
    """``run.json`` of one run, rewritten atomically whenever a field changes (status, checkpoint)."""

    def __init__(self, run_dir: Path, data: dict):
        self.run_dir, self.data = run_dir, data

    @classmethod
    def load(cls, run_dir: Path) -> "RunMeta":
        return cls(run_dir, read_json(run_dir / RUN_META_FILE))

    def update(self, **fields: Any) -> None:
        self.data.update(fields)
        write_json_atomic(self.run_dir / RUN_META_FILE, self.data)


@contextlib.contextmanager
def reproducible_torch(seed: int, num_threads: int | None = None) -> Iterator[None]:
    """Seed every RNG, pin the thread count and prefer deterministic kernels; undo it all on exit.

    ``use_deterministic_algorithms`` is warn-only: a few CUDA kernels have no deterministic
    version, and a warning is better than a refusal. On CPU the settings that matter are the seed
    and the thread count (reductions are split by thread), both recorded in run.json.
    """
    import numpy as np
    import torch

    saved = (random.getstate(), np.random.get_state(), torch.get_num_threads(),
             torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    set_cublas = torch.cuda.is_available() and "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    with torch.random.fork_rng():
        try:
            if set_cublas:
                os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"  # what deterministic cuBLAS needs
            random.seed(seed)
            np.random.seed(seed % 2**32)
            torch.manual_seed(seed)
            if num_threads:
                torch.set_num_threads(num_threads)
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
            yield
        finally:
            random.setstate(saved[0])
            np.random.set_state(saved[1])
            torch.set_num_threads(saved[2])
            torch.use_deterministic_algorithms(saved[3], warn_only=saved[4])
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[5], saved[6]
            if set_cublas:
                os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
