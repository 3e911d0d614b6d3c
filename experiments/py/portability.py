"""Portability: does an edit carry over to questions that need the new fact (KnowEdit / Yao et al. 2023)?

Records carry it in a ``portability`` field, in one of the two shapes of the public zsRE files:
- ../shared/data/dsets/zsre_mem_eval.json (MEND format + GPT-4 portability): one question,
  ``{"New Question": ..., "New Answer": ..., "Recalled Relation": ...}``;
- KnowEdit (../shared/data/sources/knowedit_ZsRE-test-all.json): groups of questions,
  ``{"Reasoning": [{"prompt": ..., "ground_truth": ...}], "Subject_Aliasing": [...], ...}``, the
  ground truth a string or a list of aliases (the first one is scored, as EasyEdit does).
A loader only has to copy the raw field into the record under ``portability``; a record without
it has no portability prompts and gets no portability scores.

Teacher-forced score (``compute_portability_quality``): zsRE's token-by-token argmax accuracy of
each answer after its question, ``portability_prompts_correct`` (flat token verdicts, as
``experiments.py.eval_utils_zsre``). The WILD score of the same pairs is in ``experiments.py.wild``.
"""
from __future__ import annotations

from typing import Any

from torch import nn
from transformers import PreTrainedTokenizerBase

from util.scoring import score_targets

MEND_QUESTION, MEND_ANSWER = "New Question", "New Answer"


def _first_answer(ground_truth: Any, where: str) -> str:
    """The answer string of a KnowEdit entry: a string, or the first of a (nested) alias list."""
    while isinstance(ground_truth, list) and ground_truth:
        ground_truth = ground_truth[0]
    if not isinstance(ground_truth, str) or not ground_truth.strip():
        raise ValueError(f"{where}: ground_truth must be a non-empty string or list of strings, got {ground_truth!r}")
    return ground_truth


def portability_pairs(record: dict) -> list[tuple[str, str]]:
    """(question, answer) of every portability entry of ``record``; [] when it has none."""
    field = record.get("portability")
    if not field:
        return []
    where = f"case {record.get('case_id')!r}: portability"
    if not isinstance(field, dict):
        raise TypeError(f"{where}: expected an object, got {type(field).__name__}")
    if MEND_QUESTION in field:
        return [(field[MEND_QUESTION], _first_answer(field.get(MEND_ANSWER), where))]
    pairs = []
    for group, entries in field.items():
        if not isinstance(entries, list):
            raise TypeError(f"{where}.{group}: expected a list of {{prompt, ground_truth}}, got {type(entries).__name__}")
        for i, entry in enumerate(entries):
            pairs.append((entry["prompt"], _first_answer(entry.get("ground_truth"), f"{where}.{group}[{i}]")))
    return pairs


def compute_portability_quality(model: nn.Module, tok: PreTrainedTokenizerBase, record: dict) -> dict[str, list[bool]]:
    """Teacher-forced token accuracy of the portability answers; {} when the record has none."""
    pairs = portability_pairs(record)
    if not pairs:
        return {}
    scores = score_targets(model, tok, [q for q, _ in pairs], [a for _, a in pairs])
    return {"portability_prompts_correct": [ok for s in scores for ok in s.token_correct]}
