"""The run folder: numbered runs, atomic JSON files, and what makes a run reproducible."""
from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

from util.globals import REPO_ROOT

RUN_DIR_RE = re.compile(r"^run_(\d{3,})$")
VERSIONED_PACKAGES = ("torch", "transformers", "numpy", "tokenizers", "safetensors", "gguf")


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write to a temporary file in the same folder, then rename: never a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def existing_runs(alg_dir: Path) -> list[Path]:
    if not alg_dir.is_dir():
        return []
    return sorted((p for p in alg_dir.iterdir() if p.is_dir() and RUN_DIR_RE.match(p.name)), key=lambda p: int(RUN_DIR_RE.match(p.name).group(1)))


def new_run_dir(alg_dir: Path) -> Path:
    """The next free run_NNN folder, created."""
    runs = existing_runs(alg_dir)
    n = int(RUN_DIR_RE.match(runs[-1].name).group(1)) + 1 if runs else 0
    path = alg_dir / f"run_{n:03d}"
    path.mkdir(parents=True, exist_ok=False)
    return path


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def environment_record() -> dict:
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
        "command": [sys.executable, *sys.argv],
        "cwd": os.getcwd(),
    }
