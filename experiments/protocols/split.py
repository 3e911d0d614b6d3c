"""The WilKE lifelong protocol: which records are edited, rolled back and checked for retention."""
from __future__ import annotations

import copy
import dataclasses
import random
from typing import Sequence

from torch import nn
from transformers import PreTrainedTokenizerBase

from util.scoring import score_targets


@dataclasses.dataclass(frozen=True)
class ProtocolSplit:
    """Known records shuffled with ``seed``: the first half is the edit stream and the
    edit-retention set, the second half the original-retention set."""

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
    """Shuffle with a private RNG, keep ``size_limit`` records (the reference ignores it), halve."""
    shuffled = list(records)
    random.Random(seed).shuffle(shuffled)
    if size_limit is not None:
        shuffled = shuffled[:size_limit]
    half = (len(shuffled) + 1) // 2
    return ProtocolSplit(seed, len(records), shuffled[:half], shuffled[half:])


def retention_checkpoints(edit_times: int) -> list[int]:
    """Powers of two and multiples of 50, up to ``edit_times``."""
    points = {2**k for k in range(edit_times.bit_length() + 1) if 2**k <= edit_times}
    points |= set(range(50, edit_times + 1, 50))
    return sorted(points)


def swapped_request(request: dict) -> dict:
    """The roll-back request: the same prompt with target_new and target_true exchanged."""
    back = copy.deepcopy(request)
    back["target_new"], back["target_true"] = request["target_true"], request["target_new"]
    return back


def edit_request(record: dict) -> dict:
    request = copy.deepcopy(record["requested_rewrite"])
    request["case_id"] = record["case_id"]
    return request


def count_retained(model: nn.Module, tok: PreTrainedTokenizerBase, records: Sequence[dict]) -> int:
    """How many records' prompts the model still completes greedily with target_true."""
    if not records:
        return 0
    prompts = [r["requested_rewrite"]["prompt"].format(r["requested_rewrite"]["subject"]) for r in records]
    targets = [r["requested_rewrite"]["target_true"]["str"] for r in records]
    return sum(s.correct for s in score_targets(model, tok, prompts, targets))
