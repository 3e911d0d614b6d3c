"""Reading run folders written by ``experiments.evaluate`` (one per ``results/<dir_name>/run_NNN``).

Each protocol reads its own files (``Protocol.read_run`` in experiments/protocols/) into the same
``Run`` shape: its steps (edits or batches, with what each did) and its checkpoints (the per-record
metrics that count at n edits, and the protocol's own ratios). A folder without run.json is read as
the roll-back protocol's, so folders of the WilKE paper's own code can be summarised too.

A summary must never silently average a half-written or damaged run into the others, and must
never crash because one folder is bad: every problem becomes a ``RunFolderError`` naming the
file, and ``load_runs`` turns it into a ``SkippedRun`` that the caller reports. ``run.json`` and
``params.json`` are read when present (and must then be valid JSON objects); a run.json ``status``
other than 'finished' (running, interrupted, failed: see ``failure.json``) marks the run
incomplete, as do fewer edits than ``edit_times``. Incomplete runs are skipped unless partial runs
are allowed; then their finished edits count.
"""
from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path
from typing import Iterable, Optional, Sequence

from experiments.protocols import PROTOCOLS
from experiments.store.files import PARAMS_FILE, RUN_DIR_RE, RUN_META_FILE
from experiments.store.run_types import Checkpoint, LoadedRuns, Run, RunFolderError, SkippedRun, read_object

LOG = logging.getLogger(__name__)


def load_run(path: Path, algorithm: str, allow_partial: bool = False) -> Run:
    """Read and check one run folder; raises ``RunFolderError`` saying what is wrong."""
    path = Path(path)
    if not path.is_dir():
        raise RunFolderError("no such run folder")
    meta = read_object(path / RUN_META_FILE) if (path / RUN_META_FILE).exists() else {}
    params = read_object(path / PARAMS_FILE) if (path / PARAMS_FILE).exists() else {}
    protocol = meta.get("protocol", "rollback")
    if protocol not in PROTOCOLS:
        raise RunFolderError(f"run.json names protocol {protocol!r}, which is not registered "
                             f"(experiments/protocols/__init__.py has {', '.join(PROTOCOLS)})")
    content = PROTOCOLS[protocol].read_run(path, meta, allow_partial)
    checkpoints = with_capabilities(path, content.checkpoints, content.step_ends[-1] if content.step_ends else 0)
    return Run(algorithm, path.name, path, meta, params, protocol, content.steps, content.step_ends,
               checkpoints, partial=content.partial)


CAPABILITY_FILE_RE = re.compile(r"^capability_after_edit_(\d+)\.json$")
CAPABILITY_SCORES = {"accuracy": "acc", "f1": "f1", "mcc": "mcc"}


def capability_ratios(obj: dict, where: str) -> dict[str, float]:
    """A capability file's scores as summary metrics: ``<task>_acc``, ``<task>_f1``, ``<task>_mcc``, ``perplexity``."""
    ratios = {}
    for task, scores in obj.items():
        if task == "perplexity" and isinstance(scores, dict):
            ratios["perplexity"] = float(scores["perplexity"])
        elif isinstance(scores, dict) and "accuracy" in scores:
            ratios.update({f"{task}_{short}": float(scores[key]) for key, short in CAPABILITY_SCORES.items()})
    if not ratios:
        raise RunFolderError(f"{where}: no probe scores")
    return ratios


def with_capabilities(path: Path, checkpoints: dict[int, Checkpoint], n_edits: int) -> dict[int, Checkpoint]:
    """The checkpoints with the general abilities checked there (``capability_after_edit_{n}.json``);
    n = 0 (the unedited model) and checks between checkpoints become checkpoints of their own."""
    found = {int(m.group(1)): f for f in path.iterdir() if (m := CAPABILITY_FILE_RE.match(f.name))}
    merged = dict(checkpoints)
    for n, f in sorted(found.items()):
        if n > n_edits:
            continue  # written by a step whose own files the run did not finish
        ratios = capability_ratios(read_object(f), f.name)
        old = merged.get(n, Checkpoint(n, (), {}))
        merged[n] = dataclasses.replace(old, ratios={**old.ratios, **ratios})
    return dict(sorted(merged.items()))


def available_dir_names(results_dir: Path) -> list[str]:
    """Sub-folders of ``results_dir`` that hold at least one run_NNN folder."""
    if not Path(results_dir).is_dir():
        return []
    return sorted(
        d.name for d in Path(results_dir).iterdir()
        if d.is_dir() and any(p.is_dir() and RUN_DIR_RE.match(p.name) for p in d.iterdir())
    )


def _run_folders(alg_dir: Path, run_names: Optional[Iterable[str]]) -> list[Path]:
    if run_names is not None:
        return [alg_dir / name for name in run_names]
    if not alg_dir.is_dir():
        return []
    folders = [p for p in alg_dir.iterdir() if p.is_dir() and RUN_DIR_RE.match(p.name)]
    return sorted(folders, key=lambda p: int(RUN_DIR_RE.match(p.name).group(1)))


def load_runs(
    results_dir: Path,
    dir_names: Sequence[str],
    run_names: Optional[Sequence[str]] = None,
    allow_partial: bool = False,
) -> LoadedRuns:
    """Every usable run of every ``dir_name``; unusable folders are logged and listed as skipped."""
    loaded = LoadedRuns()
    for dir_name in dir_names:
        alg_dir = Path(results_dir) / dir_name
        folders = _run_folders(alg_dir, run_names)
        if not folders:
            loaded.skipped.append(SkippedRun(alg_dir, "no run_NNN folders"))
        for folder in folders:
            try:
                loaded.runs.append(load_run(folder, dir_name, allow_partial))
            except RunFolderError as e:
                loaded.skipped.append(SkippedRun(folder, str(e)))
    for s in loaded.skipped:
        LOG.warning("skipping %s: %s", s.path, s.reason)
    return loaded
