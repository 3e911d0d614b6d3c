"""Metrics chosen by dataset, as ROME's ``DS_DICT``: each dataset kind's per-record evaluation and
the prompts its unchanged-prediction locality reads.

- ``counterfact``: the paper's greedy ES/GS/LS and ROME's probability scores
  (experiments/py/eval_utils_counterfact.py), fluency/consistency with generation tests;
- ``zsre``: ROME/MEMIT's token-by-token accuracy (experiments/py/eval_utils_zsre.py).
Both get locality as unchanged prediction (experiments/py/locality.py).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

from experiments.py import eval_utils_zsre
from experiments.py.eval_utils_counterfact import compute_rewrite_quality_counterfact

Pairs = list[tuple[str, str]]


@dataclasses.dataclass(frozen=True)
class DatasetMetrics:
    kind: str
    rewrite_quality: Callable[..., dict[str, Any]]  # (model, tok, record, generation) -> post metrics
    neighborhood_pairs: Callable[[dict], Pairs]  # (prompt, reference answer) per neighbourhood prompt
    generation_tests: bool  # whether the records carry generation prompts (fluency, consistency)


def _counterfact_neighbourhood(record: dict) -> Pairs:
    true = record["requested_rewrite"]["target_true"]["str"]
    return [(p, true) for p in record.get("neighborhood_prompts") or []]


DATASET_METRICS: dict[str, DatasetMetrics] = {
    "counterfact": DatasetMetrics("counterfact", compute_rewrite_quality_counterfact, _counterfact_neighbourhood, True),
    "zsre": DatasetMetrics("zsre", eval_utils_zsre.compute_rewrite_quality_zsre, eval_utils_zsre.neighborhood_pairs, False),
}


def metrics_for(kind: str) -> DatasetMetrics:
    if kind not in DATASET_METRICS:
        raise KeyError(f"no metrics for dataset kind {kind!r}; known: {', '.join(DATASET_METRICS)}")
    return DATASET_METRICS[kind]
