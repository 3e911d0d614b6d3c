"""Which records a run edits and which it only watches: the split every protocol starts from.

Two stream orders. ``shuffled`` (the WilKE reference's, the default): the first
``--dataset_size_limit`` records in file order, shuffled with the seed, the first half edited (and
watched as edit retention), the second half only watched (original retention / preservation).
``file`` (AlphaEdit's ``experiments/evaluate.py``): the first ``--dataset_size_limit`` records of the
dataset in file order, unshuffled and unfiltered, are the edit stream; the watched set is facts the
model knows (its CounterFact known subset) that the stream does not hold, in file order, at most
``--preservation_size``: an unfiltered stream still needs known facts to measure preservation.
"""
from __future__ import annotations

import dataclasses
import random
from typing import Optional, Sequence

from torch import nn
from transformers import PreTrainedTokenizerBase

from util.scoring import score_targets

STREAM_ORDERS = ("shuffled", "file")
DEFAULT_PRESERVATION_SIZE = 256


@dataclasses.dataclass(frozen=True)
class ProtocolSplit:
    """The edit stream (also the edit-retention set) and the original-retention (preservation) set,
    which no protocol ever edits."""

    seed: int
    n_known: int  # records the stream was drawn from (the known subset, or the whole file in file order)
    edit_stream: list[dict]
    orig_retention: list[dict]
    order: str = "shuffled"
    preservation_source: Optional[str] = None  # file order: the known subset the watched facts come from
    # the field holding a watched record's true answer: target_true, except for ROME's zsRE records,
    # whose target_new is the true answer and target_true a placeholder
    watched_answer: str = "target_true"

    def sizes(self) -> dict:
        sizes = {
            "seed": self.seed,
            "n_known_records": self.n_known,
            "n_edit_stream": len(self.edit_stream),
            "n_orig_retention": len(self.orig_retention),
            "stream_order": self.order,
        }
        if self.preservation_source is not None:
            sizes["preservation_source"] = self.preservation_source
        if self.watched_answer != "target_true":
            sizes["watched_answer"] = self.watched_answer
        return sizes


def split_records(records: Sequence[dict], seed: int, size_limit: int | None,
                  watched_answer: str = "target_true") -> ProtocolSplit:
    """The WilKE reference's split: the first ``size_limit`` records in file order (it always takes
    2,048), shuffled as ``random.seed(seed); random.shuffle(...)`` does (a private RNG here, the same
    permutation), then halved. Cutting first means the edit stream does not depend on how many more
    facts a model knows beyond the limit."""
    shuffled = list(records if size_limit is None else records[:size_limit])
    random.Random(seed).shuffle(shuffled)
    half = (len(shuffled) + 1) // 2
    return ProtocolSplit(seed, len(records), shuffled[:half], shuffled[half:], watched_answer=watched_answer)


def split_in_file_order(records: Sequence[dict], seed: int, size_limit: int | None, known: Sequence[dict],
                        known_source: str, preservation_size: int = DEFAULT_PRESERVATION_SIZE,
                        shared_case_ids: bool = True) -> ProtocolSplit:
    """AlphaEdit's stream: the first ``size_limit`` records as they are in the file. The watched set:
    the first ``preservation_size`` known facts, less those the stream edits (``shared_case_ids``:
    the stream's case ids are CounterFact's, as the known facts'; zsRE's are another numbering)."""
    stream = list(records if size_limit is None else records[:size_limit])
    edited = {r["case_id"] for r in stream} if shared_case_ids else set()
    watched = [r for r in known if r["case_id"] not in edited][:preservation_size]
    return ProtocolSplit(seed, len(records), stream, watched, order="file", preservation_source=known_source)


def powers_of_two(limit: int) -> list[int]:
    return [2**k for k in range(limit.bit_length() + 1) if 2**k <= limit]


def retention_checkpoints(edit_times: int) -> list[int]:
    """Powers of two and multiples of 50, up to ``edit_times`` (the WilKE reference's)."""
    return sorted(set(powers_of_two(edit_times)) | set(range(50, edit_times + 1, 50)))


def retention_prompt(record: dict, answer: str = "target_true") -> tuple[str, str]:
    """The record's filled prompt and its true answer before editing (``answer`` names the field)."""
    rw = record["requested_rewrite"]
    return rw["prompt"].format(rw["subject"]), rw[answer]["str"]


def count_retained(model: nn.Module, tok: PreTrainedTokenizerBase, records: Sequence[dict],
                   answer: str = "target_true") -> int:
    """How many records' prompts the model still completes greedily with their true answer."""
    if not records:
        return 0
    prompts, targets = zip(*(retention_prompt(r, answer) for r in records))
    return sum(s.correct for s in score_targets(model, tok, list(prompts), list(targets)))
