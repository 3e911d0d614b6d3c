"""Which records a run edits and which it only watches: the split every protocol starts from."""
from __future__ import annotations

import dataclasses
import random
from typing import Sequence

from torch import nn
from transformers import PreTrainedTokenizerBase

from util.scoring import score_targets


@dataclasses.dataclass(frozen=True)
class ProtocolSplit:
    """Known records shuffled with ``seed``: the first half is the edit stream (and the edit-retention
    set), the second half the original-retention set, which no protocol ever edits."""

    seed: int
    n_known: int
    edit_stream: list[dict]
    orig_retention: list[dict]

    def sizes(self) -> dict:
        return {
            "seed": self.seed,
            "n_known_records": self.n_known,
            "n_edit_stream": len(self.edit_stream),
            "n_orig_retention": len(self.orig_retention),
        }


def split_records(records: Sequence[dict], seed: int, size_limit: int | None) -> ProtocolSplit:
    """The WilKE reference's split: the first ``size_limit`` records in file order (it always takes
    2,048), shuffled as ``random.seed(seed); random.shuffle(...)`` does (a private RNG here, the same
    permutation), then halved. Cutting first means the edit stream does not depend on how many more
    facts a model knows beyond the limit."""
    shuffled = list(records if size_limit is None else records[:size_limit])
    random.Random(seed).shuffle(shuffled)
    half = (len(shuffled) + 1) // 2
    return ProtocolSplit(seed, len(records), shuffled[:half], shuffled[half:])


def powers_of_two(limit: int) -> list[int]:
    return [2**k for k in range(limit.bit_length() + 1) if 2**k <= limit]


def retention_checkpoints(edit_times: int) -> list[int]:
    """Powers of two and multiples of 50, up to ``edit_times`` (the WilKE reference's)."""
    return sorted(set(powers_of_two(edit_times)) | set(range(50, edit_times + 1, 50)))


def retention_prompt(record: dict) -> tuple[str, str]:
    """The record's filled prompt and the answer it had before editing (target_true)."""
    rw = record["requested_rewrite"]
    return rw["prompt"].format(rw["subject"]), rw["target_true"]["str"]


def count_retained(model: nn.Module, tok: PreTrainedTokenizerBase, records: Sequence[dict]) -> int:
    """How many records' prompts the model still completes greedily with target_true."""
    if not records:
        return 0
    prompts, targets = zip(*(retention_prompt(r) for r in records))
    return sum(s.correct for s in score_targets(model, tok, list(prompts), list(targets)))
