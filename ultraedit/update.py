"""One UltraEdit turn: read keys and gradients sub-batch by sub-batch, merge them into the lifelong
statistics, solve every edited weight's shift, add the shifts.

As upstream (XiaojieGu/UltraEdit 0beb222, ``editor/base.py`` ``sequential_valid``): every sub-batch of
the turn is read from the model as it was before the turn (gradients on the model with all earlier
turns' edits); the statistics take each sub-batch in turn, module by module in the hparams' order; the
shifts are solved with the statistics after the whole turn and added together.
``execute_ultraedit`` leaves the weights unchanged but updates the statistics it is given.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from editing.editor import snapshot_weights
from editing.requests import normalise_request
from ultraedit.features import keys_and_gradients, turn_sub_batches
from ultraedit.normaliser import NormaliserBank
from ultraedit.solve import pseudo_values, ridge_shift
from ultraedit.ultraedit_hparams import UltraEditHyperParams
from util import nethook
from util.architectures import update_to_weight_shape
from util.placement import stored_tensor
from util.scoring import model_device


@dataclasses.dataclass
class UltraEditUpdate:
    """Every edited module's shift Delta (in x out, float32), and what the turn read."""

    shifts: dict[str, torch.Tensor]
    rows: int  # answer tokens of the turn (rows of K)
    sub_batches: int

    def details(self) -> dict:
        return {"rows": self.rows, "sub_batches": self.sub_batches,
                "shift_norms": {name: float(s.norm()) for name, s in self.shifts.items()}}


def execute_ultraedit(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    requests: Sequence[dict],
    hparams: UltraEditHyperParams,
    normalisers: NormaliserBank,
) -> UltraEditUpdate:
    """The shifts of one turn of ``requests``; the weights are not changed, ``normalisers`` are updated."""
    names = hparams.module_names
    batches = turn_sub_batches(tok, [normalise_request(r) for r in requests], hparams.sub_batch_size,
                               model_device(model))
    keys: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    grads: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    for batch in batches:
        read = keys_and_gradients(model, batch, names)
        for name in names:
            k, g = read[name]
            normalisers[name].update(torch.cat((k, g), -1))
            keys[name].append(k)
            grads[name].append(g)
    shifts = {}
    for name in names:
        k, g = torch.cat(keys[name]), torch.cat(grads[name])
        shifts[name] = ridge_shift(k, pseudo_values(k, g, normalisers[name], hparams.lr))
    return UltraEditUpdate(shifts, rows=int(k.shape[0]), sub_batches=len(batches))


@torch.no_grad()
def add_shifts(model: nn.Module, update: UltraEditUpdate, weights_copy: Optional[dict[str, torch.Tensor]] = None) -> None:
    """W += Delta^T laid out as each weight (cast to its dtype); originals kept in ``weights_copy`` when given."""
    for name, shift in update.shifts.items():
        module = nethook.get_module(model, name)
        if weights_copy is not None:
            snapshot_weights(model, [f"{name}.weight"], weights_copy)
        weight = stored_tensor(module, "weight")
        weight.add_(update_to_weight_shape(shift.T, module).to(device=weight.device, dtype=weight.dtype))
