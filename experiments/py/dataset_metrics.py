"""Metrics chosen by dataset, as ROME's ``DS_DICT``: each dataset kind's per-record evaluation and
the prompts its unchanged-prediction locality reads.

- ``counterfact``: the paper's greedy ES/GS/LS and ROME's probability scores
  (experiments/py/eval_utils_counterfact.py), fluency/consistency with generation tests;
- ``zsre``: ROME/MEMIT's token-by-token accuracy (experiments/py/eval_utils_zsre.py).
Both get locality as unchanged prediction (experiments/py/locality.py).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Sequence

from torch import nn
from transformers import PreTrainedTokenizerBase

from experiments.py import eval_utils_counterfact, eval_utils_zsre
from experiments.py.locality import unchanged
from util.scoring import TargetScore, score_pairs

Pairs = list[tuple[str, str]]


@dataclasses.dataclass(frozen=True)
class DatasetMetrics:
    kind: str
    rewrite_quality: Callable[..., dict[str, Any]]  # (model, tok, record, generation) -> post metrics
    neighborhood_pairs: Callable[[dict], Pairs]  # (prompt, reference answer) per neighbourhood prompt
    generation_tests: bool  # whether the records carry generation prompts (fluency, consistency)
    # the same metrics in two halves, so many records can share one scoring pass (evaluate_records)
    scored_pairs: Callable[[dict], Pairs]  # every (prompt, target) the record's metrics score
    post_from_scores: Callable[[dict, Sequence[TargetScore]], dict[str, Any]]


def _counterfact_neighbourhood(record: dict) -> Pairs:
    true = record["requested_rewrite"]["target_true"]["str"]
    return [(p, true) for p in record.get("neighborhood_prompts") or []]


DATASET_METRICS: dict[str, DatasetMetrics] = {
    "counterfact": DatasetMetrics("counterfact", eval_utils_counterfact.compute_rewrite_quality_counterfact,
                                  _counterfact_neighbourhood, True, eval_utils_counterfact.scored_pairs,
                                  eval_utils_counterfact.post_from_scores),
    "zsre": DatasetMetrics("zsre", eval_utils_zsre.compute_rewrite_quality_zsre, eval_utils_zsre.neighborhood_pairs,
                           False, eval_utils_zsre.scored_pairs, eval_utils_zsre.post_from_scores),
}


def metrics_for(kind: str) -> DatasetMetrics:
    if kind not in DATASET_METRICS:
        raise KeyError(f"no metrics for dataset kind {kind!r}; known: {', '.join(DATASET_METRICS)}")
    return DATASET_METRICS[kind]


def evaluate_records(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    metrics: DatasetMetrics,
    records: Sequence[dict],
    unedited: Optional[Sequence[Sequence[Sequence[int]]]] = None,
    batch_size: int = 64,
) -> list[dict[str, Any]]:
    """Every record's metrics, and with ``unedited`` (each record's unedited argmax answers of its
    neighbourhood prompts) its unchanged-prediction locality, from one scoring pass over all their
    prompts: what ``metrics.rewrite_quality`` and ``locality.unchanged`` give one record at a time
    (floats to rounding), at a fraction of the cost (shared batches of similar length; the
    neighbourhood pairs that the metrics and locality both read are scored once)."""
    own = [metrics.scored_pairs(r) for r in records]
    near = [metrics.neighborhood_pairs(r) if unedited is not None else [] for r in records]
    scores = iter(score_pairs(model, tok, [p for a, b in zip(own, near) for p in (*a, *b)], batch_size))
    posts = []
    for i, (record, a, b) in enumerate(zip(records, own, near)):
        post = metrics.post_from_scores(record, [next(scores) for _ in a])
        now = [list(next(scores).argmax) for _ in b]
        if unedited is not None:
            post.update(unchanged(unedited[i], now))
        posts.append(post)
    return posts
