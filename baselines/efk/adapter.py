"""The evaluate loop's KE adapter (``--alg_name KE``); see baselines/mend/adapter.py."""
from __future__ import annotations

from typing import Optional

from torch import nn
from transformers import PreTrainedTokenizerBase

from baselines.mend.adapter import editor_edit
from baselines.mend.editor_hparams import EditorHyperParams
from experiments.algorithms import EditOutcome
from rome.resources import EditResources


def ke_edit(model: nn.Module, tok: PreTrainedTokenizerBase, request: dict, hparams: EditorHyperParams,
            resources: EditResources, layer: Optional[int] = None) -> EditOutcome:
    """One KE edit (``layer`` is ignored: KE edits every weight in hparams.inner_params)."""
    return editor_edit("KE", model, tok, request, hparams, resources)
