"""WILD scores: what the edited model answers on its own (Yang et al., "The Mirage of Model Editing:
Revisiting Evaluation in the Wild", ACL 2025, arXiv 2502.11177; code WanliYoung/Revisit-Editing-
Evaluation, folded into EasyEdit as ``evaluation_type``).

Every other score of the harness is read under teacher forcing, which feeds the target's earlier
tokens and so leaks its content and its length. Here each prompt is answered by greedy generation
from the prompt alone (util/generation.py: stops at EOS, a newline or a period, Mirage's
``stop_strings``; ``max_new_tokens`` caps it), and the answer is judged against the target:

- ``exact``: equal after SQuAD normalisation (lower case, no ASCII punctuation, no articles a/an/the,
  single spaces): Mirage's and EasyEdit's ``exact_match_score``, the score they fall back to
  without an LLM judge;
- ``lenient``: the normalised answer's words begin with the normalised target's words;
- ``f1``: SQuAD token F1 between the normalised answer and target.

Prompt groups and targets (``wild_pairs``): the rewrite and paraphrase prompts against target_new;
the neighbourhood prompts against their true answer (CounterFact: target_true; zsRE: the NQ answer
``loc_ans``), and, given the unedited model's answers, ``wild_neighborhood_prompts_unchanged``:
whether the generated tokens are the same as before any edit (Mirage compares the token lists);
portability questions when the record has them (experiments/py/portability.py).

``WildSettings.template`` selects the input: ``plain`` (the prompt as it is, Mirage's default
``question-only``) or ``qa_inst`` (Mirage's question template, applied to every prompt as Mirage does).

Differences from Mirage's code: answers are decoded without special tokens (Mirage keeps them and
strips a trailing EOS string), which normalisation makes equivalent; zsRE's neighbourhood question
keeps the ``?`` the ROME loader appends to ``loc``; generation is batched (same tokens).
"""
from __future__ import annotations

import collections
import dataclasses
import re
import string
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from torch import nn
from transformers import PreTrainedTokenizerBase

from experiments.py.portability import portability_pairs
from util.generation import MIRAGE_STOP_STRINGS, Generation, greedy_generate

Pairs = list[tuple[str, str]]

# Mirage's ``context_type`` inputs (its ``chat_temp`` is Llama-2's chat markup, not a general template).
TEMPLATES = {
    "plain": "{prompt}",
    "qa_inst": "Please answer the question:\n\nQ: {prompt}\nA:",
}
SCORES = ("exact", "lenient", "f1")
NEIGHBORHOOD = "neighborhood_prompts"

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


@dataclasses.dataclass(frozen=True)
class WildSettings:
    """How WILD answers are produced; recorded in the run folder with the scores."""

    max_new_tokens: int = 64  # cuts 2.5% of SmolLM2's answers; 1.8% loop past 256 (docs/evaluation.md)
    template: str = "plain"
    stop_strings: tuple[str, ...] = MIRAGE_STOP_STRINGS
    batch_size: int = 64  # prompts generated together; the answers are the same at any size (speed: docs/speed.md)

    def __post_init__(self) -> None:
        if self.template not in TEMPLATES:
            raise ValueError(f"WILD template {self.template!r} is not one of {', '.join(TEMPLATES)}")
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise ValueError(f"WILD max_new_tokens and batch_size must be >= 1, got {self.max_new_tokens}, {self.batch_size}")

    def wrap(self, prompt: str) -> str:
        return TEMPLATES[self.template].format(prompt=prompt)

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "stop_strings": list(self.stop_strings)}


