"""TIES merging of WISE's shards (EasyEdit ``merge/gta.py``, ``GTA('magnitude', 'sum', normalize=True)``).

Each shard's change d_i = W_i - W is cut to its ``density`` share of largest magnitudes; the elected
sign of an entry is that of sum_i w_i d_i (>= 0: +); the merged change is the weighted mean of the
changes that agree with it, sum_i w_i d_i [sign d_i = elected] / sum_i w_i [sign d_i = elected]
(an entry no change agrees with stays W).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch


def keep_largest(delta: torch.Tensor, density: float) -> torch.Tensor:
    """``delta`` with all but its int(density * n) largest-magnitude entries zeroed."""
    if density >= 1:
        return delta
    k = int(density * delta.numel())
    if k < 1:
        raise ValueError(f"density {density} keeps no entry of a {delta.numel()}-entry change")
    kept = torch.zeros_like(delta).view(-1)
    top = torch.topk(delta.abs().view(-1).float(), k=k).indices
    kept[top] = delta.view(-1)[top]
    return kept.view_as(delta)


def ties_merge(base: torch.Tensor, shards: Sequence[torch.Tensor], weights: Sequence[float], density: float) -> torch.Tensor:
    """The merged matrix base + TIES(shards - base)."""
    deltas = torch.stack([keep_largest(s - base, density) for s in shards])
    w = torch.tensor(list(weights), dtype=deltas.dtype, device=deltas.device).view(-1, *([1] * base.dim()))
    weighted = deltas * w
    elected = (weighted.sum(dim=0) >= 0).to(base.dtype) * 2 - 1
    agree = (deltas.sign() == elected).to(base.dtype)
    divisor = (w * agree).sum(dim=0)
    divisor[divisor == 0] = 1
    return (base + (weighted * agree).sum(dim=0) / divisor).to(base.dtype)
