"""A causal LM whose next-token distributions are written by hand, for tests that need to know
exactly what a model will say.

``TableLM(vocab_size, table, eos_id)`` looks up the whole history of real tokens (pads excluded)
in ``table`` ({token-id tuple: {next id: probability}}); a history not in the table gives the EOS
token with probability ~1. It answers the calls the harness makes on a Hugging Face model:
``base_model(input_ids, attention_mask, position_ids, past_key_values, use_cache)`` (hidden states
are one-hot over the table's rows), ``get_output_embeddings()`` (a Linear holding the log
probabilities), ``config`` and ``generation_config``; its cache keeps each row's history and
supports ``batch_select_indices`` like ``transformers.DynamicCache``. So teacher-forced scoring
(util/scoring.py) and generation (util/generation.py) both run on it unchanged.
"""
from __future__ import annotations

import math
import types
from collections.abc import Sequence

import torch
from torch import nn

FLOOR = 1e-9  # probability of every token a row does not list


class HistoryCache:
    """Each row's token history: what a KV cache stands for here."""

    def __init__(self, rows: int):
        self.history: list[list[int]] = [[] for _ in range(rows)]

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.history = [self.history[i] for i in indices.tolist()]


class _Body(nn.Module):
    def __init__(self, table: dict[tuple[int, ...], dict[int, float]]):
        super().__init__()
        self.rows = {key: i for i, key in enumerate(table)}

    def state(self, history: Sequence[int]) -> int:
        return self.rows.get(tuple(history), len(self.rows))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, past_key_values: HistoryCache | None = None,
                use_cache: bool = False, **_):
        batch, length = input_ids.shape
        mask = attention_mask[:, -length:] if attention_mask is not None else torch.ones_like(input_ids)
        cache = past_key_values if past_key_values is not None else HistoryCache(batch)
        hidden = torch.zeros(batch, length, len(self.rows) + 1)
        for r in range(batch):
            for t in range(length):
                if mask[r, t]:
                    cache.history[r].append(int(input_ids[r, t]))
                    hidden[r, t, self.state(cache.history[r])] = 1.0
        return types.SimpleNamespace(last_hidden_state=hidden, past_key_values=cache if use_cache else None)


class TableLM(nn.Module):
    def __init__(self, vocab_size: int, table: dict[tuple[int, ...], dict[int, float]], eos_id: int):
        super().__init__()
        self.body = _Body(table)
        self.head = nn.Linear(len(table) + 1, vocab_size, bias=False)
        logp = torch.full((vocab_size, len(table) + 1), math.log(FLOOR))
        for i, dist in enumerate([*table.values(), {eos_id: 1.0}]):
            for token, p in dist.items():
                logp[token, i] = math.log(p)
        self.head.weight.data.copy_(logp)
        self.config = types.SimpleNamespace(model_type="table", max_position_embeddings=1024)
        self.generation_config = types.SimpleNamespace(eos_token_id=eos_id)

    @property
    def base_model(self) -> nn.Module:
        return self.body

    def get_output_embeddings(self) -> nn.Module:
        return self.head


def continuation_table(prompt: Sequence[int], steps: Sequence[dict[int, float]], path: Sequence[int]) -> dict:
    """Rows for ``prompt``: after prompt + path[:i] the distribution is steps[i]."""
    return {tuple(prompt) + tuple(path[:i]): dist for i, dist in enumerate(steps)}
