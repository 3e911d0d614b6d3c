"""KE as a run's editor: MEND's trained-editor machinery with the KE network."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from baselines.efk.efk_hparams import KEHyperParams
from baselines.mend.editor import TrainedEditor
from editing.editor import apply_with_editor
from editing.resources import EditResources


class KEEditor(TrainedEditor):
    kind = "KE"


def apply_ke_to_model(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    requests: Sequence[dict],
    hparams: KEHyperParams,
    copy: bool = False,
    return_orig_weights: bool = False,
    cache_template: Optional[str] = None,
    resources: Optional[EditResources] = None,
) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """Edit ``model`` with each request in turn through the trained KE network (loaded once);
    returns (model, original weights if asked). ``cache_template`` is accepted for ROME's apply
    signature and unused."""
    return apply_with_editor(KEEditor, model, tok, requests, hparams, copy, return_orig_weights, resources)
