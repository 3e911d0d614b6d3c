"""Greedy generation that stops where an answer ends: batched, left-padded, with the KV cache.

What WILD evaluation (Yang et al. 2025, "The Mirage of Model Editing") needs from a model: the
answer it gives to a prompt on its own, with nothing of the target fed in. Mirage's code
(``test_prediction_acc_real``) runs Hugging Face ``generate`` one prompt at a time, greedy, with
``stop_strings=[".", "\\n", eos]``; here the same stopping rule runs on a batch:

- each row stops at the first generated token that is an end-of-sequence id (the tokenizer's and
  the model's ``generation_config``'s), or after which the generated text ends with one of
  ``stop_strings`` (as ``StopStringCriteria`` decides: the text so far *ends* with the string, so
  a period inside a token such as ``".\""`` does not stop it), or at ``max_new_tokens``;
- prompts are left-padded, with the attention mask and explicit position ids (each row counts
  positions from its first real token), so a row's tokens see exactly what they would see alone;
- the cache is kept between steps, and rows that have stopped are dropped from the batch (and from
  the cache), so a long answer does not make the others pay for its extra steps.

The result equals one-prompt-at-a-time greedy generation (tests/test_wild.py checks it on tiny
GPT-2 and Llama models), up to float ties between the two best tokens.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from util.scoring import lm_logits, model_device, pad_token_id, prompt_ids

STOP_EOS = "eos"
STOP_STRING = "stop_string"
STOP_CAP = "max_new_tokens"
MIRAGE_STOP_STRINGS = (".", "\n")


@dataclasses.dataclass(frozen=True)
class Generation:
    """One prompt's greedy answer."""

    token_ids: tuple[int, ...]  # the generated tokens, the one that stopped generation included
    text: str  # decoded answer without special tokens and without the trailing stop string
    stopped_by: str  # STOP_EOS, STOP_STRING or STOP_CAP


@dataclasses.dataclass(frozen=True)
class StopRule:
    """When a row stops; built once per call by ``stop_rule``."""

    eos_ids: frozenset[int]
    stop_strings: tuple[str, ...]
    max_new_tokens: int

    def reason(self, tok: PreTrainedTokenizerBase, generated: Sequence[int]) -> str | None:
        if generated[-1] in self.eos_ids:
            return STOP_EOS
        if self.stop_strings and tok.decode(list(generated)).endswith(self.stop_strings):
            return STOP_STRING
        if len(generated) >= self.max_new_tokens:
            return STOP_CAP
        return None


def eos_token_ids(model: nn.Module, tok: PreTrainedTokenizerBase) -> frozenset[int]:
    """The tokenizer's EOS id and the model's generation-config EOS id(s) (an int or a list)."""
    ids = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if configured is not None:
        ids.update(configured if isinstance(configured, (list, tuple)) else [configured])
    return frozenset(int(i) for i in ids)


def stop_rule(model: nn.Module, tok: PreTrainedTokenizerBase, max_new_tokens: int,
              stop_strings: Sequence[str] = MIRAGE_STOP_STRINGS) -> StopRule:
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, not {max_new_tokens}")
    return StopRule(eos_token_ids(model, tok), tuple(stop_strings), int(max_new_tokens))


def answer_text(tok: PreTrainedTokenizerBase, generated: Sequence[int], rule: StopRule) -> str:
    """The answer as text: special tokens dropped, one trailing stop string removed (as Mirage)."""
    text = tok.decode(list(generated), skip_special_tokens=True)
    for s in rule.stop_strings:
        if text.endswith(s):
            return text[: -len(s)]
    return text


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Left-padded ids, their attention mask, and position ids counted from each row's first token."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        if s:
            ids[i, width - len(s):] = torch.tensor(list(s), dtype=torch.long)
            mask[i, width - len(s):] = 1
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), positions.to(device)


def _step(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache):
    """Next-token logits of every row, and the cache extended by ``ids``."""
    out = model.base_model(input_ids=ids, attention_mask=mask, position_ids=positions,
                           past_key_values=cache, use_cache=True)
    return lm_logits(model, out.last_hidden_state[:, -1]).float(), out.past_key_values


@torch.no_grad()
def _generate_batch(model: nn.Module, tok: PreTrainedTokenizerBase, batch: Sequence[Sequence[int]],
                    rule: StopRule) -> list[Generation]:
    device = model_device(model)
    ids, mask, positions = left_pad(batch, pad_token_id(tok), device)
    generated: list[list[int]] = [[] for _ in batch]
    stopped: list[str | None] = [None] * len(batch)
    active = list(range(len(batch)))  # rows still generating, in cache order
    cache = None
    while active:
        logits, cache = _step(model, ids, mask, positions, cache)
        next_ids = logits.argmax(-1)
        keep = []
        for j, (row, token) in enumerate(zip(active, next_ids.tolist())):
            generated[row].append(token)
            stopped[row] = rule.reason(tok, generated[row])
            if stopped[row] is None:
                keep.append(j)
        if len(keep) < len(active):
            if not keep:
                break
            index = torch.tensor(keep, device=device)
            cache.batch_select_indices(index)
            mask, positions, next_ids = mask[index], positions[index], next_ids[index]
            active = [active[j] for j in keep]
        mask = torch.cat([mask, mask.new_ones((len(active), 1))], dim=1)
        positions = positions[:, -1:] + 1
        ids = next_ids[:, None]
    return [Generation(tuple(g), answer_text(tok, g, rule), s) for g, s in zip(generated, stopped)]


def greedy_generate(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_new_tokens: int,
    stop_strings: Sequence[str] = MIRAGE_STOP_STRINGS,
    batch_size: int = 16,
) -> list[Generation]:
    """Each prompt's greedy answer, in the order of ``prompts``.

    Prompts are tokenized as the teacher-forced scores tokenize them (``util.scoring.prompt_ids``:
    with the tokenizer's own special tokens) and batched by length, ``batch_size`` at a time.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, not {batch_size}")
    rule = stop_rule(model, tok, max_new_tokens, stop_strings)
    encoded = [prompt_ids(tok, p) for p in prompts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    results: list[Generation | None] = [None] * len(encoded)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        for i, generation in zip(rows, _generate_batch(model, tok, [encoded[i] for i in rows], rule)):
            results[i] = generation
    return results  # type: ignore[return-value]
