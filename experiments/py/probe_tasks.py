"""The general-ability probe tasks of AlphaEdit's ``glue_eval/`` (jianghoucheng/AlphaEdit @ f5248d3):
the prompt formats, label words and labels of each task, written out as data.

Each item is asked with ``question`` (filled from the record), preceded by up to
``n_few_shots`` solved examples (``shot``, filled with the answer word) taken from the file's first
records; every label word is then scored by its mean NLL after the prompt (experiments/py/capability.py).
The texts are upstream's character for character, including its irregularities (SST-2's question
has no space after ``Review :`` while its few-shot lines do; CoLA's question ends in ``"Answer: "``).

One deliberate difference: RTE. In GLUE (and in ../shared/data/glue_eval/rte.json) label 0 is
*entailment*; upstream's ``rte_eval.py`` writes label 0 as "False" in its few-shot lines and scores
" True" as label 1, so its RTE accuracy is one minus the model's. Here entailment is "True".
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

LETTERS = ("A", "B", "C", "D")

_SENTIMENT_INSTRUCTION = (
    "For each snippet of text,label the sentiment of the text as positive or negative."
    "The answer should be exact 'positive' or 'negative'. text:"
)
_DIALOGUE_QUESTION = (
    "Q: Given the following: {article}\nWhich choice is correct?\n"
    "(A){o0}\n(B){o1}\n(C){o2}\n(D){o3}\nAnswer:"
)
_MMLU_QUESTION = "Question: {question}\n(A) {c0}\n(B) {c1}\n(C) {c2}\n(D) {c3}\nAnswer:"


def _same(record: dict) -> dict:
    return record


def _choices(record: dict) -> dict:
    return {**record, **{f"c{i}": c for i, c in enumerate(record["choices"])}}


def _options(record: dict) -> dict:
    return {**record, **{f"o{i}": o for i, o in enumerate(record["options"])}}


@dataclasses.dataclass(frozen=True)
class ProbeTask:
    """One probe set: its file in glue_eval/, how an item is asked, and the words that answer it."""

    name: str
    file: str
    question: str  # str.format template over ``fields(record)``
    shot: str  # the same, with ``{label_word}``: one solved example of the few-shot context
    label_words: tuple[str, ...]  # label index -> the word scored after the prompt (with a leading space)
    label: Callable[[dict], int]
    fields: Callable[[dict], dict] = _same
    shot_margin: int = 0  # upstream stops adding shots when the context left drops below this

    def question_text(self, record: dict) -> str:
        return self.question.format(**self.fields(record))

    def shot_text(self, record: dict) -> str:
        return self.shot.format(**self.fields(record), label_word=self.label_words[self.label(record)])


def _int_label(record: dict) -> int:
    return int(record["label"])


def _answer_index(record: dict) -> int:
    return int(record["answer"])


def _letter(record: dict) -> int:
    return LETTERS.index(record["answers"])


def _nli_label(record: dict) -> int:
    return 1 if record["label"] == "entailment" else 0


def _tasks() -> dict[str, ProbeTask]:
    mrpc = "Are the sentences paraphrases of each other.\nSentence 1: {sentence1}\nSentence 2: {sentence2}\nAnswer:"
    cola = "Is this sentence linguistically acceptable?\nSentence: {sentence}\nAnswer:"
    rte = "{sentence1}\nquestion: {sentence2} True or False?\nanswer:"
    nli = "{sentence1} entails the {sentence2} True or False? Answer:"
    sentiment = _SENTIMENT_INSTRUCTION + " {sentence} answer:"
    tasks = [
        ProbeTask("sst2", "sst2.json", "Review :{sentence}\nSentiment :", "Review : {sentence}\nSentiment : {label_word}\n",
                  ("negative", "positive"), _int_label),
        ProbeTask("mrpc", "mrpc.json", mrpc, mrpc + " {label_word}\n", ("No", "Yes"), _int_label),
        ProbeTask("cola", "cola.json", cola + " ", cola + " {label_word}\n", ("No", "Yes"), _int_label),
        ProbeTask("rte", "rte.json", rte, rte + " {label_word}\n", ("True", "False"), _int_label),
        ProbeTask("mmlu", "mmlu.json", _MMLU_QUESTION, _MMLU_QUESTION + " {label_word}\n", LETTERS, _answer_index, _choices),
        ProbeTask("nli", "nli.json", nli, nli + " {label_word}\n", ("False", "True"), _nli_label),
        ProbeTask("sentiment_analysis", "sentiment_analysis.json", sentiment, sentiment + " {label_word}\n",
                  ("negative", "positive"), _int_label),
        ProbeTask("dialogue", "dialogue.json", _DIALOGUE_QUESTION, _DIALOGUE_QUESTION + " {label_word}\n\n", LETTERS,
                  _letter, _options, shot_margin=5),
    ]
    return {t.name: t for t in tasks}


PROBE_TASKS: dict[str, ProbeTask] = _tasks()
# The six AlphaEdit's experiments/evaluate.py runs (sentiment_analysis and dialogue on request).
DEFAULT_TASKS = ("sst2", "mrpc", "cola", "rte", "mmlu", "nli")


def record_fields_ok(task: ProbeTask, record: Any) -> bool:
    """Whether a record can be asked and labelled (used to reject a malformed probe file early)."""
    try:
        task.shot_text(record)
    except (KeyError, IndexError, TypeError, ValueError):
        return False
    return True
