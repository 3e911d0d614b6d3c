"""Issue 14.5a: ROME's official statistics files (rome.baulab.info/data/stats/) load as they are.

The synthetic files here are written the way ROME's ``util.runningstats.save_cached_state`` writes
them: ``numpy.savez`` of ``CombinedStat(mom2=SecondMoment()).state_dict()`` plus tally's
``sample_size``, i.e. ``mom2.constructor`` (str), ``mom2.count`` (int), ``mom2.mom2`` (the float32
SUM of k k^T) and ``sample_size``, at ``<model>/wikipedia_stats/<module>_float32_mom2_<n>.npz``
with ``<model>`` = ``_name_or_path.replace("/", "_")``.
"""
from __future__ import annotations

import types
from pathlib import Path

import numpy as np
import pytest
import torch

from editing import layer_stats as layer_stats_mod
from editing.layer_stats import layer_stats
from editing.resources import EditResources
from tests.test_layer_stats import _modules, _paths
from util.tiny_models import make_model, make_tokenizer

N_OFFICIAL = 100000


def write_rome_file(stats_dir: Path, model_dir: str, module: str, keys: torch.Tensor) -> Path:
    """One module's file exactly as ROME's layer_stats/tally save it (float32 precision)."""
    path = stats_dir / model_dir / "wikipedia_stats" / f"{module}_float32_mom2_{N_OFFICIAL}.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    k = keys.float()
    state = {
        "mom2.constructor": "util.runningstats.SecondMoment()",
        "mom2.count": k.shape[0],
        "mom2.mom2": (k.T @ k).numpy(),
        "sample_size": N_OFFICIAL,
    }
    np.savez(path, **state)
    return path


@pytest.fixture
def no_collection(monkeypatch):
    """Any attempt to reach the corpus (so to collect) fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("the corpus was opened: statistics were about to be collected")

    monkeypatch.setattr(layer_stats_mod, "open_corpus", refuse)


def _forward_counter(model):
    calls = []
    return calls, model.register_forward_pre_hook(lambda *_: calls.append(1))


@pytest.mark.parametrize("slug,name_or_path,model_dir", [
    ("gpt2-xl", "gpt2-xl", "gpt2-xl"),  # hub id: the harness's slug is ROME's folder name
    ("EleutherAI_gpt-j-6B", "EleutherAI/gpt-j-6B", "EleutherAI_gpt-j-6B"),
    ("gpt-j-6B", "/models/gpt-j-6B", "EleutherAI_gpt-j-6B"),  # a local copy: found under ROME's <org>_<name>
])
def test_official_file_loads_without_collection(tmp_path, no_collection, slug, name_or_path, model_dir):
    model = make_model("gpt2")
    model.config._name_or_path = name_or_path
    module = _modules(model, [1])[0]
    keys = torch.randn(300, 256, generator=torch.Generator().manual_seed(0)) * 3
    write_rome_file(tmp_path / "stats", model_dir, module, keys)
    calls, handle = _forward_counter(model)
    try:
        stats = layer_stats(model, make_tokenizer(), [module], "wikipedia", N_OFFICIAL, _paths(tmp_path), slug, progress=False)
    finally:
        handle.remove()
    moment = stats[module]
    assert calls == [] and stats.run.layers_loaded == [module] and stats.run.layers_computed == []
    assert moment.origin == "rome" and moment.count == 300
    assert (moment.meta.sampling, moment.meta.sample_seed, moment.meta.n_samples_requested) == ("seeded", 1, N_OFFICIAL)
    expected = (keys.float().T @ keys.float()).double() / 300  # ROME saves the SUM: E[kk^T] = mom2 / count
    torch.testing.assert_close(moment.mom2(), expected, rtol=0, atol=0)
    assert moment.mom2().dtype == torch.float64


def test_official_files_serve_an_edit_run_without_collection(tmp_path, no_collection):
    """The run's path (EditResources.covariances, as ROME/WilKE/MEMIT call it) loads them too."""
    model = make_model("gpt2")
    model.config._name_or_path = "gpt2-xl"
    modules = _modules(model, [0, 2])
    gen = torch.Generator().manual_seed(1)
    for module in modules:
        write_rome_file(tmp_path / "stats", "gpt2-xl", module, torch.randn(400, 256, generator=gen))
    hparams = types.SimpleNamespace(mom2_dataset="wikipedia", mom2_n_samples=N_OFFICIAL, mom2_dtype="float32",
                                    mom2_max_length=None, mom2_sample_seed=1)
    calls, handle = _forward_counter(model)
    try:
        resources = EditResources(_paths(tmp_path), "gpt2-xl", progress=False)
        covariances = resources.covariances(model, make_tokenizer(), hparams, modules)
    finally:
        handle.remove()
    assert calls == [] and set(covariances) == set(modules)


