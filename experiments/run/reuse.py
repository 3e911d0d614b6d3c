"""``--unedited_from RUN``: a new run takes the unedited model's answers, and its probes at 0 edits, from an
earlier run instead of computing them again.

Those files (``unedited_predictions.json``, ``capability_after_edit_0.json``) depend on the model, the
records edited and watched, and the evaluation settings, not on the editing method: six methods on one
2,000-edit stream would each spend about 11 minutes of this CPU on the same answers. The earlier run must
agree on every field of ``MUST_MATCH`` (checked before the run folder is made; a field that differs stops
the command, naming it), and the files are copied as they are; run.json records where from, with each
file's SHA-256. The code that computed them is the earlier run's (its ``git_commit``, in its run.json): reuse
a run made by the same code.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from experiments.protocols.base import UNEDITED_FILE, capability_file_name
from experiments.run.setup import RunPlan
from experiments.store.files import RUN_META_FILE
from util.atomic_files import write_text_atomic

MUST_MATCH = ("model_slug", "dtype", "device", "dataset_file", "dataset_kind", "protocol", "edit_times",
              "edit_stream_case_ids", "orig_retention_case_ids", "wild", "capability", "torch_num_threads")


class ReuseError(ValueError):
    pass


def unedited_fields(plan: RunPlan, model: nn.Module) -> dict[str, Any]:
    """What this run's unedited answers and probes at 0 depend on, as its run.json will record it."""
    settings = json.loads(json.dumps(plan.evaluation_settings()))
    if "capability" in settings:
        settings["capability"].pop("every", None)  # when later checks run: not what the check at 0 computes
    return {
        "model_slug": plan.slug,
        "dtype": plan.args.dtype,
        "device": str(next(model.parameters()).device),
        "dataset_file": str(plan.dataset.source_path),
        "dataset_kind": plan.dataset.kind,
        "protocol": plan.args.protocol,
        "edit_times": plan.edit_times,
        "edit_stream_case_ids": [r["case_id"] for r in plan.split.edit_stream],
        "orig_retention_case_ids": [r["case_id"] for r in plan.split.orig_retention],
        "wild": settings.get("wild"),
        "capability": settings.get("capability"),
        "torch_num_threads": torch.get_num_threads(),
    }


def check_source(source: Path, fields: dict[str, Any]) -> None:
    """The earlier run folder holds the files and agrees on every field (``ReuseError`` naming the first that does not)."""
    meta_path = source / RUN_META_FILE
    if not meta_path.is_file():
        raise ReuseError(f"{source}: no {RUN_META_FILE} (give a run folder, results/<dir_name>/run_NNN)")
    if not (source / UNEDITED_FILE).is_file():
        raise ReuseError(f"{source}: no {UNEDITED_FILE} (that run stopped before its preparation finished)")
    theirs = json.loads(meta_path.read_text())
    if theirs.get("capability") is not None:
        theirs["capability"] = {k: v for k, v in theirs["capability"].items() if k != "every"}
    for name in MUST_MATCH:
        if theirs.get(name) != fields[name]:
            raise ReuseError(f"{source}: its {name} is {_brief(theirs.get(name))}, this run's {_brief(fields[name])}")
    if fields["capability"] is not None and not (source / capability_file_name(0)).is_file():
        raise ReuseError(f"{source}: no {capability_file_name(0)}")


def copy_unedited(source: Path, run_dir: Path, with_capability: bool) -> dict[str, Any]:
    """Copy the files into ``run_dir`` (atomically); what run.json records of it."""
    names = [UNEDITED_FILE] + ([capability_file_name(0)] if with_capability else [])
    copied = {}
    for name in names:
        text = (source / name).read_text()
        write_text_atomic(run_dir / name, text)
        copied[name] = hashlib.sha256(text.encode()).hexdigest()
    return {"run": str(source.resolve()), "files": copied}


def _brief(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."
