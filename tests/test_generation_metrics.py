"""Generation tests: ROME's n-gram entropy on known strings, seeded cached sampling, consistency, CLI wiring."""
from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from sklearn.feature_extraction.text import TfidfVectorizer

from experiments.py.generation_metrics import (
    TOP_K,
    ConsistencyReference,
    GenerationTests,
    compute_n_gram_entropy,
    generate_fast,
    load_consistency_reference,
    n_gram_entropy,
    sample_tokens,
    tfidf_similarity,
)
from util.globals import load_paths
from util.scoring import prompt_ids
from util.tiny_models import TinyWorld, make_model, make_tokenizer, rank_one_hparams, tiny_records

# Four distinct words: 3 equally likely bigrams (log2 3 bits), 2 trigrams (1 bit).
FOUR_DISTINCT = (2 / 3 * math.log2(3) + 4 / 3 * 1.0) / 2


@pytest.mark.parametrize("text, expected", [
    ("a b c d", FOUR_DISTINCT),
    ("Paris, France.", FOUR_DISTINCT),  # NLTK splits off ',' and the final '.'
    ("a a a a a", 0.0),
    ("hello", 0.0),  # no bigram at all
    ("a b a b", (2 / 3 * (-(2 / 3) * math.log2(2 / 3) - (1 / 3) * math.log2(1 / 3)) + 4 / 3 * 1.0) / 2),
])
def test_n_gram_entropy_of_known_strings(text, expected):
    assert compute_n_gram_entropy(text) == pytest.approx(expected, abs=1e-12)


def test_n_gram_entropy_averages_over_texts():
    assert n_gram_entropy(["a b c d", "a a a a"]) == pytest.approx(FOUR_DISTINCT / 2)
    assert n_gram_entropy(["the cat sat on the mat " * 5]) < n_gram_entropy(["the cat sat on a red mat near my old dog"])


def test_tfidf_similarity():
    vec = TfidfVectorizer().fit(["paris is in france", "rome is in italy", "berlin germany"])
    assert tfidf_similarity("paris france", "paris france", vec) == pytest.approx(1.0)
    assert tfidf_similarity("paris france", "rome italy", vec) == 0.0
    assert tfidf_similarity("zzz", "paris", vec) == 0.0  # out-of-vocabulary text: no vector, no NaN


def uncached_samples(model, ids, n, max_out_len, generator):
    """The same sampling without a KV cache: the whole sequence is re-run every step."""
    seq = torch.tensor([ids] * n)
    while seq.shape[1] < max_out_len:
        logits = model(input_ids=seq, attention_mask=torch.ones_like(seq)).logits[:, -1, :].float()
        top = torch.topk(logits, TOP_K, dim=-1)
        choice = torch.multinomial(torch.softmax(top.values, dim=-1), 1, generator=generator)
        seq = torch.cat([seq, top.indices.gather(1, choice)], dim=1)
    return seq.tolist()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_cached_sampling_equals_uncached_and_is_seeded(arch):
    model, tok = make_model(arch), make_tokenizer()
    ids = prompt_ids(tok, "The Eiffel Tower is")
    a = sample_tokens(model, ids, 2, 14, torch.Generator().manual_seed(3))
    assert a == uncached_samples(model, ids, 2, 14, torch.Generator().manual_seed(3))
    assert all(len(row) == 14 and row[: len(ids)] == ids for row in a)
    assert a == sample_tokens(model, ids, 2, 14, torch.Generator().manual_seed(3))
    assert a != sample_tokens(model, ids, 2, 14, torch.Generator().manual_seed(4))


def test_generate_fast_returns_prompt_plus_text_per_sample():
    model, tok = make_model("llama"), make_tokenizer()
    texts = generate_fast(model, tok, ["Berlin is", "Tokyo is"], n_gen_per_prompt=2, max_out_len=10)
    assert len(texts) == 4 and texts[0].startswith("Berlin is") and texts[2].startswith("Tokyo is")
    assert generate_fast(model, tok, ["Berlin is the capital of Germany"], max_out_len=3) == ["Berlin is the capital of Germany"]


class Snippets(dict):
    """relation_id -> target_id -> samples, like dsets.AttributeSnippets."""


def test_generation_tests_with_and_without_reference():
    model, tok = make_model("llama"), make_tokenizer()
    record = tiny_records()[0]
    record["requested_rewrite"]["target_new"]["id"] = "Q220"
    plain = GenerationTests(seed=9, max_out_len=12)
    out = plain(model, tok, record)
    assert set(out) == {"ngram_entropy", "text"} and out == plain(model, tok, record)  # seeded per record
    snippets = Snippets(P0={"Q220": [{"name": "Rome", "text": "Rome is the capital of Italy"}]})
    vec = TfidfVectorizer().fit(["Rome is the capital of Italy", "Paris is in France"])
    full = GenerationTests(seed=9, max_out_len=12, reference=ConsistencyReference(snippets, vec))
    scored = full(model, tok, record)
    assert 0.0 <= scored["reference_score"] <= 1.0 and scored["text"] == out["text"]
    record["requested_rewrite"]["target_new"]["id"] = "Q999"  # no snippets for this target
    assert "reference_score" not in full(model, tok, record)
    assert plain(model, tok, {**record, "generation_prompts": []}) == {}


def test_consistency_reference_is_loaded_from_the_data_files(tmp_path):
    snippets = [{"relation_id": "P0", "target_id": "Q220", "samples": [{"name": "Rome", "text": "Rome is in Italy"}]},
                {"relation_id": "P1", "target_id": "Q90", "samples": [{"name": "Paris", "text": "Paris is in France"}]}]
    (tmp_path / "attribute_snippets.json").write_text(json.dumps(snippets))
    reference, reason = load_consistency_reference(load_paths(data_dir=str(tmp_path)), allow_download=False)
    assert reference is not None and reason == ""
    record = tiny_records()[0]
    record["requested_rewrite"]["target_new"]["id"] = "Q220"
    assert reference.score(["Rome is in Italy"], record) == pytest.approx(1.0)


def test_missing_reference_files_skip_consistency_with_a_reason(tmp_path, caplog):
    reference, reason = load_consistency_reference(load_paths(data_dir=str(tmp_path)), allow_download=False)
    assert reference is None and "attribute_snippets.json" in reason and "skipped" in caplog.text


def test_cli_runs_generation_tests_every_interval(tmp_path, caplog):
    from experiments.evaluate import cli

    caplog.set_level(logging.INFO)
    world = TinyWorld(tmp_path, "llama")
    hp = world.write_hparams("ROME", rank_one_hparams("llama", 4, v_num_grad_steps=5))
    args = [a for a in world.cli_args("ROME", hp, edit_times=3, num_threads=1, generation_test_interval=2,
                                      generation_max_out_len=12) if a != "--skip_generation_tests"]
    assert cli(args) == 0
    run_dir = world.results_dir / "ROME" / "run_000"
    posts = {int(p.name.split("_")[1]): json.loads(p.read_text())["post"] for p in run_dir.glob("edit_*.json")}
    assert {n for n, post in posts.items() if "ngram_entropy" in post} == {1, 3}
    assert all(len(posts[n]["text"]) == 1 and "reference_score" not in posts[n] for n in (1, 3))
    meta = json.loads((run_dir / "run.json").read_text())
    assert meta["generation"]["max_out_len"] == 12 and meta["generation"]["consistency"] is False
    assert caplog.text.count("consistency (reference_score) is skipped") == 1
