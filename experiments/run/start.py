"""Opening a run folder: a new one (run.json, params.json, skipped records), or the one being resumed.

Either way the result is a ``RunLoop`` over the run's protocol, whose editor was built once from
(model, tokenizer, hparams, resources), and the step to start from. A resumed run gets the weights
and the editor state of its last checkpoint, and its run.json says what was replayed.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any, Iterator, Optional

from editing.resources import EditResources
from experiments.protocols import Protocol, RunContext
from experiments.run.faults import StopRequest
from experiments.run.loop import RunLoop
from experiments.run.resume import ResumeError, execution_settings, lock_run_folder
from experiments.run.reuse import copy_unedited
from experiments.run.setup import RunPlan, bad_input
from experiments.store.checkpoints import CHECKPOINT_FILE
from experiments.store.files import (
    FAILURE_FILE,
    PARAMS_FILE,
    SKIPPED_FILE,
    RunMeta,
    environment_record,
    new_run_dir,
    read_json,
    write_json_atomic,
)

LOG = logging.getLogger("experiments.evaluate")


def build_protocol(plan: RunPlan, model, tok, resources: EditResources, run_dir: Path) -> Protocol:
    """The run's editor (built once) inside the context its protocol works with."""
    args = plan.args
    editor = plan.algorithm.make_editor(model, tok, plan.hparams, resources)
    ctx = RunContext(model, tok, editor, plan.metrics, plan.split, plan.edit_times, run_dir, plan.generation,
                     args.generation_test_interval, args.conserve_memory, wild=plan.wild, capability=plan.capability,
                     capability_every=args.capability_every)
    return plan.protocol(ctx, plan.protocol_settings)


def new_run_meta(plan: RunPlan, model, protocol: Protocol, templates: Optional[list[str]], argv) -> dict:
    split = plan.split
    return {
        "status": "running",
        "alg_name": plan.algorithm.name,
        "model_name": plan.args.model_name,
        "model_slug": plan.slug,
        "hparams_file": str(plan.hparams_path),
        "dataset": plan.args.ds_name,
        "dataset_file": str(plan.dataset.source_path),
        "dataset_kind": plan.dataset.kind,
        "skipped_case_ids": [s["case_id"] for s in plan.skipped],
        "edit_times": plan.edit_times,
        **protocol.run_fields(),
        "device": str(next(model.parameters()).device),
        "dtype": plan.args.dtype,
        "device_map": {k: str(v) for k, v in (getattr(model, "hf_device_map", None) or {}).items()} or None,
        "checkpoint_every": plan.args.checkpoint_every,
        "checkpoint_minutes": plan.args.checkpoint_minutes,
        "checkpoint_file": CHECKPOINT_FILE,
        "generation": plan.generation_settings(full=True),
        **plan.evaluation_settings(),
        "context_templates": templates,
        "edit_stream_case_ids": [r["case_id"] for r in split.edit_stream],
        "orig_retention_case_ids": [r["case_id"] for r in split.orig_retention],
        **split.sizes(),
        "config": json.loads(json.dumps(plan.config())),
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **environment_record(argv),
    }


def context_templates(plan: RunPlan, resources: EditResources, model, tok) -> Optional[list[str]]:
    """Made on the freshly loaded model, before any edit (or restored checkpoint) changes it."""
    spec = getattr(plan.hparams, "template_spec", None)  # methods without templates (FT, MEND, KE) have none
    return None if spec is None else resources.context_templates(model, tok, spec)


@contextlib.contextmanager
def held_run_folder(plan: RunPlan) -> Iterator[Path]:
    """The folder this process writes (the run to resume, or a new one), locked for it while the block
    runs: two processes never write one run folder."""
    run_dir = plan.resume_dir or new_run_dir(plan.alg_dir)
    with bad_input("--continue_from_run", "let the other process finish (or stop it), then run this command again"):
        lock = lock_run_folder(run_dir)
    with lock:
        yield run_dir


