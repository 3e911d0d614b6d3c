"""Resuming a killed run: which folder, whether it is the same run, and where it restarts.

A run folder is resumed only when asked (``--continue_from_run run_NNN``) and only when its
``run.json`` has the same configuration (everything that changes results: algorithm, model,
hparams, dataset file, seed, number of edits, generation settings). When a new run starts and
the newest run of the same ``dir_name`` is an unfinished run of the same configuration, the log
says so and names the flag; it is never reused silently.

``--continue_from_run auto`` makes a command idempotent, for plans of many runs that outlive a
session: it does nothing when a run of the same configuration has finished, resumes the newest
unfinished one, and starts a new run only when there is none.

A process writing a run folder holds an exclusive lock on its ``.run.lock`` from before its first
write to its exit, so two processes never write one folder: the second is told so, whichever way it
got there (``auto`` or a named run, two plans sharing a line, the same command typed twice).
The pid in run.json gives the same message earlier, before the model loads; the lock is what decides.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
from pathlib import Path
from typing import IO, Any, Mapping, Optional

from experiments.store.files import RUN_META_FILE, existing_runs, read_json

LOG = logging.getLogger(__name__)

FINISHED = "finished"
AUTO = "auto"
RUN_LOCK_FILE = ".run.lock"


class ResumeError(ValueError):
    """The run named by --continue_from_run cannot be continued by this command."""


def normalised(obj: Any) -> Any:
    """What ``obj`` looks like after a JSON round trip (tuples become lists, keys strings)."""
    return json.loads(json.dumps(obj))


ABSENT = "<absent>"
# Settings of the configuration that decide how fast, not what: batched greedy generation gives every
# prompt the answer it gets alone at any batch size (util/generation.py; tests/test_wild.py), and the
# torch thread count changes only the order of a sum's terms (the last bits; a run that leaves it unset
# already gets whatever the machine has), so a run started at one resumes at another, and a finished one
# counts for the same command at any. This lets a long run that started beside another continue on
# both cores once it is alone. run.json keeps the value a run started with; each resume records its own
# (``resumes[].execution``) and warns when the thread count differs.
EXECUTION_ONLY = ("wild.batch_size", "num_threads")


def config_differences(old: Any, new: Any, where: str = "", defaults: Optional[Mapping[str, Any]] = None) -> list[str]:
    """Human-readable 'field: old -> new' lines for every leaf that differs (``EXECUTION_ONLY`` aside).

    ``defaults`` ('hparams.field' -> its default): a field the old run.json lacks because it was added
    to the code later does not differ when the new value is its default, which by this project's rule
    keeps the earlier behaviour (e.g. ``mpes_prob_cutoff`` 0 = off); so an unfinished run resumes."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            path = f"{where}.{key}" if where else str(key)
            if path in EXECUTION_ONLY:
                continue
            out += config_differences(old.get(key, ABSENT), new.get(key, ABSENT), path, defaults)
        return out
    if old == ABSENT and defaults and where in defaults and normalised(defaults[where]) == new:
        return []
    return [] if old == new else [f"{where or '<config>'}: {old!r} -> {new!r}"]


def execution_settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """The ``EXECUTION_ONLY`` settings ``config`` holds, by their dotted path."""
    out = {}
    for path in EXECUTION_ONLY:
        node: Any = config
        for part in path.split("."):
            node = node.get(part, ABSENT) if isinstance(node, Mapping) else ABSENT
        if node != ABSENT:
            out[path] = node
    return out


def resolve_run_ref(alg_dir: Path, ref: str) -> Path:
    """``run_NNN`` inside ``alg_dir``, or a path to a run folder."""
    for candidate in (alg_dir / ref, Path(ref).expanduser()):
        if (candidate / RUN_META_FILE).is_file():
            return candidate
    names = [p.name for p in existing_runs(alg_dir)]
    raise ResumeError(f"--continue_from_run {ref}: no run folder with a {RUN_META_FILE} at {alg_dir / ref}; "
                      f"runs in {alg_dir}: {names or 'none'}")


