"""KN in the lifelong evaluate loop: one request per call."""
from __future__ import annotations

import collections
from typing import Optional

from torch import nn
from transformers import PreTrainedTokenizerBase

from baselines.kn.kn_hparams import KNHyperParams
from baselines.kn.kn_main import apply_update, execute_kn
from experiments.algorithms import EditOutcome
from rome.resources import EditResources


def kn_edit(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    request: dict,
    hparams: KNHyperParams,
    resources: EditResources,
    layer: Optional[int] = None,
) -> EditOutcome:
    """Locate and edit the request's knowledge neurons. ``layer`` is unused (KN finds its own)."""
    update = execute_kn(model, tok, request, hparams, resources)
    weights: dict = {}
    apply_update(model, update, weights)
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
