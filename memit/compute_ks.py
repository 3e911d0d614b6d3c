"""MEMIT's keys: per request, the key at the fact token averaged over context templates.

MEMIT's reference averages within each template group first (the bare prompt ``"{}"`` is one
group, each ``context_template_length_params`` entry another), then averages the group means, so
the bare prompt weighs as much as all generated prefixes of one length together. The key
extraction itself is ROME's ``template_keys``.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from editing.representations import template_keys


def template_groups(
    templates: Sequence[str], length_params: Sequence[Sequence[int]], prompts: Optional[Sequence[str]] = None
) -> list[list[str]]:
    """Split ``["{}"] + generated`` back into the groups it was made from (with ``prompts``, each
    length gave ``count // len(prompts)`` samples per prompt)."""
    groups = [list(templates[:1])]
    start = 1
    for _length, count in length_params:
        size = (int(count) // len(prompts)) * len(prompts) if prompts else int(count)
        groups.append(list(templates[start : start + size]))
        start += size
    if start != len(templates):
        raise ValueError(f"{len(templates)} context templates do not match length params {list(length_params)}")
    return [g for g in groups if g]


def compute_keys(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    requests: Sequence[dict],
    groups: Sequence[Sequence[str]],
    module_name: str,
    fact_token: str,
) -> torch.Tensor:
    """K: one column per request (in_features x n), the mean of the per-group mean keys."""
    columns = []
    for request in requests:
        means = [template_keys(model, tok, request, group, [module_name], fact_token)[module_name] for group in groups]
        columns.append(torch.stack(means).mean(0))
    return torch.stack(columns, dim=1)