def open_new_run(plan: RunPlan, model, tok, resources: EditResources, argv, run_dir: Path,
                 stop: Optional[StopRequest] = None) -> tuple[RunLoop, int]:
    protocol = build_protocol(plan, model, tok, resources, run_dir)
    meta = RunMeta(run_dir, new_run_meta(plan, model, protocol, context_templates(plan, resources, model, tok), argv))
    meta.update()
    write_json_atomic(run_dir / PARAMS_FILE, plan.hparams.to_dict())
    write_json_atomic(run_dir / SKIPPED_FILE, {"source": str(plan.dataset.source_path), "skipped": plan.skipped})
    if plan.unedited_source is not None:  # the unedited answers of an earlier run, checked to match
        meta.update(unedited_from=copy_unedited(plan.unedited_source, run_dir, plan.capability is not None))
        LOG.info("unedited answers and probes at 0 edits taken from %s", plan.unedited_source)
    protocol.prepare()
    LOG.info("run folder %s: %s protocol, %d edits of %d known records", run_dir, protocol.name,
             plan.edit_times, plan.split.n_known)
    return RunLoop(protocol, meta, plan.args.checkpoint_every, f"{plan.algorithm.name} {protocol.name}", stop,
                   plan.args.checkpoint_minutes), 1


def open_resumed_run(plan: RunPlan, model, tok, resources: EditResources, argv, run_dir: Path,
                     stop: Optional[StopRequest] = None) -> tuple[RunLoop, int]:
    meta = RunMeta.load(run_dir)
    with bad_input("--continue_from_run", "start a new run (drop --continue_from_run)"):
        if meta.data["edit_stream_case_ids"] != [r["case_id"] for r in plan.split.edit_stream]:
            raise ResumeError(f"{run_dir}: the dataset now gives a different edit stream than when the run started")
    for stale in run_dir.glob(".*.tmp"):  # temporary files of writes a SIGKILL interrupted
        stale.unlink(missing_ok=True)
    templates = context_templates(plan, resources, model, tok)
    if templates != meta.data.get("context_templates"):
        LOG.warning("context templates differ from the interrupted run's; replayed edits may differ")
    protocol = build_protocol(plan, model, tok, resources, run_dir)
    protocol.prepare()  # on the fresh model, before the checkpoint's weights are restored
    loop = RunLoop(protocol, meta, plan.args.checkpoint_every, f"{plan.algorithm.name} {protocol.name}", stop,
                   plan.args.checkpoint_minutes)
    start = loop.restore()
    first_missing = protocol.first_unfinished_step()
    with bad_input("--continue_from_run", "start a new run (drop --continue_from_run, or move this folder away)"):
        if first_missing < start:  # a checkpoint past steps whose files are gone: resuming would leave a hole
            raise ResumeError(f"{run_dir}: the weights checkpoint is after step {start - 1}, but the result files of "
                              f"step {first_missing} are missing (the folder was moved or files were deleted "
                              "while the run was writing it)")
    note_resume(meta, start, first_missing, argv, execution_settings(plan.config()))
    replay = f"replaying steps {start}..{first_missing - 1}, then " if first_missing > start else ""
    LOG.info("resuming %s: checkpoint after step %d; %snew steps from %d", run_dir, start - 1, replay, first_missing)
    return loop, start


def threads_of_last_attempt(meta: dict[str, Any]) -> Any:
    """The torch thread count of the run's latest attempt: its last resume's (recorded since 2026-12-06;
    before, its ``--num_threads``), else the first start's."""
    for entry in reversed(meta.get("resumes") or []):
        if "torch_num_threads" in entry:
            return entry["torch_num_threads"]
        if isinstance((entry.get("execution") or {}).get("num_threads"), int):
            return entry["execution"]["num_threads"]
    return meta.get("torch_num_threads")


def note_resume(meta: RunMeta, start: int, first_missing: int, argv: Any, execution: dict[str, Any]) -> None:
    failure_path = meta.run_dir / FAILURE_FILE
    previous_failure = read_json(failure_path) if failure_path.is_file() else None
    env = environment_record(argv)
    before = threads_of_last_attempt(meta.data)
    if env["torch_num_threads"] != before:
        LOG.warning("torch uses %s threads, the interrupted run used %s: replayed edits may differ in the last bits",
                    env["torch_num_threads"], before)
    entry = {"checkpoint": start - 1, "first_unfinished_step": first_missing, "argv": env["argv"], "pid": os.getpid(),
             "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "previous_status": meta.data.get("status"),
             "previous_failure": previous_failure, "execution": execution,
             "torch_num_threads": env["torch_num_threads"]}
    meta.update(status="running", pid=os.getpid(), host=socket.gethostname(),
                resumes=[*meta.data.get("resumes", []), entry])
    failure_path.unlink(missing_ok=True)
