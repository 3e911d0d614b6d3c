"""KN as a run's editor: locate the request's knowledge neurons and edit them."""
from __future__ import annotations

import collections
from typing import Optional, Sequence

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from baselines.kn.kn_hparams import KNHyperParams
from baselines.kn.kn_main import apply_update, execute_kn
from editing.editor import Editor, EditOutcome, apply_with_editor
from editing.resources import EditResources


class KNEditor(Editor):
    def edit(self, requests: Sequence[dict]) -> EditOutcome:
        update = execute_kn(self.model, self.tok, self._one_request(requests), self.hparams, self.resources)
        weights: dict = {}
        apply_update(self.model, update, weights)
        details = {
            "n_neurons": len(update.neurons),
            "neurons": [list(n) for n in update.neurons],
            "neurons_per_layer": {str(l): c for l, c in sorted(collections.Counter(l for l, _ in update.neurons).items())},
            "n_prompts": update.n_prompts,
            "coarse_per_prompt": update.n_coarse,
            "old_token": update.old_token,
            "new_token": update.new_token,
        }
        return EditOutcome(weights, details)


def apply_kn_to_model(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    requests: Sequence[dict],
    hparams: KNHyperParams,
    copy: bool = False,
    return_orig_weights: bool = False,
    cache_template: Optional[str] = None,
    resources: Optional[EditResources] = None,
) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """Edit ``model`` with each request in turn; returns (model, original weights if
    asked). ``cache_template`` is accepted for ROME's apply signature and unused."""
    return apply_with_editor(KNEditor, model, tok, requests, hparams, copy, return_orig_weights, resources)
