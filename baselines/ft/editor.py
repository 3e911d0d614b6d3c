"""FT / FT-L as a run's editor: fine-tune hparams.layers on a batch of requests."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from baselines.ft.ft_hparams import FTHyperParams
from baselines.ft.ft_main import apply_deltas, execute_ft
from editing.editor import Editor, EditOutcome, apply_with_editor
from editing.resources import EditResources


class FTEditor(Editor):
    batch_edits = True

    def edit(self, requests: Sequence[dict]) -> EditOutcome:
        update = execute_ft(self.model, self.tok, list(requests), self.hparams)
        weights: dict = {}
        apply_deltas(self.model, update, weights)
        details = {
            "layers": list(self.hparams.layers),
            "norm_constraint": self.hparams.norm_constraint,
            "epochs": update.epochs,
            "final_loss": update.final_loss,
            "max_abs_change": max(float(d.abs().max()) for d in update.deltas.values()),
        }
        return EditOutcome(weights, details)


def apply_ft_to_model(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    requests: Sequence[dict],
    hparams: FTHyperParams,
    copy: bool = False,
    return_orig_weights: bool = False,
    cache_template: Optional[str] = None,
    resources: Optional[EditResources] = None,
) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """Edit ``model`` with all ``requests`` together; returns (model, original weights if
    asked). ``cache_template`` is accepted for ROME's apply signature and unused."""
    return apply_with_editor(FTEditor, model, tok, requests, hparams, copy, return_orig_weights, resources)
