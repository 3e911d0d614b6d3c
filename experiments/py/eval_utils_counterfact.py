"""CounterFact metrics of one record on the current model (ROME's ``compute_rewrite_quality_counterfact``,
kmeng01/rome ``experiments/py/eval_utils_counterfact.py``, and the WilKE paper's greedy correctness).

For the rewrite, paraphrase and neighborhood prompts: the mean NLL of " target_new" and of
" target_true" (ROME calls these ``*_probs``), and ``*_correct``: whether greedy decoding
reproduces every token of the expected target (target_new for rewrite and paraphrase,
target_true for neighborhood). All prompts of a record are scored in one batched pass.
With ``generation`` (experiments.py.generation_metrics.GenerationTests) the dict also holds
``ngram_entropy`` (fluency), ``reference_score`` (consistency, when its data files exist) and
``text`` (the generated texts). The lifelong loop checks every number here for NaN/inf.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

from torch import nn
from transformers import PreTrainedTokenizerBase

from util.scoring import TargetScore, score_targets

PROMPT_KINDS = ("rewrite_prompts", "paraphrase_prompts", "neighborhood_prompts")


def record_prompts(record: dict) -> dict[str, list[str]]:
    rw = record["requested_rewrite"]
    return {
        "rewrite_prompts": [rw["prompt"].format(rw["subject"])],
        "paraphrase_prompts": list(record.get("paraphrase_prompts") or []),
        "neighborhood_prompts": list(record.get("neighborhood_prompts") or []),
    }


def scored_pairs(record: dict) -> list[tuple[str, str]]:
    """(prompt, target) of every score a record's metrics read: each prompt with target_new, then target_true."""
    rw = record["requested_rewrite"]
    new, true = rw["target_new"]["str"], rw["target_true"]["str"]
    groups = record_prompts(record)
    return [(p, t) for kind in PROMPT_KINDS for p in groups[kind] for t in (new, true)]


def post_from_scores(record: dict, scores: Sequence[TargetScore]) -> dict[str, Any]:
    """The record's metrics from the scores of ``scored_pairs(record)``, in that order."""
    groups = record_prompts(record)
    out: dict[str, Any] = {}
    i = 0
    for kind in PROMPT_KINDS:
        probs, correct = [], []
        for _ in groups[kind]:
            s_new, s_true = scores[i], scores[i + 1]
            i += 2
            probs.append({"target_new": s_new.nll, "target_true": s_true.nll})
            correct.append(s_true.correct if kind == "neighborhood_prompts" else s_new.correct)
        out[f"{kind}_probs"] = probs
        out[f"{kind}_correct"] = correct
    return out


def compute_rewrite_quality_counterfact(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    record: dict,
    generation: Optional[Any] = None,
) -> dict:
    """Metrics of ``record`` on the current model; ``generation`` adds fluency/consistency when given."""
    pairs = scored_pairs(record)
    out = post_from_scores(record, score_targets(model, tok, [p for p, _ in pairs], [t for _, t in pairs]))
    if generation is not None:
        out.update(generation(model, tok, record))
    return out
