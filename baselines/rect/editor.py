"""RECT as a run's editor: MEMIT's batch update, only the top k% of each matrix's entries added."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from baselines.rect.rect_hparams import RECTHyperParams
from baselines.rect.rect_main import apply_sparse_deltas
from editing.editor import EditOutcome, apply_with_editor
from editing.resources import EditResources
from memit.editor import MEMITEditor
from memit.memit_main import execute_memit


class RECTEditor(MEMITEditor):
    batch_edits = True

    def edit(self, requests: Sequence[dict]) -> EditOutcome:
        update = execute_memit(self.model, self.tok, list(requests), self.hparams, self.resources, self.cache_template)
        weights: dict = {}
        kept = apply_sparse_deltas(self.model, update, self.hparams.keep_percent, self.hparams.epsilon, weights)
        shares = {str(d.layer): kept[d.weight_name] for d in update.deltas.values()}
        details = {**self.details(update), "kept_share": shares}
        return EditOutcome(weights, details)


def apply_rect_to_model(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    requests: Sequence[dict],
    hparams: RECTHyperParams,
    copy: bool = False,
    return_orig_weights: bool = False,
    cache_template: Optional[str] = None,
    resources: Optional[EditResources] = None,
) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """Edit ``model`` with all ``requests`` as one MEMIT batch, sparsified; returns (model, original
    weights if asked)."""
    return apply_with_editor(RECTEditor, model, tok, requests, hparams, copy, return_orig_weights, resources,
                             cache_template=cache_template)
