"""The evaluate loop's dispatch table: exact algorithm names to one adapter each.

An adapter edits the model with one request and returns the original weights of whatever it
changed plus JSON-ready details (for WilKE: the chosen layer and every LA). The loop measures
update norms from those weights, so every algorithm's per-edit file shows a toxicity flash.
Adding a method is one package plus one entry here; imports are lazy so that running ROME never
imports MEND.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, Optional

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from rome.resources import EditResources


@dataclasses.dataclass
class EditOutcome:
    orig_weights: dict[str, torch.Tensor]
    details: dict[str, Any]
    # what a roll-back of this edit must reuse (WilKE: the same layer)
    rollback_layer: Optional[int] = None


EditFn = Callable[[nn.Module, PreTrainedTokenizerBase, dict, Any, EditResources, Optional[int]], EditOutcome]


@dataclasses.dataclass(frozen=True)
class Algorithm:
    name: str
    hparams_class: str  # "module:Class"
    edit_fn: str  # "module:function" with the EditFn signature

    def load_hparams_class(self) -> type:
        return _load(self.hparams_class)

    def edit(self, *args: Any) -> EditOutcome:
        return _load(self.edit_fn)(*args)


def _load(ref: str) -> Any:
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


def rome_edit(model, tok, request, hparams, resources, layer=None) -> EditOutcome:
    from rome.rome_main import apply_rome_to_model

    _, weights = apply_rome_to_model(model, tok, [request], hparams, return_orig_weights=True, resources=resources)
    return EditOutcome(weights, {"layer": hparams.layers[0]})


def wilke_edit(model, tok, request, hparams, resources, layer=None) -> EditOutcome:
    from wilke.wilke_main import apply_wilke_to_model

    _, weights, result = apply_wilke_to_model(
        model, tok, [request], hparams, edited_layer=layer, return_orig_weights=True, resources=resources
    )
    edit = result.edits[0]
    details = {
        "layer": edit.layer,
        "scan": edit.scan,
        "layer_adaptability": {str(k): v for k, v in sorted(edit.layer_adaptability.items())},
        "chosen_la": edit.update_norm / edit.weight_norm,
    }
    return EditOutcome(weights, details, rollback_layer=edit.layer)


ALGORITHMS: dict[str, Algorithm] = {
    "ROME": Algorithm("ROME", "rome.rome_hparams:ROMEHyperParams", "experiments.algorithms:rome_edit"),
    "WilKE": Algorithm("WilKE", "wilke.wilke_hparams:WilKEHyperParams", "experiments.algorithms:wilke_edit"),
    "MEND": Algorithm("MEND", "baselines.mend.mend_hparams:MENDHyperParams", "baselines.mend.adapter:mend_edit"),
    "KE": Algorithm("KE", "baselines.efk.efk_hparams:KEHyperParams", "baselines.efk.adapter:ke_edit"),
    "MEMIT": Algorithm("MEMIT", "memit.memit_hparams:MEMITHyperParams", "memit.adapter:memit_edit"),
    "FT": Algorithm("FT", "baselines.ft.ft_hparams:FTHyperParams", "baselines.ft.adapter:ft_edit"),
    "KN": Algorithm("KN", "baselines.kn.kn_hparams:KNHyperParams", "baselines.kn.adapter:kn_edit"),
}


def get_algorithm(name: str) -> Algorithm:
    if name not in ALGORITHMS:
        raise KeyError(f"unknown --alg_name {name!r}; choose one of: {', '.join(ALGORITHMS)}")
    return ALGORITHMS[name]


@torch.no_grad()
def update_norms(model: nn.Module, orig_weights: dict[str, torch.Tensor]) -> dict[str, Any]:
    """||W_new - W_old||_F per changed weight, their total, and the total relative to ||W_old||."""
    params = dict(model.named_parameters())
    per = {}
    total_sq, base_sq = 0.0, 0.0
    for name, old in orig_weights.items():
        diff = float((params[name].detach().to(old.device) - old).norm())
        per[name] = diff
        total_sq += diff**2
        base_sq += float(old.norm()) ** 2
    total = total_sq**0.5
    return {"update_norm": total, "relative_update_norm": total / base_sq**0.5 if base_sq else 0.0, "per_weight": per}
