"""ROME as an editor: one rank-one update per request, always at hparams.layers[0]; and
``apply_rome_to_model``, ROME's apply contract over this editor."""
from __future__ import annotations

import logging
from typing import Any, Optional, Sequence

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from editing.editor import EditOutcome, LocateEditEditor, apply_with_editor, snapshot_weights
from editing.resources import EditResources
from rome.rome_hparams import ROMEHyperParams
from rome.rome_main import apply_update, cached_update_path, execute_rome, load_update, save_update

LOG = logging.getLogger(__name__)


class ROMEEditor(LocateEditEditor):
    def __init__(self, model: nn.Module, tok: PreTrainedTokenizerBase, hparams: ROMEHyperParams, resources: Any,
                 cache_template: Optional[str] = None):
        super().__init__(model, tok, hparams, resources)
        # stores each update and reuses it when the file exists: only sound when every edit starts from
        # the same model (one edit per fresh model), never in a lifelong run
        self.cache_template = cache_template

    def edit(self, requests: Sequence[dict]) -> EditOutcome:
        request = self._one_request(requests)
        layer = self.hparams.layers[0]
        path = cached_update_path(self.cache_template, layer, request.get("case_id"))
        if path is not None and path.exists():
            update = load_update(path, self.model)
        else:
            update = execute_rome(self.model, self.tok, request, self.hparams, self.resources)
            if path is not None:
                save_update(path, update)
        weights: dict[str, torch.Tensor] = {}
        snapshot_weights(self.model, [update.weight_name], weights)
        apply_update(self.model, update)
        LOG.info("ROME edit at layer %d, ||Delta||=%.4f", update.layer, update.norm)
        return EditOutcome(weights, {"layer": layer, "value_norms": update.value_norms()})


def apply_rome_to_model(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    requests: Sequence[dict],
    hparams: ROMEHyperParams,
    copy: bool = False,
    return_orig_weights: bool = False,
    cache_template: Optional[str] = None,
    resources: Optional[EditResources] = None,
) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """Edit ``model`` with each request in turn; returns (model, original weights if asked).
    ``cache_template`` (e.g. "cache/rome_{layer}_{case_id}.npz"): see ``ROMEEditor``."""
    return apply_with_editor(ROMEEditor, model, tok, requests, hparams, copy, return_orig_weights, resources,
                             cache_template=cache_template)
