"""WilKE as an editor: the argmin-LA layer per edit; the roll-back edits that same layer again. And
``apply_wilke_to_model``, WilKE's apply function over this editor."""
from __future__ import annotations

import copy as copy_module
import logging
import time
from typing import Any, Optional, Sequence

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from editing.editor import EditOutcome, LocateEditEditor, apply_with_editor, snapshot_weights
from editing.requests import normalise_request, swapped_request
from editing.resources import EditResources
from rome.rome_main import apply_update, execute_rome
from util.architectures import num_layers
from wilke.wilke_hparams import WilKEHyperParams
from wilke.wilke_main import WilKEEdit, WilKEResult, choose_layer, rank_one_rule, weight_norm

LOG = logging.getLogger(__name__)


class WilKEEditor(LocateEditEditor):
    def __init__(self, model: nn.Module, tok: PreTrainedTokenizerBase, hparams: WilKEHyperParams, resources: Any,
                 pinned_layer: Optional[int] = None):
        super().__init__(model, tok, hparams, resources)
        n_layers = num_layers(model)
        if hparams.scanning_ceiling > n_layers:
            raise ValueError(f"scanning_ceiling {hparams.scanning_ceiling} exceeds the model's {n_layers} layers")
        if pinned_layer is not None and not 0 <= pinned_layer < n_layers:
            raise ValueError(f"edited_layer {pinned_layer} is outside the model's layers 0..{n_layers - 1}")
        self.pinned_layer = pinned_layer  # edit this layer, scanning nothing (None: scan)
        self.edits: list[WilKEEdit] = []  # what each edit did, in order

    def edit(self, requests: Sequence[dict], layer: Optional[int] = None) -> EditOutcome:
        """Scan the candidate layers and edit the chosen one (or edit ``layer``, scanning nothing)."""
        request = normalise_request(self._one_request(requests))
        layer = self.pinned_layer if layer is None else layer
        start = time.perf_counter()
        if layer is None:
            update, la = choose_layer(self.model, self.tok, request, self.hparams, self.resources)
            scan = self.hparams.scan
        else:
            update, la, scan = execute_rome(self.model, self.tok, request, self.hparams, self.resources, layer=layer), {}, "pinned"
        w_norm = weight_norm(self.model, update.module_name)
        weights: dict[str, torch.Tensor] = {}
        snapshot_weights(self.model, [update.weight_name], weights)
        apply_update(self.model, update)
        edit = WilKEEdit(request.get("case_id"), update.layer, la, update.norm, w_norm, time.perf_counter() - start,
                         scan, rank_one_rule(self.hparams))
        self.edits.append(edit)
        # a pinned layer is WilKE's roll-back under the roll-back protocol, which logs itself below
        (LOG.info if scan != "pinned" else LOG.debug)("WilKE edit of case %s at layer %d (LA %.4f, %s update, %s scan)",
                                                      edit.case_id, edit.layer, update.norm / w_norm, edit.rule, scan)
        details = {
            "layer": edit.layer,
            "scan": edit.scan,
            "layer_adaptability": {str(k): v for k, v in sorted(edit.layer_adaptability.items())},
            "chosen_la": edit.update_norm / edit.weight_norm,
            "value_norms": update.value_norms(),
        }
        return EditOutcome(weights, details)

    def rollback(self, requests: Sequence[dict], outcome: EditOutcome) -> EditOutcome:
        """The paper's roll-back: the swapped request at the layer the edit chose."""
        undone = self.edit([swapped_request(r) for r in requests], layer=outcome.details["layer"])
        LOG.info("WilKE roll-back of case %s at layer %d (the layer its edit chose)", requests[0].get("case_id"),
                 outcome.details["layer"])
        return undone


def apply_wilke_to_model(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    requests: Sequence[dict],
    hparams: WilKEHyperParams,
    edited_layer: Optional[int] = None,
    copy: bool = False,
    return_orig_weights: bool = False,
    cache_template: Optional[str] = None,
    resources: Optional[EditResources] = None,
) -> tuple[nn.Module, dict[str, torch.Tensor], WilKEResult]:
    """Edit ``model`` with each request in turn at its wise layer (or at ``edited_layer``).

    Returns (model, original weights of the changed modules if asked, WilKEResult).
    ``cache_template`` is accepted for signature compatibility with ROME/MEMIT and must be None:
    a lifelong scan depends on every earlier edit, so cached updates would be wrong.
    """
    if cache_template is not None:
        raise ValueError("WilKE does not cache updates: each scan depends on the current model")
    if copy:
        model = copy_module.deepcopy(model)
    editor = WilKEEditor(model, tok, hparams, resources, pinned_layer=edited_layer)
    model, weights = apply_with_editor(WilKEEditor, model, tok, requests, hparams, False, return_orig_weights,
                                       editor=editor)
    return model, weights, WilKEResult(editor.edits)
