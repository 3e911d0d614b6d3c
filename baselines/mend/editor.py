"""The evaluate loop's adapters for the trained editors ('MEND' and 'KE' in experiments/algorithms.py).

Loading an editor (hundreds of MB for the official GPT2-XL/GPT-J files) once per edit would dominate
a run, so each run keeps one executor per editor kind. The run's ``EditResources`` object is what
the loop passes to every edit, so the executors are kept in a weak mapping keyed by it: they live
exactly as long as the run, and a new run (or a new model: see ``EditorExecutor.init_model``)
never sees a stale editor.
"""
from __future__ import annotations

import weakref
from typing import Optional

from torch import nn
from transformers import PreTrainedTokenizerBase

from baselines.mend.editor_hparams import EditorHyperParams
from baselines.mend.executor import EditorExecutor
from experiments.algorithms import EditOutcome
from rome.resources import EditResources
from rome.rome_main import snapshot_weights

_RUN_EXECUTORS: "weakref.WeakKeyDictionary[EditResources, dict[str, EditorExecutor]]" = weakref.WeakKeyDictionary()


def executor_for(resources: EditResources, kind: str) -> EditorExecutor:
    per_run = _RUN_EXECUTORS.setdefault(resources, {})
    if kind not in per_run:
        per_run[kind] = EditorExecutor(kind)
    return per_run[kind]


def editor_edit(kind: str, model: nn.Module, tok: PreTrainedTokenizerBase, request: dict,
                hparams: EditorHyperParams, resources: EditResources) -> EditOutcome:
    executor = executor_for(resources, kind)
    orig: dict = {}
    snapshot_weights(model, hparams.inner_params, orig)
    result = executor.edit(model, tok, request, hparams)
    return EditOutcome(orig, {"editor": kind, "archive": executor.archive, **result.details()})


def mend_edit(model: nn.Module, tok: PreTrainedTokenizerBase, request: dict, hparams: EditorHyperParams,
              resources: EditResources, layer: Optional[int] = None) -> EditOutcome:
    """One MEND edit (``layer`` is ignored: MEND edits every weight in hparams.inner_params)."""
    return editor_edit("MEND", model, tok, request, hparams, resources)
