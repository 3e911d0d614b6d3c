"""Where the fact token sits in a prompt, and what modules see (keys) and emit (values) there.

Every editor reads these: ROME's k*, MEMIT's and AlphaEdit's key matrices, WilKE's keys of every
candidate layer (one partial pass), KN's activations."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from util import nethook
from util.placement import as_working
from util.scoring import model_device, pad_right, pad_token_id, prompt_ids


def fact_token_index(tok: PreTrainedTokenizerBase, template: str, subject: str, strategy: str) -> int:
    """Index, in ``prompt_ids(template.format(subject))``, of the token the edit keys on.

    The subject's last token is found by tokenizing the text up to the end of the subject, so
    the answer respects the tokenizer's own special tokens (Gemma's BOS) and merges.
    """
    if template.count("{}") != 1:
        raise ValueError(f"prompt {template!r} must contain exactly one '{{}}' for the subject")
    filled = template.format(subject)
    if strategy == "last":
        return len(prompt_ids(tok, filled)) - 1
    head = template[: template.index("{}")]
    if strategy == "subject_last":
        return len(prompt_ids(tok, head + subject)) - 1
    if strategy == "subject_first":
        n_head = len(prompt_ids(tok, head)) if head else len(prompt_ids(tok, ""))
        return n_head
    raise ValueError(f"unknown fact_token strategy {strategy!r}")


@torch.no_grad()
def reprs_at_tokens(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    texts: Sequence[str],
    indices: Sequence[int],
    module_names: Sequence[str],
    track: str = "in",
    batch_size: int = 32,
) -> dict[str, torch.Tensor]:
    """Inputs (``track='in'``) or outputs (``'out'``) of each named module at one token per text.

    All modules are read from one forward pass per batch, which stops after the last of them,
    so keys for every candidate layer of a WilKE scan cost a single partial pass.
    Module names must be given in forward order. Each result stays on its module's device, in the
    working precision (float32 for a half-precision model).
    """
    if track not in ("in", "out"):
        raise ValueError(f"track must be 'in' or 'out', got {track!r}")
    device = model_device(model)
    pad = pad_token_id(tok)
    chunks: dict[str, list[torch.Tensor]] = {m: [] for m in module_names}
    for start in range(0, len(texts), batch_size):
        ids_list = [prompt_ids(tok, t) for t in texts[start : start + batch_size]]
        ids, mask = pad_right(ids_list, pad, device)
        rows = torch.arange(len(ids_list), device=device)
        cols = torch.tensor(list(indices[start : start + batch_size]), device=device)
        with nethook.TraceDict(
            model, module_names, retain_input=track == "in", retain_output=track == "out", stop=True
        ) as traces:
            model(input_ids=ids, attention_mask=mask, use_cache=False)
        for m in module_names:
            t = traces[m].input if track == "in" else traces[m].first_output
            chunks[m].append(as_working(t[rows.to(t.device), cols.to(t.device)].detach()))
    return {m: torch.cat(v, dim=0) for m, v in chunks.items()}


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