def read_meta(run_dir: Path) -> dict:
    try:
        meta = read_json(run_dir / RUN_META_FILE)
    except (OSError, json.JSONDecodeError) as e:
        raise ResumeError(f"{run_dir / RUN_META_FILE}: unreadable ({e})") from None
    if not isinstance(meta, dict) or "config" not in meta:
        raise ResumeError(f"{run_dir / RUN_META_FILE}: has no 'config' (made by an older version); start a new run")
    return meta


def still_running(meta: dict) -> bool:
    """Whether the process that wrote ``meta`` is alive on this host (then it must not be resumed)."""
    pid = meta.get("pid")
    if meta.get("status") != "running" or not pid or meta.get("host") != socket.gethostname() or pid == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def lock_run_folder(run_dir: Path) -> IO[str]:
    """The run folder's lock, held by this process until the returned file is closed (or the process
    ends); a ResumeError when another process holds it."""
    f = open(run_dir / RUN_LOCK_FILE, "a")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise ResumeError(f"{run_dir} is being written by another process; let it finish or stop it first") from None
    return f


def check_resumable(run_dir: Path, config: dict, defaults: Optional[Mapping[str, Any]] = None) -> dict:
    """``run_dir``'s run.json when this command may continue it; else a ResumeError saying why."""
    meta = read_meta(run_dir)
    if meta.get("status") == FINISHED:
        raise ResumeError(f"{run_dir} is already finished; nothing to continue")
    if still_running(meta):
        raise ResumeError(f"{run_dir} is still being written by process {meta['pid']}; stop it first")
    diffs = config_differences(meta["config"], normalised(config), defaults=defaults)
    if diffs:
        raise ResumeError(f"{run_dir} was started with a different configuration ({'; '.join(diffs)}); "
                          "rerun its original command (see 'argv' in its run.json) with --continue_from_run, "
                          "or drop the flag to start a new run")
    return meta


def newest_unfinished_run(alg_dir: Path, config: dict, defaults: Optional[Mapping[str, Any]] = None
                          ) -> Optional[tuple[Path, dict]]:
    """The newest run in ``alg_dir`` when it is unfinished and has this configuration."""
    runs = existing_runs(alg_dir)
    if not runs:
        return None
    try:
        meta = read_meta(runs[-1])
    except ResumeError:
        return None
    if meta.get("status") == FINISHED or config_differences(meta["config"], normalised(config), defaults=defaults):
        return None
    return runs[-1], meta


def runs_of_config(alg_dir: Path, config: dict, defaults: Optional[Mapping[str, Any]] = None) -> list[tuple[Path, dict]]:
    """Every run folder in ``alg_dir`` whose run.json has this configuration, oldest first."""
    found = []
    for run_dir in existing_runs(alg_dir):
        try:
            meta = read_meta(run_dir)
        except ResumeError:
            continue
        if not config_differences(meta["config"], normalised(config), defaults=defaults):
            found.append((run_dir, meta))
    return found


def choose_auto(alg_dir: Path, config: dict, defaults: Optional[Mapping[str, Any]] = None
                ) -> tuple[Optional[Path], Optional[Path]]:
    """``--continue_from_run auto``: (a finished run of this configuration, None), or (None, the newest
    unfinished one to resume), or (None, None) to start a new run.

    An unfinished run that another process on this host is still writing is neither resumed nor
    duplicated: that is a ResumeError, so two workers of one plan never run the same command twice.
    """
    matching = runs_of_config(alg_dir, config, defaults)
    finished = [run_dir for run_dir, meta in matching if meta.get("status") == FINISHED]
    if finished:
        return finished[-1], None
    if not matching:
        return None, None
    run_dir, meta = matching[-1]
    if still_running(meta):
        raise ResumeError(f"{run_dir} (this configuration, unfinished) is being written by process {meta['pid']}; "
                          "--continue_from_run auto leaves it to that process")
    return None, run_dir
