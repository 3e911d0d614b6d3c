"""FT / FT-L in the lifelong evaluate loop: one request per call."""
from __future__ import annotations

from typing import Optional

from torch import nn
from transformers import PreTrainedTokenizerBase

from baselines.ft.ft_hparams import FTHyperParams
from baselines.ft.ft_main import apply_deltas, execute_ft
from experiments.algorithms import EditOutcome
from rome.resources import EditResources


def ft_edit(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    request: dict,
    hparams: FTHyperParams,
    resources: EditResources,
    layer: Optional[int] = None,
) -> EditOutcome:
    """Fine-tune on one request. ``resources`` and ``layer`` are unused: FT trains hparams.layers."""
    update = execute_ft(model, tok, [request], hparams)
    weights: dict = {}
    apply_deltas(model, update, weights)
    details = {
        "layers": list(hparams.layers),
        "norm_constraint": hparams.norm_constraint,
        "epochs": update.epochs,
        "final_loss": update.final_loss,
        "max_abs_change": max(float(d.abs().max()) for d in update.deltas.values()),
    }
    return EditOutcome(weights, details)
