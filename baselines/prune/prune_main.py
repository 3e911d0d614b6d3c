"""PRUNE (Ma et al., ICLR 2025, arXiv 2405.16821): restrain the condition number of the edited matrices.

After n sequential edits each edited matrix is W_n = W_0 + Delta. With Delta = U diag(s) V^T and
sigma_max the largest singular value of the original W_0, every singular value of Delta above
sigma_max is log-shrunk,

    F(s) = log_alpha(s) - log_alpha(sigma_max) + sigma_max   (s > sigma_max; F(s) = s otherwise),

and the model is evaluated with W_0 + U diag(F(s)) V^T (the official code,
mjy1111/PRUNE ``bi_editor_loadw.py``). The restraint is post hoc: the edits themselves are plain
sequential MEMIT, and the restrained matrix is only what the model delivers when evaluated.

Computed as W_n - U_b diag(s_b - F(s_b)) V_b^T over the restrained components b only, which equals
W_0 + U F(S) V^T and leaves a matrix with nothing to restrain exactly as it is. The official code
rebuilds from the first rank(Delta) components and tests s >= sigma_max; AlphaEdit's baseline keeps
all components and tests s > sigma_max: F is continuous at sigma_max and the components past the rank
are zero, so all three agree. AlphaEdit's baseline then adds the restrained delta to the edited
weight (W_0 + Delta + Delta') instead of W_0 (its ``evaluate.py`` :323-327); not copied.
"""
from __future__ import annotations

import logging
import math

import torch
from torch import nn

from util import nethook

LOG = logging.getLogger(__name__)


def restrain(s: torch.Tensor, sigma_max: float, base: float) -> torch.Tensor:
    """F(s): singular values above sigma_max log-shrunk in base ``base``, the others unchanged."""
    log_base = math.log(base)
    shrunk = (torch.log(s.clamp_min(sigma_max)) - math.log(sigma_max)) / log_base + sigma_max
    return torch.where(s > sigma_max, shrunk, s)


def largest_singular_value(weight: torch.Tensor) -> float:
    """sigma_max of a matrix (float64); the same for a weight stored transposed (GPT-2's Conv1D)."""
    return float(torch.linalg.matrix_norm(weight.to(torch.float64), ord=2))


def restrained_weight(
    current: torch.Tensor, original: torch.Tensor, sigma_max: float, base: float
) -> tuple[torch.Tensor, int]:
    """(W_0 + U F(S) V^T of Delta = current - original, how many singular values were restrained).

    When none exceeds sigma_max the current weight itself is returned.
    """
    w = current.to(torch.float64)
    u, s, vh = torch.linalg.svd(w - original.to(device=w.device, dtype=torch.float64), full_matrices=False)
    big = s > sigma_max
    n = int(big.sum())
    if n == 0:
        return current, 0
    excess = s[big] - restrain(s[big], sigma_max, base)
    return (w - (u[:, big] * excess) @ vh[big]).to(current.dtype), n


@torch.no_grad()
def restrain_model(
    model: nn.Module, originals: dict[str, torch.Tensor], sigma_max: dict[str, float], base: float
) -> dict[str, torch.Tensor]:
    """Restrain every named weight in place; returns the unrestrained values of those it changed."""
    saved = {}
    for name, original in originals.items():
        param = nethook.get_parameter(model, name)
        new, n = restrained_weight(param.detach(), original, sigma_max[name], base)
        if n:
            saved[name] = param.detach().clone()
            param.copy_(new)
        LOG.info("PRUNE %s: %d singular value(s) of the accumulated edit above sigma_max %.4g restrained",
                 name, n, sigma_max[name])
    return saved
