"""The key side of a rank-one edit: k* (template-averaged key) and ROME's left vector u."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from rome.repr_tools import fact_token_index, reprs_at_tokens
from rome.resources import FactorisedCovariance


def template_prompts(request: dict, context_templates: Sequence[str]) -> list[str]:
    """Each context template wrapped around the request's prompt, subject still as '{}'."""
    return [ctx.format(request["prompt"]) for ctx in context_templates]


def keys_and_values(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    request: dict,
    templates: Sequence[str],
    module_names: Sequence[str],
    fact_token: str,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Mean input (key) and mean output (value) of each module at the fact token over ``templates``.

    One partial forward pass per batch serves every module, so a WilKE scan's keys for all
    candidate layers cost one pass. Module names must be in forward order.
    """
    subject = request["subject"]
    texts = [t.format(subject) for t in templates]
    idxs = [fact_token_index(tok, t, subject, fact_token) for t in templates]
    k = reprs_at_tokens(model, tok, texts, idxs, module_names, track="in")
    v = reprs_at_tokens(model, tok, texts, idxs, module_names, track="out")
    return {m: k[m].mean(0) for m in module_names}, {m: v[m].mean(0) for m in module_names}


def template_keys(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    request: dict,
    context_templates: Sequence[str],
    module_names: Sequence[str],
    fact_token: str,
) -> dict[str, torch.Tensor]:
    """k* = mean key at the fact token over every context template, for each module."""
    subject = request["subject"]
    templates = template_prompts(request, context_templates)
    texts = [t.format(subject) for t in templates]
    idxs = [fact_token_index(tok, t, subject, fact_token) for t in templates]
    reprs = reprs_at_tokens(model, tok, texts, idxs, module_names, track="in")
    return {m: reprs[m].mean(0) for m in module_names}


def left_vector(k_star: torch.Tensor, covariance: FactorisedCovariance | None) -> torch.Tensor:
    """u = C^{-1} k* / ||C^{-1} k*|| (or k*/||k*|| without the covariance adjustment)."""
    u = covariance.solve(k_star) if covariance is not None else k_star
    return u / u.norm()