def test_official_file_with_wrong_width_is_not_used(tmp_path, monkeypatch):
    """A file of another model (other width) under the same name is recomputed, not trusted."""
    model = make_model("gpt2")
    module = _modules(model, [1])[0]
    write_rome_file(tmp_path / "stats", "tiny", module, torch.randn(10, 64))
    corpus = tmp_path / "c.txt"
    corpus.write_text("Paris is in France.\n\nRome is in Italy.\n")
    opened = []
    monkeypatch.setattr(layer_stats_mod, "corpus_slug", lambda name, paths=None: "wikipedia")
    real_open = layer_stats_mod.open_corpus
    monkeypatch.setattr(layer_stats_mod, "open_corpus", lambda name, paths=None: opened.append(1) or real_open(str(corpus)))
    stats = layer_stats(model, make_tokenizer(), [module], "wikipedia", N_OFFICIAL, _paths(tmp_path), "tiny", progress=False)
    assert opened and stats.run.layers_computed == [module] and stats[module].dim == 256


def test_cache_names_are_known_without_opening_the_corpus(tmp_path):
    """``corpus_slug`` (used before any collection) names the same folder the opened corpus would."""
    from editing.corpus import CorpusNotFoundError, corpus_slug, open_corpus

    local = tmp_path / "c.jsonl"
    local.write_text('{"text": "one"}\n')
    for name in ("wikipedia_summaries", "wikitext2", str(local)):
        try:
            assert corpus_slug(name) == open_corpus(name).slug
        except CorpusNotFoundError:
            continue
    assert corpus_slug("wikipedia") == "wikipedia" and corpus_slug("wikimedia_wikipedia") == "wikimedia_wikipedia"


def test_official_file_is_not_used_for_another_truncation(tmp_path, monkeypatch):
    """ROME made its files from texts cut at the model's context; a request for shorter texts
    (an hparams ``mom2_max_length``) recomputes instead of reusing them."""
    model = make_model("gpt2")  # context 128
    module = _modules(model, [1])[0]
    keys = torch.randn(10, 256, generator=torch.Generator().manual_seed(2))
    write_rome_file(tmp_path / "stats", "tiny", module, keys)
    corpus = tmp_path / "c.txt"
    corpus.write_text("Paris is in France.\n\nRome is in Italy.\n")
    monkeypatch.setattr(layer_stats_mod, "corpus_slug", lambda name, paths=None: "wikipedia")
    real_open = layer_stats_mod.open_corpus
    monkeypatch.setattr(layer_stats_mod, "open_corpus", lambda name, paths=None: real_open(str(corpus)))
    args = (model, make_tokenizer(), [module], "wikipedia", N_OFFICIAL, _paths(tmp_path), "tiny")
    at_context = layer_stats(*args, progress=False)
    assert at_context.run.layers_loaded == [module] and at_context[module].origin == "rome"
    shorter = layer_stats(*args, max_length=16, progress=False)
    assert shorter.run.layers_computed == [module] and shorter[module].meta.max_length == 16
