"""zsRE metrics of one record on the current model (ROME/MEMIT's ``compute_rewrite_quality_zsre``).

For the rewrite prompt and each paraphrase: for every token i of " target_new", whether the argmax
after prompt + target[:i] is target[i] (teacher forced); the neighbourhood prompt (an NQ question
followed by "?") is checked the same way against its target, the exact text that follows it
(" " + ``loc_ans``, or one token of it in ROME's token-by-token pairs). Each ``*_prompts_correct``
is the flat list of those token verdicts, so its mean is ROME's token-by-token accuracy. A record
with a ``portability`` field (MEND's setting, ``zsre_mend``) also gets ``portability_prompts_correct``,
the same token accuracy of each portability answer after its question (experiments/py/portability.py).

One difference from ROME's code: ROME re-tokenizes ``prompt + decode(target[:i])`` for every i;
here the prompt's and the target's token ids are concatenated and scored in one pass. The two agree
whenever the tokenizer does not merge across the prompt/target boundary (targets start with a space).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

from torch import nn
from transformers import PreTrainedTokenizerBase

from experiments.py.portability import portability_pairs
from util.scoring import Continuation, TargetScore, score_targets


def neighborhood_pairs(record: dict) -> list[tuple[str, str]]:
    """(prompt, continuation) of each neighbourhood entry (``{"prompt": ..., "target": ...}``). The
    target is the exact text after the prompt, scored as written, as ROME does (dsets/zsre.py)."""
    return [(n["prompt"], Continuation(n["target"])) for n in record.get("neighborhood_prompts") or []]


def _groups(record: dict) -> dict[str, list[tuple[str, str]]]:
    rw = record["requested_rewrite"]
    new = rw["target_new"]["str"]
    groups = {
        "rewrite_prompts": [(rw["prompt"].format(rw["subject"]), new)],
        "paraphrase_prompts": [(p, new) for p in record.get("paraphrase_prompts") or []],
        "neighborhood_prompts": neighborhood_pairs(record),
    }
    portability = portability_pairs(record)  # questions that need the new fact (records that have them)
    if portability:
        groups["portability_prompts"] = portability
    return groups


def scored_pairs(record: dict) -> list[tuple[str, str]]:
    """(prompt, target) of every score a record's metrics read, rewrite then paraphrases then neighbours."""
    return [pair for pairs in _groups(record).values() for pair in pairs]


def post_from_scores(record: dict, scores: Sequence[TargetScore]) -> dict[str, Any]:
    """The record's token accuracies from the scores of ``scored_pairs(record)``, in that order."""
    it = iter(scores)
    return {f"{kind}_correct": [ok for _ in pairs for ok in next(it).token_correct] for kind, pairs in _groups(record).items()}


def compute_rewrite_quality_zsre(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    record: dict,
    generation: Optional[Any] = None,
) -> dict:
    """Token-by-token accuracies of ``record``; ``generation`` is not used (zsRE has no generation prompts)."""
    pairs = scored_pairs(record)
    scores = score_targets(model, tok, [p for p, _ in pairs], [t for _, t in pairs]) if pairs else []
    return post_from_scores(record, scores)
