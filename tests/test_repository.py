"""What the repository tracks: nothing a run or a cache writes, nothing large.

A symlink committed at data/stats (a worktree's link to the main checkout's statistics) once made a
fast-forward merge replace the ignored statistics, known subsets and converted models with that link:
git treats ignored files as expendable. These paths must never be tracked, in any form."""
from __future__ import annotations

import shutil
import subprocess

import pytest

from util.globals import REPO_ROOT

WRITTEN_BY_RUNS = ("data/stats", "data/models", "data/dsets", "data/cache", "results")
LARGEST_FILE = 1 << 20  # bytes; the largest tracked files are result figures (~360 KiB) and golden fixtures


def tracked() -> list[tuple[str, str]]:
    """(mode, path) of every tracked file; skips where this is not a git checkout."""
    if shutil.which("git") is None or not (REPO_ROOT / ".git").exists():
        pytest.skip("not a git checkout: nothing to check")
    out = subprocess.run(["git", "ls-files", "-s"], cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout
    return [(line.split()[0], line.split("\t", 1)[1]) for line in out.splitlines()]


def test_nothing_runs_or_caches_write_is_tracked():
    bad = [path for _, path in tracked() if path.split("/")[0] == "results"
           or any(path == p or path.startswith(p + "/") for p in WRITTEN_BY_RUNS)]
    assert bad == [], f"tracked, but written by runs or caches: {bad}"


def test_no_symlink_is_tracked():
    assert [path for mode, path in tracked() if mode == "120000"] == []


def test_no_large_file_is_tracked():
    """Data is read from ../shared, packages come from the registries: nothing megabyte-sized is committed
    (a 10 MiB ruff wheel once was)."""
    big = [path for _, path in tracked() if (REPO_ROOT / path).is_file() and (REPO_ROOT / path).stat().st_size > LARGEST_FILE]
    assert big == [], f"tracked files over {LARGEST_FILE} bytes: {big}"
