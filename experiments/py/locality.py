"""Locality as unchanged prediction (EasyEdit's notion): does the edited model still answer the
neighbourhood prompts the way the unedited model did?

The paper's LS counts neighbourhood prompts answered with target_true, which a small model rarely
knows (SmolLM2's unedited LS is 0.10), so it says little there. Here each neighbourhood prompt's
*answer* is the argmax token at every position of its reference answer (teacher forced: the greedy
prediction along target_true for CounterFact, along ``loc_ans`` for zsRE), read once on the unedited
model. After editing, a prompt is unchanged when every one of those tokens is the same
(``neighborhood_prompts_unchanged``); the share of equal tokens is kept too
(``neighborhood_prompts_unchanged_tokens``, what EasyEdit averages). Neither depends on whether the
model knew the fact.
"""
from __future__ import annotations

from typing import Sequence

from torch import nn
from transformers import PreTrainedTokenizerBase

from util.scoring import score_targets

Pairs = Sequence[tuple[str, str]]


def argmax_answers(model: nn.Module, tok: PreTrainedTokenizerBase, pairs: Pairs) -> list[list[int]]:
    """The teacher-forced argmax tokens of each (prompt, reference answer) pair."""
    if not pairs:
        return []
    scores = score_targets(model, tok, [p for p, _ in pairs], [t for _, t in pairs])
    return [list(s.argmax) for s in scores]


def unchanged(before: Sequence[Sequence[int]], after: Sequence[Sequence[int]]) -> dict[str, list]:
    """Per prompt: whether its answer is unchanged, and the share of its tokens that are."""
    if len(before) != len(after):
        raise ValueError(f"{len(before)} unedited answers but {len(after)} edited ones")
    same = [sum(int(a == b) for a, b in zip(x, y)) / max(len(x), 1) for x, y in zip(before, after)]
    return {
        "neighborhood_prompts_unchanged": [list(x) == list(y) for x, y in zip(before, after)],
        "neighborhood_prompts_unchanged_tokens": same,
    }