# --- answer scores -----------------------------------------------------------------------------


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation (as Mirage/EasyEdit): lower, drop punctuation, drop articles, one space."""
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION)).split())


def exact_match(answer: str, target: str) -> bool:
    return normalize_answer(answer) == normalize_answer(target)


def starts_with(answer: str, target: str) -> bool:
    """Lenient match: the answer's normalised words begin with all of the target's."""
    want = normalize_answer(target).split()
    return bool(want) and normalize_answer(answer).split()[: len(want)] == want


def token_f1(answer: str, target: str) -> float:
    """SQuAD token F1 over normalised words (1.0 when both are empty, 0.0 when one is)."""
    got, want = normalize_answer(answer).split(), normalize_answer(target).split()
    if not got or not want:
        return float(got == want)
    common = sum((collections.Counter(got) & collections.Counter(want)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(got), common / len(want)
    return 2 * precision * recall / (precision + recall)


def answer_scores(answers: Sequence[str], targets: Sequence[str]) -> dict[str, list]:
    return {
        "exact": [exact_match(a, t) for a, t in zip(answers, targets)],
        "lenient": [starts_with(a, t) for a, t in zip(answers, targets)],
        "f1": [token_f1(a, t) for a, t in zip(answers, targets)],
    }


# --- which prompts, against which targets --------------------------------------------------------


def _counterfact_neighborhood(record: dict) -> Pairs:
    true = record["requested_rewrite"]["target_true"]["str"]
    return [(p, true) for p in record.get(NEIGHBORHOOD) or []]


def _zsre_neighborhood(record: dict) -> Pairs:
    """Whole (question, answer) pairs from zsRE's neighbourhood entries.

    With a tokenizer the ROME loader stores one entry per answer token (question + answer[:i],
    answer[i]); entries whose prompt extends the first one of a run belong to the same question,
    and the answer is what the last entry adds to that question.
    """
    questions: Pairs = []
    first = last = ""
    for entry in record.get(NEIGHBORHOOD) or []:
        prompt, target = entry["prompt"], entry["target"]
        if questions and prompt.startswith(first):
            last = prompt + target
            questions[-1] = (first, last[len(first):].strip())
        else:
            first, last = prompt, prompt + target
            questions.append((first, target.strip()))
    return questions


NEIGHBORHOOD_PAIRS: dict[str, Callable[[dict], Pairs]] = {
    "counterfact": _counterfact_neighborhood,
    "zsre": _zsre_neighborhood,
}


def neighborhood_questions(record: dict, kind: str) -> Pairs:
    if kind not in NEIGHBORHOOD_PAIRS:
        raise KeyError(f"no WILD neighbourhood prompts for dataset kind {kind!r}; known: {', '.join(NEIGHBORHOOD_PAIRS)}")
    return NEIGHBORHOOD_PAIRS[kind](record)


def wild_pairs(record: dict, kind: str) -> dict[str, Pairs]:
    """Prompt group -> (prompt, target) pairs; ``portability_prompts`` only when the record has them."""
    rw = record["requested_rewrite"]
    new = rw["target_new"]["str"]
    groups = {
        "rewrite_prompts": [(rw["prompt"].format(rw["subject"]), new)],
        "paraphrase_prompts": [(p, new) for p in record.get("paraphrase_prompts") or []],
        NEIGHBORHOOD: neighborhood_questions(record, kind),
    }
    portability = portability_pairs(record)
    if portability:
        groups["portability_prompts"] = portability
    return groups


# --- generation and scores -----------------------------------------------------------------------


def generate_answers(model: nn.Module, tok: PreTrainedTokenizerBase, prompts: Sequence[str],
                     settings: WildSettings) -> list[Generation]:
    """The greedy answers to ``prompts`` (the template applied), batched."""
    return greedy_generate(model, tok, [settings.wrap(p) for p in prompts], settings.max_new_tokens,
                           settings.stop_strings, settings.batch_size)


def unedited_wild_answers(model: nn.Module, tok: PreTrainedTokenizerBase, records: Sequence[dict], kind: str,
                          settings: WildSettings) -> dict[str, list[list[int]]]:
    """{str(case_id): generated token ids per neighbourhood prompt}, JSON-ready.

    Read once on the unedited model before the first edit (all records in one batched pass) and
    stored with the run, like ``UneditedAnswers``; ``wild_scores`` compares against one entry.
    """
    per_record = [neighborhood_questions(r, kind) for r in records]
    gens = iter(generate_answers(model, tok, [p for pairs in per_record for p, _ in pairs], settings))
    return {str(r["case_id"]): [list(next(gens).token_ids) for _ in pairs] for r, pairs in zip(records, per_record)}


def wild_scores(model: nn.Module, tok: PreTrainedTokenizerBase, record: dict, kind: str,
                unedited: Sequence[Sequence[int]] | None = None,
                settings: WildSettings = WildSettings()) -> dict[str, Any]:
    """WILD scores of ``record`` on the current model, one list entry per prompt.

    Keys: ``wild_<group>_{exact,lenient,f1}`` for each group of ``wild_pairs``,
    ``wild_neighborhood_prompts_unchanged`` when ``unedited`` (this record's entry of
    ``unedited_wild_answers``) is given, and the answers themselves: ``wild_answers`` and
    ``wild_stopped_by`` (group -> list), so a reader can see what was judged.
    """
    return wild_scores_many(model, tok, [record], kind, None if unedited is None else [unedited], settings)[0]


def wild_scores_many(model: nn.Module, tok: PreTrainedTokenizerBase, records: Sequence[dict], kind: str,
                     unedited: Sequence[Sequence[Sequence[int]]] | None = None,
                     settings: WildSettings = WildSettings()) -> list[dict[str, Any]]:
    """``wild_scores`` of every record, their prompts generated together in one batched pass (the same
    answers as record by record: batched greedy generation equals one prompt at a time)."""
    groups = [wild_pairs(r, kind) for r in records]
    prompts = [p for g in groups for pairs in g.values() for p, _ in pairs]
    gens = iter(generate_answers(model, tok, prompts, settings))
    return [_scores_of(record, g, gens, None if unedited is None else unedited[i]) for i, (record, g) in
            enumerate(zip(records, groups))]


def _scores_of(record: dict, groups: dict[str, Pairs], gens: Iterator[Generation],
               unedited: Sequence[Sequence[int]] | None) -> dict[str, Any]:
    """One record's scores from its generations (taken from ``gens`` in the order of ``groups``)."""
    out: dict[str, Any] = {}
    answers: dict[str, list[str]] = {}
    stopped: dict[str, list[str]] = {}
    for group, pairs in groups.items():
        got = [next(gens) for _ in pairs]
        for score, values in answer_scores([g.text for g in got], [t for _, t in pairs]).items():
            out[f"wild_{group}_{score}"] = values
        answers[group], stopped[group] = [g.text for g in got], [g.stopped_by for g in got]
        if group == NEIGHBORHOOD and unedited is not None:
            if len(unedited) != len(got):
                raise ValueError(f"case {record.get('case_id')!r}: {len(unedited)} unedited WILD answers "
                                 f"but {len(got)} neighbourhood prompts")
            out["wild_neighborhood_prompts_unchanged"] = [list(g.token_ids) == list(u) for g, u in zip(got, unedited)]
    out["wild_answers"], out["wild_stopped_by"] = answers, stopped
    return out
