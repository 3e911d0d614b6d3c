"""Context templates: short texts sampled from the model itself, prefixed to prompts.

ROME averages keys and optimises values over these prefixes so that an edit generalises beyond
the bare prompt. The reference samples them without a seed, so its runs differ; here sampling
uses its own seeded generator and never touches the global RNG.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from util.scoring import model_device

TOP_K = 5


def start_token_id(tok: PreTrainedTokenizerBase) -> int:
    """The token sampling starts from (ROME: GPT-2's <|endoftext|>): BOS, else EOS."""
    for candidate in (tok.bos_token_id, tok.eos_token_id):
        if candidate is not None:
            return int(candidate)
    raise ValueError("tokenizer has neither a BOS nor an EOS token to start context templates from")


@torch.no_grad()
def sample_texts(
    model: nn.Module, tok: PreTrainedTokenizerBase, n: int, length: int, generator: torch.Generator
) -> list[str]:
    """``n`` texts of ``length`` tokens counting the start token, top-k sampled."""
    device = model_device(model)
    ids = torch.full((n, 1), start_token_id(tok), dtype=torch.long, device=device)
    for _ in range(max(length - 1, 0)):
        mask = torch.ones_like(ids)
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, -1, :].float()
        top = torch.topk(logits, TOP_K, dim=-1)
        probs = torch.softmax(top.values, dim=-1).cpu()
        choice = torch.multinomial(probs, 1, generator=generator).to(device)
        ids = torch.cat([ids, top.indices.gather(1, choice)], dim=1)
    return [tok.decode(row[1:], skip_special_tokens=True) for row in ids.tolist()]


def generate_context_templates(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    length_params: Sequence[Sequence[int]],
    seed: int,
) -> list[str]:
    """``["{}"] + [text + ". {}" ...]`` for each (length, count) in ``length_params``."""
    generator = torch.Generator().manual_seed(seed)
    templates = ["{}"]
    for length, count in length_params:
        for text in sample_texts(model, tok, int(count), int(length), generator):
            templates.append(text.replace("{", " ").replace("}", " ") + ". {}")
    return templates
