"""ENCORE (Gupta et al. 2025, arXiv 2502.01636): MEMIT with most-probable early stopping and a
Frobenius-norm penalty, for long sequences of edits without model degradation.

z, keys and the residual spread over the layers are MEMIT's (``memit.execute_memit``); the z
optimisation stops early by MPES (``mpes_prob_cutoff``, editing/value_optimisation.py). Only the solve
at each layer differs: with C0 = E[k k^T] (the layer's statistics), K the batch's keys, R the layer's
share of the residual and K_p K_p^T the sum of k k^T over the keys of every earlier batch,

    Delta = R A^T,   A = (lambda_p C0 + alpha I + K_p K_p^T + K K^T)^{-1} K,

lambda_p = ``mom2_update_weight``, alpha = ``update_norm_lambda`` (the weight of ||Delta||_F^2 in
the objective), K_p K_p^T only with ``add_prev_edits``. This is upstream's ``encore_main.py``: ``cov =
mom2_update_weight * C0 + update_norm_lambda * I + SEQ_CACHE[layer]``, then ``solve(cov + K K^T, K)``
in float64. After each batch, K K^T of every edited layer is added to K_p K_p^T (upstream's
``SEQ_CACHE``, which also grows when ``add_prev_edits`` is off, unused); the keys are those of the
layer's solve, as upstream's are. Upstream keeps SEQ_CACHE in a module-level dict that lives as long
as the process; here it is the editor's state (AlphaEdit's ``KeyMoments``), saved with the weight
checkpoints, so a resumed run solves exactly as the uninterrupted one. Upstream adds it only when its
run is ``--sequential``; the editor here always edits the model the previous batch left.

With ``mom2_adjustment`` off, C0 = I, as MEMIT here (upstream ENCORE reads the statistics regardless;
every ENCORE file sets it on).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from editing.covariance import FactorisedCovariance
from editing.resources import EditResources, default_resources
from encore.encore_hparams import ENCOREHyperParams
from memit.key_moments import KeyMoments
from memit.memit_main import KeySolver, MEMITUpdate, execute_memit


def encore_key_solver(
    covariances: dict[str, FactorisedCovariance], moments: KeyMoments, hparams: ENCOREHyperParams
) -> KeySolver:
    """A = (lambda_p C0 + alpha I [+ K_p K_p^T] + K K^T)^{-1} K per layer (float64 LU solve)."""

    def solve(module_name: str, keys: torch.Tensor) -> torch.Tensor:
        k = keys.to(torch.float64)
        system = k @ k.T
        covariance = covariances.get(module_name)
        if covariance is None:
            system.diagonal().add_(hparams.mom2_update_weight)
        else:
            system.add_(covariance.matrix.to(system), alpha=hparams.mom2_update_weight)
        system.diagonal().add_(hparams.update_norm_lambda)
        if hparams.add_prev_edits:
            system.add_(moments.get(module_name, k.shape[0], k.device))
        return torch.linalg.solve(system, k)

    return solve


def execute_encore(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    requests: Sequence[dict],
    hparams: ENCOREHyperParams,
    moments: KeyMoments,
    resources: Optional[EditResources] = None,
    cache_template: Optional[str] = None,
) -> MEMITUpdate:
    """The ENCORE deltas for a batch (the model is left unchanged; ``moments`` is not updated)."""
    resources = resources or default_resources(model)
    names = [hparams.rewrite_module_tmp.format(l) for l in hparams.layers]
    covs = resources.covariances(model, tok, hparams, names, keep_matrix=True) if hparams.mom2_adjustment else {}
    solver = encore_key_solver(covs, moments, hparams)
    return execute_memit(model, tok, requests, hparams, resources, cache_template, key_solver=solver)
