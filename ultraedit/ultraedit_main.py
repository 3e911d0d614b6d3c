"""UltraEdit (Gu et al., TMLR 2026, arXiv 2505.14679): lifelong editing without training, subjects or
statistics files: each turn's update is a ridge solve from the edits' hidden states and gradients,
normalised by running statistics that grow over the whole run (ultraedit/update.py).

``apply_ultraedit_to_model`` is a thin call of the editor: pass the same ``editor`` to every call of
a sequence so that its statistics carry over (without one, the call is the first turn of a run).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from editing.editor import apply_with_editor
from ultraedit.editor import UltraEditEditor
from ultraedit.ultraedit_hparams import UltraEditHyperParams


def apply_ultraedit_to_model(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    requests: Sequence[dict],
    hparams: UltraEditHyperParams,
    copy: bool = False,
    return_orig_weights: bool = False,
    editor: Optional[UltraEditEditor] = None,
) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """Edit ``model`` with ``requests`` as one UltraEdit turn; returns (model, original weights if asked)."""
    return apply_with_editor(UltraEditEditor, model, tok, requests, hparams, copy, return_orig_weights, editor=editor)
