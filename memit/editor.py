"""MEMIT in the lifelong evaluate loop: one request per call, on the fixed layer range."""
from __future__ import annotations

from typing import Optional

from torch import nn
from transformers import PreTrainedTokenizerBase

from experiments.algorithms import EditOutcome
from memit.memit_hparams import MEMITHyperParams
from memit.memit_main import apply_deltas, execute_memit
from rome.resources import EditResources


def memit_edit(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    request: dict,
    hparams: MEMITHyperParams,
    resources: EditResources,
    layer: Optional[int] = None,
) -> EditOutcome:
    """Edit with one request. ``layer`` is ignored: MEMIT always edits hparams.layers (so does its roll-back)."""
    update = execute_memit(model, tok, [request], hparams, resources)
    weights: dict = {}
    apply_deltas(model, update, weights)
    details = {
        "layers": list(hparams.layers),
        "z_steps": update.z_steps[0],
        "z_final_loss": update.z_losses[0],
        "layer_update_norms": {str(d.layer): d.norm for d in update.deltas.values()},
        "z_errors": {str(d.layer): d.z_error for d in update.deltas.values()},
    }
    return EditOutcome(weights, details)
