"""RECT (Gu et al. 2024, arXiv 2401.04700): MEMIT's update with only its principal entries kept.

"Relative change" delta_ij = |Delta_ij / (W_ij + eps)|, with W the weight the update is added to (the
current one, holding earlier edits). In each updated matrix the entries with the top k% relative
change keep their value and the rest of the update is dropped: one threshold per matrix, not per row.
As in AlphaEdit's baseline (``memit_rect_main.py``), MEMIT's deltas are computed unchanged (each
layer's full update is in place while the next layer's keys and residuals are read) and sparsified
only when added.

Where this differs from that baseline: it keeps every entry whose relative change is at least the
k-th smallest (``kthvalue``, k = floor(N (100 - keep) / 100)), which is N - k + 1 entries plus ties;
here exactly N - k are kept (ties at the threshold broken by position), so k = 40 keeps 40% of the
entries, not 40% plus one. The relative change is computed in float64 (upstream adds eps to the
float32 weight, where it vanishes unless |W| is tiny: the two can rank differently only entries whose
weight is within a few eps of zero).
"""
from __future__ import annotations

import logging
from typing import Optional

import torch
from torch import nn

from editing.editor import snapshot_weights
from memit.memit_main import MEMITUpdate
from util import nethook
from util.architectures import update_to_weight_shape

LOG = logging.getLogger(__name__)


def kept_count(n_entries: int, keep_percent: float) -> int:
    """How many of ``n_entries`` RECT keeps: all but floor(N (100 - k) / 100), upstream's kthvalue index."""
    return n_entries - int(n_entries * (100 - keep_percent) / 100)


def top_relative_change_mask(
    update: torch.Tensor, weight: torch.Tensor, keep_percent: float, eps: float
) -> torch.Tensor:
    """The entries RECT keeps: exactly ``kept_count`` of them, those of largest |update / (weight + eps)|."""
    change = (update.to(torch.float64) / (weight.to(torch.float64) + eps)).abs().flatten()
    n = change.numel()
    keep = kept_count(n, keep_percent)
    if keep >= n:
        return torch.ones_like(update, dtype=torch.bool)
    threshold = change.kthvalue(n - keep).values  # the largest change that is dropped
    mask = change > threshold
    short = keep - int(mask.sum())
    if short > 0:  # ties at the threshold: the first ones by position
        ties = (change == threshold).nonzero().flatten()
        mask[ties[:short]] = True
    return mask.view_as(update)


@torch.no_grad()
def apply_sparse_deltas(
    model: nn.Module,
    update: MEMITUpdate,
    keep_percent: float,
    eps: float,
    weights_copy: Optional[dict[str, torch.Tensor]] = None,
) -> dict[str, float]:
    """Add the kept entries of each layer's delta; returns the share kept per weight."""
    kept = {}
    for delta in update.deltas.values():
        module = nethook.get_module(model, delta.module_name)
        if weights_copy is not None:
            snapshot_weights(model, [delta.weight_name], weights_copy)
        weight = nethook.get_parameter(model, delta.weight_name)  # the storage of an offloaded weight too
        full = update_to_weight_shape(delta.delta_out_in(), module).to(weight.device)
        mask = top_relative_change_mask(full, weight, keep_percent, eps)
        weight.add_((full * mask).to(weight.dtype))
        kept[delta.weight_name] = float(mask.sum()) / mask.numel()
        LOG.info("RECT layer %d: kept %d of %d entries of the update", delta.layer, int(mask.sum()), mask.numel())
    return kept
