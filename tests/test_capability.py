"""General-ability probes and perplexity: scores equal a direct computation on a tiny model."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from sklearn.metrics import f1_score, matthews_corrcoef

from experiments.py.capability import (
    GEN_LEN_RESERVE,
    CapabilityProbe,
    CapabilitySettings,
    ProbeSetupError,
    check_capability_settings,
    fit_few_shots,
    label_nlls,
)
from experiments.py.perplexity import PerplexitySettings, perplexity, slice_ids
from experiments.py.probe_tasks import PROBE_TASKS
from util.scoring import target_ids
from util.tiny_models import TRAINING_TEXT, make_model, make_tokenizer

TOK = make_tokenizer()
SENTENCES = [s.strip() for s in TRAINING_TEXT.split(".")[:15] if s.strip()]
SHARED_GLUE = Path(__file__).resolve().parents[2] / "shared" / "data" / "glue_eval"


def write_probe_files(folder: Path) -> None:
    """Short SST-2 and CoLA files over the tiny vocabulary: 10 possible shots, then 6 items."""
    records = [{"sentence": s, "label": i % 2, "idx": i} for i, s in enumerate(SENTENCES[:13] + SENTENCES[:3])]
    (folder / "sst2.json").write_text(json.dumps(records))
    (folder / "cola.json").write_text(json.dumps(records[::-1]))


def upstream_nll(model, prompt: str, word: str) -> float:
    """AlphaEdit's computation: tokenize prompt + " " + word at once, average the word's token NLLs."""
    full = TOK(f"{prompt} {word}", return_tensors="pt")["input_ids"]
    start = len(TOK(prompt)["input_ids"])
    word_ids = TOK(f" {word}")["input_ids"]
    logp = torch.log_softmax(model(full).logits[0].float(), dim=-1)
    return sum(-logp[start + j - 1, t].item() for j, t in enumerate(word_ids)) / len(word_ids)


def direct_scores(model, records, shot: str, question: str, words: tuple[str, ...], n_shots: int, n_items: int) -> dict:
    context = "".join(shot.format(s=r["sentence"], a=words[r["label"]]) for r in records[:n_shots])
    items = records[10 : 10 + n_items]
    preds = []
    for r in items:
        nlls = [upstream_nll(model, context + question.format(s=r["sentence"]), w) for w in words]
        preds.append(nlls.index(min(nlls)))
    labels = [r["label"] for r in items]
    return {"accuracy": sum(p == y for p, y in zip(preds, labels)) / len(labels),
            "f1": f1_score(labels, preds, average="weighted", zero_division=0), "mcc": matthews_corrcoef(labels, preds)}


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_probe_scores_equal_a_direct_computation(tmp_path, arch):
    write_probe_files(tmp_path)
    model = make_model(arch, seed=5, context=512)
    settings = CapabilitySettings(tasks=("sst2", "cola"), n_items=6, n_few_shots=2, perplexity=None, glue_dir=str(tmp_path))
    got = CapabilityProbe(settings).run(model, TOK)
    assert len(target_ids(TOK, "positive")) > 1 and len(target_ids(TOK, "Yes")) > 1  # the multi-token path
    records = json.loads((tmp_path / "sst2.json").read_text())
    want = direct_scores(model, records, "Review : {s}\nSentiment : {a}\n", "Review :{s}\nSentiment :",
                         ("negative", "positive"), 2, 6)
    cola = json.loads((tmp_path / "cola.json").read_text())
    prefix = "Is this sentence linguistically acceptable?\nSentence: {s}\nAnswer:"
    want_cola = direct_scores(model, cola, prefix + " {a}\n", prefix + " ", ("No", "Yes"), 2, 6)
    for task, expected in (("sst2", want), ("cola", want_cola)):
        assert got[task]["items"] == 6 and got[task]["majority_rate"] == 0.5
        for key, value in expected.items():
            assert got[task][key] == pytest.approx(value), (task, key)
    assert set(got["seconds"]) == {"sst2", "cola"}


def test_few_shots_are_added_while_they_fit():
    task, shots = PROBE_TASKS["sst2"], [{"sentence": s, "label": 1} for s in SENTENCES[:3]]
    question = task.question_text({"sentence": "Rome", "label": 0})
    need = [len(TOK(task.shot_text(s))["input_ids"]) for s in shots]
    base = len(TOK(question)["input_ids"]) + GEN_LEN_RESERVE
    assert fit_few_shots(TOK, task, shots, question, base + need[0] + need[1]) == task.shot_text(shots[0]) + task.shot_text(shots[1])
    assert fit_few_shots(TOK, task, shots, question, base + need[0] + need[1] - 1) == task.shot_text(shots[0])
    assert fit_few_shots(TOK, task, shots, question, base - 1) == ""


@pytest.mark.parametrize("words", [("Rome", "London", "the"), ("positive", "negative", "Rome")])
def test_label_nlls_agree_with_upstream(words):
    """One forward pass per prompt when every word is one token; teacher-forced pairs otherwise."""
    model = make_model("llama", seed=2)
    prompts = ["The Eiffel Tower is located in the city of", "Berlin is", "Tokyo is the capital of Japan. London"]
    got = label_nlls(model, TOK, prompts, words, batch_size=2)
    for row, prompt in zip(got, prompts):
        assert row == pytest.approx([upstream_nll(model, prompt, w) for w in words], abs=1e-5)


def test_bad_settings_raise_one_error_before_any_model(tmp_path):
    with pytest.raises(ProbeSetupError, match=r"unknown probe task\(s\) sst3; known: sst2, mrpc"):
        check_capability_settings(CapabilitySettings(tasks=("sst3",), perplexity=None))
    with pytest.raises(ProbeSetupError) as err:
        check_capability_settings(CapabilitySettings(tasks=("rte", "boolq"), glue_dir=str(tmp_path),
                                                     perplexity=PerplexitySettings(file=str(tmp_path / "none.raw"))))
    message = str(err.value)
    assert "boolq" in message and f"rte.json not found in any of {tmp_path}" in message and "none.raw not found" in message
    write_probe_files(tmp_path)
    with pytest.raises(ProbeSetupError, match="needs 10 \\+ n_items=100 records"):
        check_capability_settings(CapabilitySettings(tasks=("sst2",), glue_dir=str(tmp_path), perplexity=None))


@pytest.mark.skipif(not SHARED_GLUE.is_dir(), reason="../shared/data/glue_eval is not here")
def test_every_task_formats_its_shared_records_as_upstream():
    files = check_capability_settings(CapabilitySettings(tasks=tuple(PROBE_TASKS), glue_dir=str(SHARED_GLUE)))
    assert set(files) == {*PROBE_TASKS, "perplexity"}
    first = {name: json.loads(files[name].read_text())[0] for name in PROBE_TASKS}
    rte, mmlu = first["rte"], first["mmlu"]
    assert PROBE_TASKS["rte"].question_text(rte) == f"{rte['sentence1']}\nquestion: {rte['sentence2']} True or False?\nanswer:"
    assert PROBE_TASKS["rte"].shot_text({**rte, "label": 0}).endswith("answer: True\n")  # 0 = entailment
    assert PROBE_TASKS["mmlu"].shot_text(mmlu) == (
        f"Question: {mmlu['question']}\n(A) {mmlu['choices'][0]}\n(B) {mmlu['choices'][1]}\n(C) {mmlu['choices'][2]}\n"
        f"(D) {mmlu['choices'][3]}\nAnswer: {'ABCD'[mmlu['answer']]}\n")
    assert PROBE_TASKS["nli"].label(first["nli"]) == (first["nli"]["label"] == "entailment")
    assert PROBE_TASKS["dialogue"].label(first["dialogue"]) == "ABCD".index(first["dialogue"]["answers"])
    assert PROBE_TASKS["sentiment_analysis"].shot_text(first["sentiment_analysis"]).endswith(
        f"text: {first['sentiment_analysis']['sentence']} answer: positive\n")


def test_perplexity_is_exp_of_the_mean_nll(tmp_path):
    text_file = tmp_path / "text.raw"
    text_file.write_text(TRAINING_TEXT)
    model = make_model("gpt2", seed=1)
    settings = PerplexitySettings(n_tokens=100, window=32, batch_size=3, file=str(text_file))
    got = perplexity(model, TOK, text_file, settings)
    ids = TOK(TRAINING_TEXT)["input_ids"][:100]
    assert slice_ids(TOK, TRAINING_TEXT, 100) == ids
    nlls = []
    for start in range(0, 100, 32):  # windows 32, 32, 32, 4: the first token of each is context only
        window = torch.tensor([ids[start : start + 32]])
        logp = torch.log_softmax(model(window).logits[0, :-1].float(), dim=-1)
        nlls += (-logp.gather(1, window[0, 1:, None])).squeeze(1).tolist()
    assert got["predicted_tokens"] == len(nlls) == 96 and got["windows"] == 4
    assert got["perplexity"] == pytest.approx(math.exp(sum(nlls) / len(nlls)), rel=1e-5)
