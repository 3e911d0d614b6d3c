"""General-ability probes (AlphaEdit's ``glue_eval``) and WikiText perplexity, for checking whether
an edited model keeps what it could do.

Scored as AlphaEdit's ``glue_eval/*_eval.py`` scores its ``f1_new``: each item's prompt is the
few-shot context (the first ``n_few_shots`` records of the file, added while they fit in the
model's context less 5 tokens, upstream's ``gen_len``) followed by the task's question
(experiments/py/probe_tasks.py); every label word, with a leading space, is scored by its mean NLL
over its tokens after the prompt, and the smallest wins (a tie goes to the lower label index).
Items are the records after the first 10 (upstream's ``FEW_SHOT_TEST_SPLIT``), the first
``n_items`` of them. Reported per task: accuracy, F1 (sklearn, ``average='weighted'``, as upstream),
Matthews correlation (upstream reports it for every task; it is the usual CoLA score), and the
majority-label rate of the items (the accuracy a constant answer gets).

Differences from upstream, each on purpose:
- upstream's ``correct``/``mcc``/``f1`` come from 3-10 greedily generated tokens searched for the
  label word (``'no' in text`` and the like); only ``f1_new`` is the NLL choice. Here every score is
  the NLL choice, which needs no generation and cannot be "invalid";
- defaults are AlphaEdit's own run (``GLUEEval(model, tok, number_of_tests=100)``: 100 items, no
  few-shot examples; its evaluate.py runs the six tasks of ``DEFAULT_TASKS``);
- RTE's labels are not inverted (see probe_tasks.py).

``check_capability_settings`` validates task names and finds every file before a model is loaded;
``CapabilityProbe(settings).run(model, tok)`` returns the scores as a JSON-ready dict.
"""
from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from sklearn.metrics import f1_score, matthews_corrcoef
from torch import nn
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from experiments.py.perplexity import PerplexitySettings, find_wikitext_test, perplexity
from experiments.py.probe_tasks import DEFAULT_TASKS, PROBE_TASKS, ProbeTask, record_fields_ok
from util.architectures import context_length
from util.globals import REPO_ROOT, Paths
from util.scoring import (
    final_hidden,
    lm_logits,
    model_device,
    pad_right,
    pad_token_id,
    prompt_ids,
    score_targets,
    target_ids,
)

FEW_SHOT_SPLIT = 10  # upstream: the first 10 records may be few-shot examples, items come after them
GEN_LEN_RESERVE = 5  # upstream's GLUEEval.evaluate(gen_len=5), kept free when fitting few-shot examples
GLUE_DIR_NAME = "glue_eval"


class ProbeSetupError(ValueError):
    """The probe settings name a task that does not exist or a file that is missing."""


@dataclasses.dataclass(frozen=True)
class CapabilitySettings:
    tasks: tuple[str, ...] = DEFAULT_TASKS
    n_items: int = 100
    n_few_shots: int = 0
    batch_size: int = 8
    perplexity: PerplexitySettings | None = dataclasses.field(default_factory=PerplexitySettings)  # None: none
    glue_dir: str | None = None  # the one folder to read the probe files from; None: search

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def glue_eval_dirs(settings: CapabilitySettings, paths: Paths | None = None) -> list[Path]:
    """Folders searched for the probe files: ``settings.glue_dir`` alone when given; otherwise
    ``glue_eval/`` beside DATA_DIR and its fallbacks (../shared/data/glue_eval here), then beside
    the repository's data/ and in ../shared/data."""
    if settings.glue_dir is not None:
        return [Path(settings.glue_dir).expanduser().resolve()]
    dirs = [d.parent / GLUE_DIR_NAME for d in (paths.data_dir, *paths.data_dir_fallbacks)] if paths is not None else []
    dirs += [REPO_ROOT / "data" / GLUE_DIR_NAME, REPO_ROOT.parent / "shared" / "data" / GLUE_DIR_NAME]
    return list(dict.fromkeys(d.resolve() for d in dirs))


def _task_file_problem(task: ProbeTask, dirs: Sequence[Path], settings: CapabilitySettings) -> tuple[Path | None, str]:
    found = next((d / task.file for d in dirs if (d / task.file).is_file()), None)
    if found is None:
        return None, f"{task.name}: {task.file} not found in any of {', '.join(map(str, dirs))}"
    records = json.loads(found.read_text(encoding="utf-8"))
    if not isinstance(records, list) or len(records) < FEW_SHOT_SPLIT + settings.n_items:
        return None, f"{task.name}: {found} needs {FEW_SHOT_SPLIT} + n_items={settings.n_items} records"
    bad = next((i for i, r in enumerate(records[: FEW_SHOT_SPLIT + settings.n_items]) if not record_fields_ok(task, r)), None)
    if bad is not None:
        return None, f"{task.name}: {found} record {bad} lacks the fields its prompt or label needs"
    return found, ""


def check_capability_settings(settings: CapabilitySettings, paths: Paths | None = None) -> dict[str, Path]:
    """Every file the probes read, by task name (and ``perplexity``); one ProbeSetupError listing
    every problem otherwise. Cheap: call it before loading a model."""
    problems = []
    unknown = [t for t in settings.tasks if t not in PROBE_TASKS]
    if unknown:
        problems.append(f"unknown probe task(s) {', '.join(unknown)}; known: {', '.join(PROBE_TASKS)}")
    if not 0 <= settings.n_few_shots <= FEW_SHOT_SPLIT or settings.n_items < 1 or settings.batch_size < 1:
        problems.append(f"need 0 <= n_few_shots <= {FEW_SHOT_SPLIT}, n_items >= 1, batch_size >= 1; got {settings}")
    files: dict[str, Path] = {}
    dirs = glue_eval_dirs(settings, paths)
    for name in (t for t in settings.tasks if t in PROBE_TASKS):
        found, problem = _task_file_problem(PROBE_TASKS[name], dirs, settings)
        if found is None:
            problems.append(problem)
        else:
            files[name] = found
    if settings.perplexity is not None:
        try:
            files["perplexity"] = find_wikitext_test(settings.perplexity, paths)
        except FileNotFoundError as e:
            problems.append(str(e))
    if problems:
        raise ProbeSetupError("capability probes: " + "; ".join(problems))
    return files


