"""ROME's left vector (its ``compute_u``): u = C^{-1} k* / ||C^{-1} k*||, with k* the template-averaged key.

k* itself is ``editing.representations.template_keys``: MEMIT, WilKE and KN read keys the same way.
"""
from __future__ import annotations

import torch

from editing.covariance import FactorisedCovariance


def compute_u(k_star: torch.Tensor, covariance: FactorisedCovariance | None) -> torch.Tensor:
    """u = C^{-1} k* / ||C^{-1} k*|| (or k*/||k*|| without the covariance adjustment)."""
    u = covariance.solve(k_star) if covariance is not None else k_star
    return u / u.norm()
