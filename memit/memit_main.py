"""MEMIT (Meng et al. 2023): a batch of edits spread over a range of MLP output projections.

For each request, z = the residual stream at the output of the last block of the range, at the
fact token, optimised so that the target is predicted (ROME's value optimisation, injected at the
block output, clamp factor from hparams). Then, layer by layer in increasing order, with K the
template-averaged keys of every request at that layer and R the remaining gap between z and the
current block output spread over the layers still to edit:

    Delta_l = R K^T (lambda C_l + K K^T)^{-1},   lambda = mom2_update_weight,

solved in float64, applied before the next layer's keys and residuals are read. ``execute_memit``
leaves the model as it found it and returns the deltas; ``apply_memit_to_model`` adds them.

Every layer's update is Delta = R A^T with A = solve(K) the "adjusted keys"; MEMIT's solve is
(lambda C + K K^T)^{-1} K. A method that keeps MEMIT's z, keys and residual spread and changes only
that solve (AlphaEdit's null-space projection) passes its own ``key_solver`` to ``execute_memit``.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from editing.covariance import FactorisedCovariance
from editing.editor import snapshot_weights
from editing.norm_anchor import block_values
from editing.representations import fact_token_index, reprs_at_tokens
from editing.requests import normalise_request
from editing.resources import EditResources, default_resources
from editing.value_optimisation import optimise_in_batches
from editing.value_problems import ValueTask, build_value_problem
from memit.compute_ks import compute_keys, template_groups
from memit.memit_hparams import MEMITHyperParams
from util import nethook
from util.architectures import update_to_weight_shape
from util.atomic_files import atomic_path
from util.placement import stored_tensor
from util.scoring import model_device

LOG = logging.getLogger(__name__)


@dataclasses.dataclass
class LayerDelta:
    """One layer's MEMIT update Delta = resid adj_keys^T, with the least-squares problem it solves."""

    layer: int
    module_name: str
    keys: torch.Tensor  # K, in_features x n (float64)
    resid: torch.Tensor  # R for this layer (already divided by the layers left), out_features x n (float64)
    adj_keys: torch.Tensor  # (lambda C + K K^T)^{-1} K, in_features x n (float64)
    z_error: float  # mean ||z - current z|| over the requests, before this layer's update

    @property
    def weight_name(self) -> str:
        return f"{self.module_name}.weight"

    def delta_out_in(self) -> torch.Tensor:
        return self.resid @ self.adj_keys.T

    @property
    def norm(self) -> float:
        return float(self.delta_out_in().norm())


# (module name, keys K: in_features x n) -> adjusted keys A (in_features x n, float64); Delta = R A^T
KeySolver = Callable[[str, torch.Tensor], torch.Tensor]


@dataclasses.dataclass
class MEMITUpdate:
    """What ``execute_memit`` computed: the per-layer deltas (by weight name, in layer order) and the zs."""

    deltas: dict[str, LayerDelta]
    zs: torch.Tensor  # hidden x n
    z_steps: list[int]  # optimisation passes per request (0 when loaded from the cache)
    z_losses: list[Optional[float]]  # final loss per request (None when loaded from the cache)
    value_norms: list[Optional[dict[str, float]]]  # editing.norm_anchor.value_norms (None from the cache)


def _z_cache_path(cache_template: Optional[str], layer: int, clamp: float, case_id) -> Optional[Path]:
    if cache_template is None or case_id is None:
        return None
    return Path(cache_template.format(layer=layer, clamp_norm_factor=clamp, case_id=case_id))


def compute_zs(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    requests: Sequence[dict],
    hparams: MEMITHyperParams,
    resources: EditResources,
    cache_template: Optional[str] = None,
) -> tuple[torch.Tensor, list[int], list[Optional[float]], list[Optional[dict[str, float]]]]:
    """z for every request (hidden x n): v* of ROME's optimisation injected at the last block's output;
    with each request's passes, final loss and value norms.

    The requests' optimisations run in batches of ``hparams.v_batch_tokens`` padded prompt positions
    (editing.value_optimisation: each z as the one-at-a-time loop of the reference finds it)."""
    z_layer = hparams.z_layer
    block = hparams.layer_module_tmp.format(z_layer)
    zs: list[Optional[torch.Tensor]] = [None] * len(requests)
    steps: list[int] = [0] * len(requests)
    losses: list[Optional[float]] = [None] * len(requests)
    paths = [_z_cache_path(cache_template, z_layer, hparams.clamp_norm_factor, r.get("case_id")) for r in requests]
    for i, path in enumerate(paths):
        if path is not None and path.exists():
            with np.load(path) as data:
                zs[i] = torch.from_numpy(data["z"]).to(model_device(model))
    todo = [i for i, z in enumerate(zs) if z is None]
    templates = resources.context_templates(model, tok, hparams.template_spec)
    tasks = [ValueTask(build_value_problem(tok, requests[i], templates, hparams.fact_token, model_device(model)),
                       block, z_layer, hparams.clamp_norm_factor) for i in todo]
    values = optimise_in_batches(model, tasks, hparams, resources.forward_checked, hparams.v_batch_tokens)
    # NAS (value_norm_anchor): each z's MLP share rescaled to the reference norm; the norms either way
    reference = resources.norm_reference(model, tok, hparams, z_layer) if hparams.value_norm_anchor else None
    values, value_norms = block_values(model, [t.problem for t in tasks], values,
                                       hparams.mlp_module_tmp.format(z_layer), reference)
    norms: list[Optional[dict[str, float]]] = [None] * len(requests)
    for i, value, norm in zip(todo, values, value_norms):
        zs[i], steps[i], losses[i], norms[i] = value.v_star, value.steps, value.losses[-1], norm
        if paths[i] is not None:
            _save_z(paths[i], value.v_star)
    return torch.stack(zs, dim=1), steps, losses, norms


