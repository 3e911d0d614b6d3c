"""ENCORE's apply function: a thin call of the editor (encore/editor.py), whose state carries the keys
of earlier batches from one call to the next; the method's math is in encore/update.py."""
from __future__ import annotations

import copy as copy_module
from typing import Optional, Sequence

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from encore.editor import ENCOREEditor
from encore.encore_hparams import ENCOREHyperParams


def apply_encore_to_model(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    requests: Sequence[dict],
    hparams: ENCOREHyperParams,
    copy: bool = False,
    return_orig_weights: bool = False,
    editor: Optional[ENCOREEditor] = None,
) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """Edit ``model`` with ``requests`` as one ENCORE batch; returns (model, original weights if asked).

    A thin call of the editor: pass the same ``editor`` to every call of a sequence so that K_p K_p^T
    carries over (without one, the batch is edited as the first of its run).
    """
    if copy:
        model = copy_module.deepcopy(model)
    if editor is None:
        editor = ENCOREEditor(model, tok, hparams, None)
    elif editor.model is not model:
        raise ValueError("the editor edits another model than the one given (copy=True with an editor?)")
    outcome = editor.edit(requests)
    return model, outcome.orig_weights if return_orig_weights else {}
