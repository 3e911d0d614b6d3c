"""ROME: one rank-one update of an MLP output projection per request.

``editing.value_optimisation.prepare_request`` does the layer-independent work once (context
templates, tokenized prompts, the forward strategy with block inputs captured from ``first_layer``
up); ``rome_update_at`` then computes the update at any layer. ROME uses one layer; WilKE calls ``rome_update_at`` for every
candidate layer of the same prepared request. ``execute_rome`` leaves the model unchanged;
``apply_update`` adds one (``rome/editor.py``: the editor, and ``apply_rome_to_model`` over it).
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from editing.norm_anchor import ROME_SKIP_FACTOR, anchored_rome_value, value_norms
from editing.representations import keys_and_values, template_keys, template_prompts
from editing.requests import normalise_request
from editing.resources import EditResources, default_resources
from editing.value_optimisation import PreparedRequest, ValueResult, prepare_request
from rome.compute_u import compute_u
from rome.compute_v import compute_v, right_vector
from rome.rome_hparams import ROMEHyperParams
from util import nethook
from util.architectures import update_to_weight_shape
from util.atomic_files import atomic_path
from util.placement import stored_tensor
from util.scoring import model_device

LOG = logging.getLogger(__name__)


@dataclasses.dataclass
class RankOneUpdate:
    """Delta W = r u^T at one layer, with what produced it."""

    layer: int
    module_name: str
    u: torch.Tensor  # unit left vector (key space)
    r: torch.Tensor  # right vector (value space)
    key: torch.Tensor  # the key the solve used (bare prompt, or k* with consistent_keys)
    v_star: torch.Tensor
    steps: int
    final_loss: float
    # v*'s optimisation (the delta each pass ran with), the value at ``key`` before the edit and NAS's
    # reference norm (None: off): what the update would have been after fewer passes follows from them
    # (experiments/bench/agreement.py)
    value: Optional[ValueResult] = None
    cur_value: Optional[torch.Tensor] = None
    norm_reference: Optional[float] = None

    @property
    def weight_name(self) -> str:
        return f"{self.module_name}.weight"

    def value_norms(self) -> list[dict[str, float]]:
        """[||v0||, ||v*|| as optimised, ||v*|| written] (editing.norm_anchor.value_norms; v0 the module's
        output at the first prompt's fact token); [] for an update loaded from a cache."""
        if self.value is None:
            return []
        return [value_norms(self.value.v0, self.value.v_star, self.v_star)]

    def delta_out_in(self) -> torch.Tensor:
        return torch.outer(self.r, self.u)

    @property
    def norm(self) -> float:
        """||Delta||_F = ||r|| ||u||."""
        return float(self.r.norm() * self.u.norm())

    @property
    def skipped_by_norm_anchor(self) -> bool:
        """NAS skipped this edit (||v*|| above 5 r): the update is zero because the edit was refused,
        not because it was small."""
        return (self.norm_reference is not None and self.value is not None
                and float(self.value.v_star.norm()) > ROME_SKIP_FACTOR * self.norm_reference)


def rome_update_at(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    prepared: PreparedRequest,
    hparams: ROMEHyperParams,
    layer: int,
    resources: EditResources,
    k_star: Optional[torch.Tensor] = None,
    value: Optional[ValueResult] = None,
) -> RankOneUpdate:
    """The ROME update at ``layer`` for the current model; the model is left unchanged.

    ``value`` is v*'s optimisation when it was already run (a WilKE scan optimises every candidate's
    in one batch); otherwise it runs here with ``prepared.forward``."""
    request = prepared.request
    module_name = hparams.rewrite_module_tmp.format(layer)
    if k_star is None:
        k_star = template_keys(model, tok, request, prepared.context_templates, [module_name], hparams.fact_token)[module_name]
    cov = None
    if hparams.mom2_adjustment:
        cov = resources.covariances(model, tok, hparams, [module_name])[module_name]
    u = compute_u(k_star, cov)
    if value is None:
        value = compute_v(model, prepared, hparams, layer)
    if hparams.consistent_keys:
        templates = template_prompts(request, prepared.context_templates)
    else:
        templates = [request["prompt"]]
    keys, values = keys_and_values(model, tok, request, templates, [module_name], hparams.fact_token)
    key, cur_value = keys[module_name], values[module_name]
    reference = resources.norm_reference(model, tok, hparams, layer) if hparams.value_norm_anchor else None
    v_star = anchored_rome_value(value.v_star, cur_value, reference)  # NAS; v* itself when it is off
    r = right_vector(v_star, key, cur_value, u)
    return RankOneUpdate(layer, module_name, u, r, key, v_star, value.steps, value.losses[-1], value, cur_value, reference)


def execute_rome(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    request: dict,
    hparams: ROMEHyperParams,
    resources: Optional[EditResources] = None,
    layer: Optional[int] = None,
) -> RankOneUpdate:
    """The update ROME would make for one request (at ``layer``, default hparams.layers[0])."""
    if len(hparams.layers) != 1 and layer is None:
        raise ValueError(f"ROME edits one layer; hparams.layers is {list(hparams.layers)}")
    layer = hparams.layers[0] if layer is None else layer
    resources = resources or default_resources(model)
    request = normalise_request(request)
    prepared = prepare_request(model, tok, request, hparams, resources, first_layer=layer)
    return rome_update_at(model, tok, prepared, hparams, layer, resources)


@torch.no_grad()
def apply_update(model: nn.Module, update: RankOneUpdate) -> None:
    module = nethook.get_module(model, update.module_name)
    weight = stored_tensor(module, "weight")
    delta = update.delta_out_in().to(weight.device, weight.dtype)  # the one cast of a half-precision edit
    weight.add_(update_to_weight_shape(delta, module))


def cached_update_path(cache_template: Optional[str], layer: int, case_id) -> Optional[Path]:
    """Where ``cache_template`` (e.g. "cache/rome_{layer}_{case_id}.npz") keeps a request's update."""
    if cache_template is None or case_id is None:
        return None
    return Path(cache_template.format(layer=layer, case_id=case_id))


def save_update(path: Path, update: RankOneUpdate) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.savez(
            handle,
            layer=update.layer,
            module_name=update.module_name,
            u=update.u.cpu().numpy(),
            r=update.r.cpu().numpy(),
            key=update.key.cpu().numpy(),
            v_star=update.v_star.cpu().numpy(),
            steps=update.steps,
            final_loss=update.final_loss,
        )


def load_update(path: Path, model: nn.Module) -> RankOneUpdate:
    device = model_device(model)
    with np.load(path) as data:
        t = lambda k: torch.from_numpy(data[k]).to(device)  # noqa: E731
        return RankOneUpdate(
            int(data["layer"]), str(data["module_name"]), t("u"), t("r"), t("key"), t("v_star"),
            int(data["steps"]), float(data["final_loss"]),
        )
