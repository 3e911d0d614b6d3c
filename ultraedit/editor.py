"""UltraEdit as a run's editor: a turn of edits per ``edit`` call; the lifelong statistics are its state.

The statistics start empty when the editor is built and grow with every turn, never reset; the run
saves them with every weight checkpoint (``state_dict``) and restores them on resume
(``load_state_dict``), so a resumed run normalises exactly as the killed one would have. (EasyEdit's
port rebuilds them on every call; upstream keeps one normaliser object for the whole run, as here.)
The protocol's ``--num_edits`` is upstream's turn (``dataset.n_edits``, 100 in its runs);
``sub_batch_size`` cuts the turn into forward/backward passes (``dataset.batch_size``, 10).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from editing.editor import Editor, EditOutcome
from ultraedit.normaliser import NormaliserBank
from ultraedit.update import add_shifts, execute_ultraedit
from util import nethook
from util.architectures import weight_out_in
from util.hparams import HParamsError
from util.placement import module_device


def edited_weight_shape(model: nn.Module, name: str) -> tuple[int, int]:
    """(in, out) of a module with a 2-D weight (Linear or GPT-2's Conv1D); an error naming the field if none."""
    try:
        module = nethook.get_module(model, name)
    except (LookupError, AttributeError):
        raise HParamsError(f"field 'edit_modules': module {name!r} not found in the model") from None
    weight = getattr(module, "weight", None)
    if weight is None or weight.dim() != 2:
        raise HParamsError(f"field 'edit_modules': module {name!r} has no 2-D weight to edit")
    out_features, in_features = weight_out_in(module).shape
    return int(in_features), int(out_features)


class UltraEditEditor(Editor):
    batch_edits = True

    def __init__(self, model: nn.Module, tok: PreTrainedTokenizerBase, hparams: Any, resources: Any):
        super().__init__(model, tok, hparams, resources)  # no statistics, no templates: resources are unused
        names = hparams.module_names
        shapes = {name: edited_weight_shape(model, name) for name in names}
        devices = {name: module_device(nethook.get_module(model, name)) for name in names}
        self.normalisers = NormaliserBank(shapes, devices)

    def edit(self, requests: Sequence[dict]) -> EditOutcome:
        update = execute_ultraedit(self.model, self.tok, list(requests), self.hparams, self.normalisers)
        weights: dict[str, torch.Tensor] = {}
        add_shifts(self.model, update, weights)
        rows = {key: int(norm.n) for key, norm in self.normalisers.normalisers.items()}
        return EditOutcome(weights, {**update.details(), "normaliser_rows": rows})

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.normalisers.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.normalisers.load_state_dict(state)
