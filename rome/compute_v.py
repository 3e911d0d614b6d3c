"""ROME's value side: v* at the output of W_l, and the right vector r = (v* - v) / (k . u).

The optimisation itself is ``editing.value_optimisation.optimise_value`` (MEMIT's z is the same
optimisation injected at a block's output).
"""
from __future__ import annotations

import torch
from torch import nn

from editing.hparams import LocateEditHyperParams
from editing.value_optimisation import PreparedRequest, ValueResult, optimise_value


def compute_v(model: nn.Module, prepared: PreparedRequest, hparams: LocateEditHyperParams, layer: int) -> ValueResult:
    """v* = v0 + delta with delta added to the output of W_layer at the fact token of every prompt."""
    module_name = hparams.rewrite_module_tmp.format(layer)
    if prepared.forward is None:
        raise ValueError("this prepared request has no forward strategy (it was prepared for a batched optimisation)")
    return optimise_value(model, prepared.problem, prepared.forward, module_name, layer, hparams)


def right_vector(v_star: torch.Tensor, cur_key: torch.Tensor, cur_value: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """ROME step 4: r = (v* - v) / (k . u), so that (W + r u^T) k = v*."""
    return (v_star - cur_value) / torch.dot(cur_key, u)