def fit_few_shots(tok: PreTrainedTokenizerBase, task: ProbeTask, shots: Sequence[dict], question: str, context: int) -> str:
    """Upstream's few-shot context: shots in order while the context left stays above the task's margin."""
    remaining = context - len(prompt_ids(tok, question)) - GEN_LEN_RESERVE
    text = ""
    for shot in shots:
        shot_text = task.shot_text(shot)
        remaining -= len(prompt_ids(tok, shot_text))
        if remaining < task.shot_margin:
            break
        text += shot_text
    return text


@torch.no_grad()
def _single_token_nlls(model: nn.Module, tok: PreTrainedTokenizerBase, prompts: Sequence[str],
                       label_ids: Sequence[int], batch_size: int) -> list[list[float]]:
    """One forward pass per prompt: the NLL of each one-token label word at the prompt's end."""
    device = model_device(model)
    encoded = [prompt_ids(tok, p) for p in prompts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    out: list[list[float]] = [[] for _ in encoded]
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        ids, mask = pad_right([encoded[i] for i in rows], pad_token_id(tok), device)
        hidden = final_hidden(model, ids, mask)
        last = hidden[torch.arange(len(rows), device=device), mask.sum(1) - 1]
        logp = torch.log_softmax(lm_logits(model, last).float(), dim=-1)[:, list(label_ids)]
        for row, values in zip(rows, (-logp).tolist()):
            out[row] = values
    return out


def label_nlls(model: nn.Module, tok: PreTrainedTokenizerBase, prompts: Sequence[str], words: Sequence[str],
               batch_size: int = 8) -> list[list[float]]:
    """Per prompt, the mean NLL of each word (with a leading space) right after it."""
    encoded = [target_ids(tok, w) for w in words]
    if all(len(ids) == 1 for ids in encoded):
        return _single_token_nlls(model, tok, prompts, [ids[0] for ids in encoded], batch_size)
    scores = score_targets(model, tok, [p for p in prompts for _ in words], [w for _ in prompts for w in words], batch_size)
    return [[s.nll for s in scores[i * len(words) : (i + 1) * len(words)]] for i in range(len(prompts))]


def classification_scores(labels: Sequence[int], predictions: Sequence[int]) -> dict:
    counts = [list(labels).count(v) for v in set(labels)]
    return {
        "accuracy": sum(int(p == y) for p, y in zip(predictions, labels)) / len(labels),
        "f1": float(f1_score(labels, predictions, average="weighted", zero_division=0)),
        "mcc": float(matthews_corrcoef(labels, predictions)),
        "majority_rate": max(counts) / len(labels),
        "items": len(labels),
    }


def score_task(model: nn.Module, tok: PreTrainedTokenizerBase, task: ProbeTask, records: Sequence[dict],
               settings: CapabilitySettings) -> dict:
    """One task's scores over its first ``settings.n_items`` items."""
    shots = records[: settings.n_few_shots]
    items = records[FEW_SHOT_SPLIT : FEW_SHOT_SPLIT + settings.n_items]
    context = context_length(model)
    questions = [task.question_text(r) for r in items]
    prompts = [fit_few_shots(tok, task, shots, q, context) + q for q in questions]
    longest = max(len(prompt_ids(tok, p)) for p in prompts) + max(len(target_ids(tok, w)) for w in task.label_words)
    if longest > context:  # upstream would fail on it too; say why instead of an index error
        raise ProbeSetupError(f"{task.name}: an item with its label needs {longest} tokens, more than the model's "
                              f"context of {context}; give --capability_items fewer items or drop the task")
    nlls = label_nlls(model, tok, prompts, task.label_words, settings.batch_size)
    predictions = [min(range(len(row)), key=row.__getitem__) for row in nlls]
    return classification_scores([task.label(r) for r in items], predictions)


class CapabilityProbe:
    """The probe sets and the perplexity slice, read once; ``run`` scores a model on all of them."""

    def __init__(self, settings: CapabilitySettings = CapabilitySettings(), paths: Paths | None = None):
        self.settings = settings
        self.files = check_capability_settings(settings, paths)
        self.records = {name: json.loads(self.files[name].read_text(encoding="utf-8")) for name in settings.tasks}

    def run(self, model: nn.Module, tok: PreTrainedTokenizerBase) -> dict:
        """{task: scores, 'perplexity': {...}, 'seconds': {...}}, JSON-ready."""
        results: dict = {}
        seconds: dict[str, float] = {}
        for name in tqdm(self.settings.tasks, desc="general-ability probes", unit="task", leave=False, disable=None):
            start = time.perf_counter()
            results[name] = score_task(model, tok, PROBE_TASKS[name], self.records[name], self.settings)
            seconds[name] = time.perf_counter() - start
        if self.settings.perplexity is not None:
            start = time.perf_counter()
            results["perplexity"] = perplexity(model, tok, self.files["perplexity"], self.settings.perplexity)
            seconds["perplexity"] = time.perf_counter() - start
        results["seconds"] = seconds
        return results
