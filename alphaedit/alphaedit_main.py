"""AlphaEdit (Fang et al., ICLR 2025): MEMIT's update projected onto the null space of preserved knowledge.

z, keys and the residual spread over the layers are MEMIT's (``memit.execute_memit``); only the
solve at each layer differs. With P the layer's null-space projector (alphaedit/projection.py), K the
batch's keys, R the layer's share of the residual and K_p K_p^T the sum of k k^T over the keys of
every earlier edit, the update solves

    (P (K_p K_p^T + K K^T) + L2 I) X = P K R^T,    Delta = X^T,

as upstream's ``AlphaEdit_main.py`` does (the paper's Delta = R K^T P (K_p K_p^T P + K K^T P + L2 I)^{-1}).
Here X = A R^T with A = (P (K_p K_p^T + K K^T) + L2 I)^{-1} P K, so Delta = R A^T is MEMIT's
``LayerDelta`` with other adjusted keys; it is laid out as the weight (transposed for GPT-2's Conv1D)
by ``util.architectures.update_to_weight_shape``. From the system, X = P (K R^T - (...) X) / L2, so
Delta P = Delta and Delta C0 ~ 0: preserved keys' outputs do not move.

After each batch, K K^T of every edited layer is added to K_p K_p^T (upstream's ``cache_c``). Upstream
recomputes the keys on the edited model for that; they equal the keys of the layer's solve (a layer's
input depends only on the layers below it, already edited when its keys were read), so those are
reused. Upstream solves in float32 and keeps ``cache_c`` in float32 on the CPU; here both are float64
on the edited layer's device (the sum of thousands of outer products, and a system whose condition
grows with it).
"""
from __future__ import annotations

import logging
from typing import Optional, Sequence

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from alphaedit.alphaedit_hparams import AlphaEditHyperParams
from alphaedit.projection import NullSpace
from editing.resources import EditResources
from memit.key_moments import KeyMoments
from memit.memit_main import KeySolver, MEMITUpdate, execute_memit

LOG = logging.getLogger(__name__)



def alphaedit_key_solver(null_spaces: dict[str, NullSpace], moments: KeyMoments, l2: float) -> KeySolver:
    """A = (P (K_p K_p^T + K K^T) + L2 I)^{-1} P K per layer, so that Delta = R A^T (float64 LU solve)."""

    def solve(module_name: str, keys: torch.Tensor) -> torch.Tensor:
        p = null_spaces[module_name].projector
        k = keys.to(device=p.device, dtype=torch.float64)
        prior = moments.get(module_name, k.shape[0], p.device)
        eye = torch.eye(k.shape[0], dtype=torch.float64, device=p.device)
        return torch.linalg.solve(p @ (prior + k @ k.T) + l2 * eye, p @ k)

    return solve


def execute_alphaedit(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    requests: Sequence[dict],
    hparams: AlphaEditHyperParams,
    null_spaces: dict[str, NullSpace],
    moments: KeyMoments,
    resources: Optional[EditResources] = None,
    cache_template: Optional[str] = None,
) -> MEMITUpdate:
    """The AlphaEdit deltas for a batch (the model is left unchanged; ``moments`` is not updated)."""
    solver = alphaedit_key_solver(null_spaces, moments, hparams.L2)
    return execute_memit(model, tok, requests, hparams, resources, cache_template, key_solver=solver)
