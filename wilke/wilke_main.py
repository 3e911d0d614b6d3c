"""WilKE (Hu et al. 2024): for each edit, the layer whose ROME update is relatively smallest.

For every candidate layer l < scanning_ceiling the ROME update Delta_l is computed on the current
model, scored by LA_l = ||Delta_l||_F / ||W_l||_F, and the argmin's update is applied. Updates are
computed without touching the weights, so "restore after each candidate" holds by construction,
and the chosen update is the one the scan computed (the reference recomputes it).

Fast mode shares the layer-independent work across candidates: templates and prompts are built
once, keys for every candidate come from one partial forward pass, and the candidates' v*
optimisations run as one batch (editing.value_optimisation, at most ``v_batch_tokens`` padded prompt
positions each; 0: one candidate after another): each candidate's rows enter the forward pass at its
own layer, from the residual captured there, and get its own delta, so every v* is the one the
per-candidate loop finds, within float rounding. Reference mode recomputes everything per candidate
and recomputes the chosen update after the scan, as the paper's code does.

The rank-one rule is ROME's hparams field ``consistent_keys``, which WilKE inherits. Off (every
shipped WilKE file but the ``*_rrome.json`` ones) it is the paper's algorithm: each candidate's update
solves with the bare prompt's key and value. On, it is r-ROME's (Gupta et al. 2024): the solve uses
k*, the key averaged over the context templates (the very vector u is made from), and the mean value
over the same prompts, so (W + Delta) k* = v*. Both scans hand the flag to ``rome_update_at``: the fast
one with each candidate's k* from its shared pass, the reference one through ``execute_rome``. So the
LA that is scored, the update that is applied and the roll-back at the pinned layer all follow the
same rule (``WilKEEdit.rule`` says which).
"""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Optional, Sequence

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from editing.representations import template_keys
from editing.resources import EditResources
from editing.value_optimisation import PreparedRequest, optimise_in_batches, prepare_request
from editing.value_problems import ValueTask
from rome.rome_main import RankOneUpdate, execute_rome, rome_update_at
from util import nethook
from util.architectures import weight_out_in
from wilke.wilke_hparams import WilKEHyperParams

LOG = logging.getLogger(__name__)


@dataclasses.dataclass
class WilKEEdit:
    """What one WilKE edit did: the layer, every scanned layer's LA, the applied update's norm."""

    case_id: object
    layer: int
    layer_adaptability: dict[int, float]  # LA_l for every scanned layer (empty when the layer was given)
    update_norm: float
    weight_norm: float
    seconds: float
    scan: str  # "exact", "approximate" or "pinned"
    rule: str = "ROME"  # the rank-one update scored and applied: "ROME", or "r-ROME" with consistent_keys


@dataclasses.dataclass
class WilKEResult:
    edits: list[WilKEEdit] = dataclasses.field(default_factory=list)

    @property
    def chosen_layers(self) -> list[int]:
        return [e.layer for e in self.edits]


def weight_norm(model: nn.Module, module_name: str) -> float:
    return float(weight_out_in(nethook.get_module(model, module_name)).float().norm())


def rank_one_rule(hparams: WilKEHyperParams) -> str:
    """Which rank-one update every candidate gets: r-ROME's (``consistent_keys``) or ROME's."""
    return "r-ROME" if hparams.consistent_keys else "ROME"


def layer_adaptability(model: nn.Module, update: RankOneUpdate) -> float:
    """LA = ||Delta||_F / ||W||_F for the weight the update would change; infinite where the NAS norm
    anchor refused the edit (its zero update would otherwise look like the best layer)."""
    if update.skipped_by_norm_anchor:
        return math.inf
    return update.norm / weight_norm(model, update.module_name)


@dataclasses.dataclass
class ScanInputs:
    """The layer-independent part of a fast scan: prompts, captured forward, keys of every candidate."""

    prepared: PreparedRequest
    keys: dict[str, torch.Tensor]


def prepare_scan(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    request: dict,
    hparams: WilKEHyperParams,
    layers: Sequence[int],
    resources: EditResources,
) -> ScanInputs:
    prepared = prepare_request(model, tok, request, hparams, resources, first_layer=None)
    names = [hparams.rewrite_module_tmp.format(l) for l in sorted(layers)]
    keys = template_keys(model, tok, request, prepared.context_templates, names, hparams.fact_token)
    if hparams.mom2_adjustment:
        resources.covariances(model, tok, hparams, names)
    return ScanInputs(prepared, keys)


def scan_layers(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    request: dict,
    hparams: WilKEHyperParams,
    layers: Sequence[int],
    resources: EditResources,
    inputs: Optional[ScanInputs] = None,
) -> dict[int, RankOneUpdate]:
    """The ROME update at each candidate layer on the current model (the model is not changed).

    ``inputs`` (fast mode; from ``prepare_scan`` over these layers or more) lets several scans of
    one request share their layer-independent work; the reference recomputes everything.
    """
    if hparams.implementation == "reference":
        return {
            l: execute_rome(model, tok, request, hparams.replace(layers=[l]), resources, layer=l) for l in layers
        }
    inputs = inputs or prepare_scan(model, tok, request, hparams, layers, resources)
    layers = sorted(layers)
    names = [hparams.rewrite_module_tmp.format(l) for l in layers]
    tasks = [ValueTask(inputs.prepared.problem, name, l, hparams.clamp_norm_factor) for l, name in zip(layers, names)]
    values = optimise_in_batches(model, tasks, hparams, resources.forward_checked, hparams.v_batch_tokens)
    return {
        l: rome_update_at(model, tok, inputs.prepared, hparams, l, resources, k_star=inputs.keys[name], value=value)
        for l, name, value in zip(layers, names, values)
    }


def choose_layer(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    request: dict,
    hparams: WilKEHyperParams,
    resources: EditResources,
) -> tuple[RankOneUpdate, dict[int, float]]:
    """The argmin-LA update among the candidates, and every scored layer's LA."""
    candidates = hparams.candidate_layers
    inputs = None
    if hparams.scan == "approximate":
        if hparams.implementation != "reference":
            inputs = prepare_scan(model, tok, request, hparams, candidates, resources)
        rough = scan_layers(model, tok, request, hparams.rough, candidates, resources, inputs)
        rough_la = {l: layer_adaptability(model, u) for l, u in rough.items()}
        candidates = sorted(rough_la, key=rough_la.get)[: hparams.approx_top_k]
    updates = scan_layers(model, tok, request, hparams, candidates, resources, inputs)
    la = {l: layer_adaptability(model, u) for l, u in updates.items()}
    best = min(la, key=la.get)
    if hparams.scan == "approximate":
        la = {**rough_la, **la}
    chosen = updates[best]
    if hparams.implementation == "reference":
        # The paper's code edits the chosen layer again from scratch after the scan.
        chosen = execute_rome(model, tok, request, hparams.replace(layers=[best]), resources, layer=best)
    return chosen, la
