"""The batches of a statistics collection: drawn texts, tokenized, grouped by a token budget.

The plan is a pure function of the corpus sample, the tokenizer, ``max_length`` and the token
budget, so every process of a sharded collection, and every resumed attempt, computes the same
batches in the same order; its fingerprint names the partial statistics that belong to it.

Token budget (``batch_tokens``): a batch holds samples of similar length (sorted longest first)
as long as rows x longest <= batch_tokens, so a batch feeds the model at most that many padded
positions (a sample longer than the budget gets a batch of its own). Peak extra memory of a
forward pass grows with it (activations, plus the retained inputs of the traced modules: about
batch_tokens x input width x modules values); an out-of-memory error halves the batch instead of
failing (``stats_collection``).
"""
from __future__ import annotations

import dataclasses
import hashlib
from typing import Sequence

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from editing.corpus_sample import CorpusSample

DEFAULT_BATCH_TOKENS = 4096


def tokenize_samples(tok: PreTrainedTokenizerBase, texts: Sequence[str], max_length: int, chunk: int = 256) -> list[np.ndarray]:
    """Token ids of each text (with the tokenizer's own special tokens), truncated to max_length;
    int32 arrays, a tenth of the memory of Python lists for 100,000 long articles."""
    out: list[np.ndarray] = []
    for start in range(0, len(texts), chunk):
        encoded = tok(list(texts[start : start + chunk]), truncation=True, max_length=max_length)
        out.extend(np.asarray(ids, dtype=np.int32) for ids in encoded["input_ids"])
    return out


def length_batches(lengths: Sequence[int], batch_tokens: int) -> list[list[int]]:
    """Sample indices grouped by length (longest first, ties by index) into batches whose padded
    size rows * longest stays within batch_tokens; a longer sample gets a batch of its own."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    for i in order:
        # Sorted descending, so the first sample of a batch is its longest.
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= batch_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


@dataclasses.dataclass(frozen=True)
class BatchPlan:
    """Every batch of a collection, in order; ``batch(i)`` builds batch i's padded tensors."""

    sample: CorpusSample
    samples: list[np.ndarray]  # token ids of each used (non-empty) sample
    batches: list[list[int]]  # sample indices of each batch
    pad_id: int
    max_length: int
    batch_tokens: int
    fingerprint: str

    @property
    def n_samples(self) -> int:
        return len(self.samples)

    @property
    def n_tokens(self) -> int:
        return sum(len(s) for s in self.samples)

    def padded_tokens(self, i: int) -> int:
        group = self.batches[i]
        return len(group) * len(self.samples[group[0]])

    @property
    def forward_tokens(self) -> int:
        return sum(self.padded_tokens(i) for i in range(len(self.batches)))

    def batch(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded ids and attention mask of batch i (on the CPU)."""
        rows = [self.samples[j] for j in self.batches[i]]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, row in enumerate(rows):
            ids[r, : len(row)] = torch.from_numpy(row.astype(np.int64))
            mask[r, : len(row)] = 1
        return ids, mask


def make_plan(tok: PreTrainedTokenizerBase, sample: CorpusSample, max_length: int, batch_tokens: int, pad_id: int) -> BatchPlan:
    """Tokenize the drawn texts and group them into batches (see the module docstring)."""
    if batch_tokens <= 0:
        raise ValueError(f"batch_tokens must be positive, got {batch_tokens}")
    samples = [s for s in tokenize_samples(tok, sample.texts, max_length) if len(s)]
    batches = length_batches([len(s) for s in samples], batch_tokens)
    digest = hashlib.sha256(f"{max_length}|{batch_tokens}|{pad_id}|{len(samples)}".encode())
    for s in samples:
        digest.update(np.int64(len(s)).tobytes())
        digest.update(s.tobytes())
    for group in batches:
        digest.update(np.asarray(group, dtype=np.int64).tobytes() + b";")
    return BatchPlan(sample, samples, batches, pad_id, max_length, batch_tokens, digest.hexdigest())
