"""Issue 16.3: statistics that fit (out-of-memory batches retried in halves) and survive a kill (resume).

Both results are compared BITWISE with an undisturbed run: on CPU the forward pass of a row does
not depend on how many rows run beside it, halves keep their batch's padded width and their keys
are concatenated before the product, and a resumed run adds the remaining batches to the saved
float64 sums in the same order.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from editing.layer_stats import StatsOutOfMemoryError, layer_stats
from tests.test_layer_stats import DOCS, _modules, _paths
from util.tiny_models import make_model, make_tokenizer

TEXTS = DOCS * 3  # 21 samples, 7+ batches at the budget below


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    path = tmp_path / "texts.txt"
    path.write_text("\n\n".join(f"{t} ({i})" for i, t in enumerate(TEXTS)) + "\n", encoding="utf-8")
    return path


def _stats(model, paths, corpus, modules, **kw):
    args = {"paths": paths, "model_slug": "tiny", "max_length": 16, "batch_tokens": 64, "progress": False,
            "checkpoint_seconds": math.inf}
    args.update(kw)
    return layer_stats(model, make_tokenizer(), modules, str(corpus), len(TEXTS), **args)


class Injector:
    """A forward pre-hook that raises ``error`` on chosen calls and counts every call."""

    def __init__(self, model, error=None, when=lambda call, rows: False):
        self.calls, self.rows = 0, []
        self.error, self.when = error, when
        self.handle = model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        self.calls += 1
        rows = kwargs["input_ids"].shape[0]
        self.rows.append(rows)
        if self.error is not None and self.when(self.calls, rows):
            raise self.error

    def remove(self):
        self.handle.remove()


def _assert_bitwise(a, b, modules):
    for m in modules:
        assert a[m].count == b[m].count and torch.equal(a[m].sum, b[m].sum)


@pytest.mark.parametrize("error", [torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                                   RuntimeError("[enforce fail] DefaultCPUAllocator: not enough memory: you tried... out of memory")])
def test_oom_batch_is_retried_in_halves_and_gives_identical_statistics(tmp_path, corpus, error):
    model = make_model("llama")
    modules = _modules(model, [0, 2])
    clean = _stats(model, _paths(tmp_path / "clean"), corpus, modules)
    hook = Injector(model, error, when=lambda call, rows: rows > 2)  # every batch of 3+ rows fails
    try:
        retried = _stats(model, _paths(tmp_path / "oom"), corpus, modules)
    finally:
        hook.remove()
    assert retried.run.oom_splits > 0 and max(hook.rows) > 2
    _assert_bitwise(clean, retried, modules)


def test_oom_on_one_sample_raises_a_clear_error(tmp_path, corpus):
    model = make_model("gpt2")
    hook = Injector(model, torch.cuda.OutOfMemoryError("CUDA out of memory."), when=lambda call, rows: True)
    try:
        with pytest.raises(StatsOutOfMemoryError, match="single sample.*mom2_max_length"):
            _stats(model, _paths(tmp_path), corpus, _modules(model, [1]))
    finally:
        hook.remove()


def test_other_errors_are_not_retried(tmp_path, corpus):
    model = make_model("gpt2")
    hook = Injector(model, RuntimeError("shape mismatch"), when=lambda call, rows: True)
    try:
        with pytest.raises(RuntimeError, match="shape mismatch"):
            _stats(model, _paths(tmp_path), corpus, _modules(model, [1]))
        assert hook.calls == 1
    finally:
        hook.remove()


class Killed(Exception):
    pass


class HardKill:
    """At forward call k+1: keep the partial file as it is, then raise; ``restore`` puts that file
    back, discarding what the exception path saved, so the state is what a SIGKILL leaves."""

    def __init__(self, stats_dir: Path, k: int):
        self.stats_dir, self.k = stats_dir, k
        self.snapshot: dict[Path, bytes] = {}

    def __call__(self, call: int, rows: int) -> bool:
        if call == self.k + 1:
            self.snapshot = {p: p.read_bytes() for p in self.stats_dir.rglob("rank*-of-*.npz")}
        return call == self.k + 1

    def restore(self) -> None:
        for p in self.stats_dir.rglob("rank*-of-*.npz"):
            p.unlink()
        for p, data in self.snapshot.items():
            p.write_bytes(data)


@pytest.mark.parametrize("kill,checkpoint_every,expected_done", [
    ("exception", 0, 3),  # an exception saves the finished batches on the way out
    ("hard", 2, 2),  # a hard kill leaves the last periodic checkpoint (every 2 batches)
])
def test_killed_collection_resumes_without_recounting(tmp_path, corpus, kill, checkpoint_every, expected_done):
    model = make_model("llama")
    modules = _modules(model, [1, 3])
    clean = _stats(model, _paths(tmp_path / "clean"), corpus, modules)
    n_batches = clean.run.forward_calls
    paths = _paths(tmp_path / "killed")
    killer = HardKill(paths.stats_dir, k=3)
    hook = Injector(model, Killed("killed after batch 3"), when=killer)
    try:
        with pytest.raises(Killed):
            _stats(model, paths, corpus, modules, checkpoint_every=checkpoint_every)
    finally:
        hook.remove()
    if kill == "hard":
        killer.restore()
    partial = next(paths.stats_dir.rglob("rank0-of-1.npz"))
    with np.load(partial) as saved:
        done = len(saved["done"])
        assert saved[f"sum.{modules[0]}"].dtype == np.float64 and int(saved[f"count.{modules[0]}"]) > 0
    assert done == expected_done
    assert not list(partial.parent.parent.glob("*.npz"))  # no cache file yet

    counter = Injector(model)
    try:
        resumed = _stats(model, paths, corpus, modules)
    finally:
        counter.remove()
    assert counter.calls == n_batches - done and resumed.run.batches_resumed == done
    _assert_bitwise(clean, resumed, modules)
    assert not partial.exists() and not list(paths.stats_dir.rglob("partial_*"))


def test_partial_statistics_of_another_plan_are_not_used(tmp_path, corpus):
    model = make_model("gpt2")
    modules = _modules(model, [1])
    paths = _paths(tmp_path)
    hook = Injector(model, Killed("x"), when=lambda call, rows: call == 3)
    try:
        with pytest.raises(Killed):
            _stats(model, paths, corpus, modules)
    finally:
        hook.remove()
    counter = Injector(model)
    try:
        other = _stats(model, paths, corpus, modules, batch_tokens=32)  # other batches: start afresh
    finally:
        counter.remove()
    assert other.run.batches_resumed == 0 and counter.calls == other.run.forward_calls
