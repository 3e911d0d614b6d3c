"""UltraEdit's closed-form update of one weight from a turn's keys and gradients.

Upstream (XiaojieGu/UltraEdit 0beb222, ``editor/ultraedit.py`` ``predict_param_shifts``): with K the
turn's keys (rows: every answer token of every edit, in sub-batch order), G their output gradients and
the normaliser of the weight's shape, already updated with the whole turn,

    [k_hat, g_hat] = normalise([k, g]),   v = -lr ||k_hat||^2 g_hat   (one pseudo-value per row),
    Delta = solve(K^T K + I, K^T V)       (in x out; the RAW keys K, a ridge of 1),

and Delta^T is added to an (out, in) weight. No statistics files, no subject, no training. All
float32, as upstream. Upstream reads the gradients of ``n_edits // batch_size`` sub-batches but the
keys of ``ceil(n_edits / batch_size)``; the two agree for its turns (100 edits, sub-batches of 10),
and here every sub-batch is used for both.
"""
from __future__ import annotations

import torch

from ultraedit.normaliser import RunningNormaliser


def pseudo_values(keys: torch.Tensor, grads: torch.Tensor, normaliser: RunningNormaliser, lr: float) -> torch.Tensor:
    """V (rows x out): -lr ||k_hat||^2 g_hat per row, with [k_hat, g_hat] the normalised [k, g]."""
    z_hat = normaliser(torch.cat((keys, grads), -1))
    k_hat, g_hat = z_hat.split([keys.shape[1], grads.shape[1]], -1)
    coeffs = -lr * (k_hat * k_hat).sum(-1).unsqueeze(-1)
    return coeffs * g_hat


def ridge_shift(keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Delta (in x out) = (K^T K + I)^{-1} K^T V."""
    eye = torch.eye(keys.shape[1], dtype=keys.dtype, device=keys.device)
    return torch.linalg.solve(keys.T @ keys + eye, keys.T @ values)
