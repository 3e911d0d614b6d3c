"""Context templates: short texts sampled from the model itself, prefixed to prompts.

ROME averages keys and optimises values over these prefixes so that an edit generalises beyond
the bare prompt. ROME's code samples them from the start token alone; MEMIT's (and AlphaEdit's)
samples one continuation after each of the prompts "The", "Therefore", "Because", "I", "You",
keeping the prompt in the text. ``length`` counts every token of the sampled sequence, the start
token or prompt included, as the references' ``max_out_len`` does. The references sample without a
seed, so their runs differ; here sampling uses its own seeded generator and never touches the
global RNG.
"""
from __future__ import annotations

import dataclasses
import unicodedata
from typing import Optional, Sequence

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


MEMIT_PROMPTS = ("The", "Therefore", "Because", "I", "You")


@torch.no_grad()
def sample_texts(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    n: int,
    length: int,
    generator: torch.Generator,
    prompt: str | None = None,
    top_k: int = TOP_K,
) -> list[str]:
    """``n`` texts of ``length`` tokens, top-k sampled: after the start token (decoded without it),
    or after ``prompt`` (tokenized with the tokenizer's special tokens, decoded with the prompt).
    ``top_k=1`` is greedy decoding."""
    device = model_device(model)
    prefix = [start_token_id(tok)] if prompt is None else list(tok(prompt)["input_ids"])
    ids = torch.tensor([prefix] * n, dtype=torch.long, device=device)
    for _ in range(max(length - len(prefix), 0)):
        mask = torch.ones_like(ids)
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, -1, :].float()
        top = torch.topk(logits, top_k, dim=-1)
        probs = torch.softmax(top.values, dim=-1).cpu()
        choice = torch.multinomial(probs, 1, generator=generator).to(device)
        ids = torch.cat([ids, top.indices.gather(1, choice)], dim=1)
    rows = ids.tolist()
    if prompt is None:  # ROME's templates, as this harness has always made them (see README, Differences)
        return [tok.decode(row[1:], skip_special_tokens=True) for row in rows]
    # what MEMIT's generate_fast does to every sampled text
    return [unicodedata.normalize("NFKD", tok.decode(row, skip_special_tokens=True)).replace("\n\n", " ") for row in rows]


@dataclasses.dataclass(frozen=True)
class TemplateStyle:
    """How a method's templates are made beyond (length, count): ROME's and MEMIT's by default.

    WISE (EasyEdit's ``get_context_templates``) decodes greedily (``top_k=1``), counts ``length`` in
    new tokens after the prompt (``max_new_tokens``) and joins text and prompt with a space."""

    top_k: int = TOP_K
    separator: str = ". "
    new_tokens: bool = False  # length counts only the sampled tokens, not the prompt's


@dataclasses.dataclass(frozen=True)
class TemplateSpec:
    """How a method's context templates are sampled (read from its hparams): ``[[length, n], ...]``
    groups, the sampling seed, the prompts to continue (None: ROME's start token alone), the style."""

    length_params: tuple[tuple[int, int], ...]
    seed: int = 0
    prompts: Optional[tuple[str, ...]] = None
    style: TemplateStyle = TemplateStyle()


def generate_context_templates(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    length_params: Sequence[Sequence[int]],
    seed: int,
    prompts: Sequence[str] | None = None,
    style: TemplateStyle = TemplateStyle(),
) -> list[str]:
    """``["{}"] + [text + separator + "{}" ...]`` for each (length, count) in ``length_params``: ``count``
    samples from the start token (ROME), or ``count // len(prompts)`` after each prompt (MEMIT, WISE)."""
    generator = torch.Generator().manual_seed(seed)
    templates = ["{}"]
    for length, count in length_params:
        if prompts:
            texts = []
            for p in prompts:
                total = int(length) + (len(tok(p)["input_ids"]) if style.new_tokens else 0)
                texts += sample_texts(model, tok, int(count) // len(prompts), total, generator, p, style.top_k)
        else:
            texts = sample_texts(model, tok, int(count), int(length), generator, top_k=style.top_k)
        templates += [text.replace("{", " ").replace("}", " ") + style.separator + "{}" for text in texts]
    return templates
