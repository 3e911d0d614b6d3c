"""Issue 14.4: the statistics use ROME's seeded random sample of the corpus, not its first texts."""
from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from editing.corpus import Corpus
from editing.corpus_sample import draw_sample
from editing.layer_stats import layer_stats
from tests.test_layer_stats import _direct_mom2, _modules, _paths
from util.tiny_models import make_model, make_tokenizer

WORDS = ["Paris", "Rome", "Berlin", "Madrid", "London", "Tokyo", "Spain", "Italy", "France", "Germany", "Japan",
         "English", "French", "Dutch"]
# Twelve documents of different lengths; an empty record at position 7 (ROME skips such rows).
DOCS12 = [" ".join(WORDS[(i * 5) % len(WORDS):][: 2 + (i * 3) % 9]) + f" is number {i}." for i in range(12)]
DOCS12[7] = ""


def rome_positions(size: int, n: int, seed: int = 1) -> list[int]:
    """ROME's FixedRandomSubsetSampler(seed=random_sample=1, end=n), written from its definition."""
    order = list(range(size))
    random.Random(seed).shuffle(order)
    return order[:n]


@pytest.fixture
def corpus12(tmp_path: Path) -> Path:
    path = tmp_path / "twelve.jsonl"
    path.write_text("".join(f'{{"text": "{d}"}}\n' for d in DOCS12), encoding="utf-8")
    return path


def _collect(model, paths, corpus, modules, n, **kw):
    return layer_stats(model, make_tokenizer(), modules, str(corpus), n, paths, "tiny", dtype="float64",
                       max_length=16, batch_tokens=40, progress=False, **kw)


def test_statistics_use_the_seeded_sample_not_the_first_texts(tmp_path, corpus12, caplog):
    """Fails on first-n sampling: the moment must be that of ROME's seed-1 sample of record positions."""
    model, tok = make_model("llama"), make_tokenizer()
    module = _modules(model, [2])[0]
    n = 5
    drawn = [DOCS12[p] for p in rome_positions(len(DOCS12), n) if DOCS12[p]]
    first = [d for d in DOCS12 if d][:n]
    assert sorted(drawn) != sorted(first)  # the test can tell the two apart
    with caplog.at_level(logging.INFO, logger="editing.layer_stats"):
        stats = _collect(model, _paths(tmp_path), corpus12, [module], n)
    moment = stats[module]
    torch.testing.assert_close(moment.mom2(), _direct_mom2(model, tok, drawn, module, 16), rtol=1e-5, atol=1e-7)
    assert not torch.allclose(moment.mom2(), _direct_mom2(model, tok, first, module, 16), rtol=1e-5, atol=1e-7)
    assert moment.count == sum(min(len(tok(d)["input_ids"]), 16) for d in drawn)
    assert (moment.meta.sampling, moment.meta.sample_seed, moment.meta.corpus_size) == ("seeded", 1, 12)
    assert moment.meta.n_samples == len(drawn) and moment.meta.n_samples_requested == n
    assert "seed 1" in caplog.text
    with np.load(next((tmp_path / "stats" / "tiny").rglob("*.npz"))) as f:
        assert int(f["meta.sample_seed"]) == 1 and str(f["meta.sampling"]) == "seeded"


def test_the_draw_is_romes_and_the_whole_corpus_when_n_is_large(corpus12):
    from editing.corpus import open_corpus

    corpus = open_corpus(str(corpus12))
    sample = draw_sample(corpus, 5)
    assert sample.positions == sorted(p for p in rome_positions(12, 5) if DOCS12[p])  # kept in corpus order
    everything = draw_sample(corpus, 50)
    assert sorted(everything.positions) == [p for p in range(12) if DOCS12[p]] and everything.whole_corpus
    assert draw_sample(corpus, 5, seed=2).positions != sample.positions
    assert draw_sample(corpus, 5, seed=None).texts == [d for d in DOCS12 if d][:5]


def test_whole_corpus_gives_the_same_statistics_for_any_seed(tmp_path, corpus12):
    model = make_model("gpt2")
    module = _modules(model, [1])
    a = _collect(model, _paths(tmp_path / "a"), corpus12, module, 100)[module[0]]
    b = _collect(model, _paths(tmp_path / "b"), corpus12, module, 100, sample_seed=7)[module[0]]
    assert a.count == b.count
    torch.testing.assert_close(a.mom2(), b.mom2(), rtol=1e-12, atol=1e-15)


def test_streamed_corpus_is_sampled_over_its_announced_length_and_read_only_that_far():
    read = []

    def reader():
        for i, text in enumerate(DOCS12):
            read.append(i)
            yield text

    stream = Corpus("stream", "stream", "fake:stream", reader, streamed_size=lambda: len(DOCS12))
    sample = draw_sample(stream, 4)
    positions = rome_positions(12, 4)
    assert sample.positions == sorted(p for p in positions if DOCS12[p]) and sample.sampling == "seeded"
    assert read == list(range(max(positions) + 1))
    unknown = Corpus("stream", "stream", "fake:stream", reader, streamed_size=lambda: None)
    assert draw_sample(unknown, 3).sampling == "first"


def test_cache_of_another_sample_is_recomputed(tmp_path, corpus12):
    model = make_model("gpt2")
    paths = _paths(tmp_path)
    module = _modules(model, [0])
    _collect(model, paths, corpus12, module, 5)
    again = _collect(model, paths, corpus12, module, 5)
    assert again.run.layers_loaded == module
    other = _collect(model, paths, corpus12, module, 5, sample_seed=3)
    assert other.run.layers_computed == module and other[module[0]].meta.sample_seed == 3


def test_cache_written_before_seeded_sampling_is_recomputed(tmp_path, corpus12):
    """A harness file without meta.sampling was drawn from the first texts: not the sample asked for."""
    model = make_model("gpt2")
    paths = _paths(tmp_path)
    module = _modules(model, [0])
    _collect(model, paths, corpus12, module, 5, sample_seed=None)  # what the code before wrote, less the new fields
    path = next((paths.stats_dir / "tiny").rglob("*.npz"))
    with np.load(path) as f:
        old = {k: f[k] for k in f.files if k not in ("meta.sampling", "meta.sample_seed", "meta.corpus_size", "meta.world_size")}
    np.savez(path, **old)
    again = _collect(model, paths, corpus12, module, 5)
    assert again.run.layers_computed == module