def _save_z(path: Path, z: torch.Tensor) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, z=z.detach().cpu().numpy())


def current_zs(
    model: nn.Module, tok: PreTrainedTokenizerBase, requests: Sequence[dict], block: str, fact_token: str
) -> torch.Tensor:
    """The block's output at the fact token of each bare prompt (hidden x n), on the current model."""
    texts = [r["prompt"].format(r["subject"]) for r in requests]
    idxs = [fact_token_index(tok, r["prompt"], r["subject"], fact_token) for r in requests]
    return reprs_at_tokens(model, tok, texts, idxs, [block], track="out")[block].T


def adjusted_keys(keys: torch.Tensor, covariance: Optional[FactorisedCovariance], lam: float) -> torch.Tensor:
    """(lambda C + K K^T)^{-1} K in float64; without a covariance (mom2_adjustment off) C = I."""
    k = keys.to(torch.float64)
    if covariance is not None:
        if covariance.matrix is None:
            raise ValueError("MEMIT needs the covariance matrix itself: request it with keep_matrix=True")
        c = covariance.matrix.to(device=k.device, dtype=torch.float64)
    else:
        c = torch.eye(k.shape[0], dtype=torch.float64, device=k.device)
    return torch.linalg.solve(lam * c + k @ k.T, k)


def memit_key_solver(covariances: dict[str, FactorisedCovariance], lam: float) -> KeySolver:
    """MEMIT's solve at each layer: (lambda C + K K^T)^{-1} K (C = I for a layer without statistics)."""
    return lambda module_name, keys: adjusted_keys(keys, covariances.get(module_name), lam)


def layer_delta(
    layer: int,
    module_name: str,
    keys: torch.Tensor,
    targets: torch.Tensor,
    layers_left: int,
    solve: KeySolver,
) -> LayerDelta:
    """The update at one layer: the remaining residual ``targets`` spread over ``layers_left`` layers."""
    resid = targets.to(device=keys.device, dtype=torch.float64) / layers_left  # on the layer's device
    adj = solve(module_name, keys)
    z_error = float(targets.norm(dim=0).mean())
    return LayerDelta(layer, module_name, keys.to(torch.float64), resid, adj, z_error)


@torch.no_grad()
def add_delta(model: nn.Module, delta: LayerDelta) -> None:
    module = nethook.get_module(model, delta.module_name)
    weight = stored_tensor(module, "weight")  # offloaded weights: their storage (util/placement.py)
    upd = delta.delta_out_in().to(device=weight.device, dtype=weight.dtype)
    weight.add_(update_to_weight_shape(upd, module))


@torch.no_grad()
def _restore(model: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    for name, value in saved.items():
        nethook.get_parameter(model, name).copy_(value)


def execute_memit(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    requests: Sequence[dict],
    hparams: MEMITHyperParams,
    resources: Optional[EditResources] = None,
    cache_template: Optional[str] = None,
    key_solver: Optional[KeySolver] = None,
) -> MEMITUpdate:
    """The MEMIT deltas for a batch of requests; the model is left unchanged.

    Each layer's update is applied to the model while the next layer's keys and residuals are
    read (they depend on it), and every touched weight is restored before returning.
    ``key_solver`` replaces MEMIT's solve (its covariances are then not loaded).
    """
    requests = [normalise_request(r) for r in requests]
    resources = resources or default_resources(model)
    templates = resources.context_templates(model, tok, hparams.template_spec)
    groups = template_groups(templates, hparams.context_template_length_params, hparams.context_template_prompts)
    names = [hparams.rewrite_module_tmp.format(l) for l in hparams.layers]
    if key_solver is None:
        covs = resources.covariances(model, tok, hparams, names, keep_matrix=True) if hparams.mom2_adjustment else {}
        key_solver = memit_key_solver(covs, hparams.mom2_update_weight)
    zs, z_steps, z_losses, value_norms = compute_zs(model, tok, requests, hparams, resources, cache_template)
    block = hparams.layer_module_tmp.format(hparams.z_layer)
    saved: dict[str, torch.Tensor] = {}
    deltas: dict[str, LayerDelta] = {}
    try:
        for i, (layer, name) in enumerate(zip(hparams.layers, names)):
            keys = compute_keys(model, tok, requests, groups, name, hparams.fact_token)
            targets = zs - current_zs(model, tok, requests, block, hparams.fact_token)
            delta = layer_delta(layer, name, keys, targets, len(hparams.layers) - i, key_solver)
            LOG.info("MEMIT layer %d: %d key(s), z error %.4f, ||Delta|| %.4f", layer, keys.shape[1], delta.z_error, delta.norm)
            snapshot_weights(model, [delta.weight_name], saved)
            add_delta(model, delta)
            deltas[delta.weight_name] = delta
    finally:
        _restore(model, saved)
    return MEMITUpdate(deltas, zs, z_steps, z_losses, value_norms)


def apply_deltas(model: nn.Module, update: MEMITUpdate, weights_copy: Optional[dict[str, torch.Tensor]] = None) -> None:
    """Add every layer's delta; keep the original of each weight in ``weights_copy`` when given."""
    for delta in update.deltas.values():
        if weights_copy is not None:
            snapshot_weights(model, [delta.weight_name], weights_copy)
        add_delta(model, delta)
