"""Issue 16.4: statistics sharded over 2 processes (gloo, CPU) equal single-process statistics, and a
killed rank leaves partial statistics that a rerun completes without recounting."""
from __future__ import annotations

import math
import multiprocessing
import os
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException

from editing.layer_stats import layer_stats
from tests.test_layer_stats import DOCS, _modules, _paths
from util.tiny_models import make_model, make_tokenizer

TEXTS = [f"{t} ({i})" for i, t in enumerate(DOCS * 3)]
LAYERS = [0, 2, 3]
pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


def _stats(model, root: Path, corpus: Path, checkpoint_every: int = 0):
    return layer_stats(model, make_tokenizer(), _modules(model, LAYERS), str(corpus), len(TEXTS), _paths(root), "tiny",
                       max_length=16, batch_tokens=64, progress=False, checkpoint_every=checkpoint_every,
                       checkpoint_seconds=math.inf)


def _worker(rank: int, world: int, init_file: str, root: str, corpus: str, out: str, kill_after: Optional[int]) -> None:
    """One rank: collect, and write its result and its number of forward calls."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    model = make_model("llama")
    calls = []

    def count(*_):
        calls.append(1)
        if kill_after is not None and rank == 1 and len(calls) > kill_after:
            os._exit(3)  # a hard kill: no exception handler runs

    model.register_forward_pre_hook(count)
    stats = _stats(model, Path(root), Path(corpus), checkpoint_every=1)
    torch.save({"sums": {n: m.sum for n, m in stats.items()}, "counts": {n: m.count for n, m in stats.items()},
                "calls": len(calls), "resumed": stats.run.batches_resumed}, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


def _spawn(tmp_path: Path, tag: str, root: Path, corpus: Path, kill_after: Optional[int] = None) -> list[dict]:
    out = tmp_path / f"out_{tag}"
    out.mkdir()
    args = (2, str(tmp_path / f"pg_{tag}"), str(root), str(corpus), str(out), kill_after)
    # A fork server imports torch and this module once for all the test's processes (spawn would
    # import them in every process); its children are forked before any torch thread pool exists.
    multiprocessing.get_context("forkserver").set_forkserver_preload([__name__])
    mp.start_processes(_worker, args=args, nprocs=2, join=True, start_method="forkserver")
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    path = tmp_path / "texts.txt"
    path.write_text("\n\n".join(TEXTS) + "\n", encoding="utf-8")
    return path


def _max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _single(tmp_path: Path, corpus: Path):
    torch.set_num_threads(1)
    return _stats(make_model("llama"), tmp_path / "single", corpus)


def test_two_processes_equal_one_process(tmp_path, corpus):
    single = _single(tmp_path, corpus)
    ranks = _spawn(tmp_path, "two", tmp_path / "two", corpus)
    n_batches = single.run.forward_calls
    assert ranks[0]["calls"] + ranks[1]["calls"] == n_batches and min(r["calls"] for r in ranks) > 0
    for name, moment in single.items():
        for r in ranks:
            assert r["counts"][name] == moment.count
            assert _max_rel_diff(r["sums"][name], moment.sum) < 1e-10
    cached = next((tmp_path / "two" / "stats").rglob(f"{_modules(make_model('llama'), [0])[0]}_*.npz"))
    with np.load(cached) as f:
        assert int(f["meta.world_size"]) == 2 and int(f["mom2.count"]) == single[cached.name.split("_float32")[0]].count
    assert not list((tmp_path / "two" / "stats").rglob("partial_*"))


def test_killed_rank_leaves_partial_statistics_that_a_rerun_completes(tmp_path, corpus):
    single = _single(tmp_path, corpus)
    root = tmp_path / "killed"
    with pytest.raises(ProcessException):  # rank 1 exited with code 3
        _spawn(tmp_path, "kill", root, corpus, kill_after=2)
    partials = sorted(root.rglob("rank*-of-2.npz"))
    assert [p.name for p in partials][-1] == "rank1-of-2.npz"
    done = {}
    for p in partials:
        with np.load(p) as f:
            done[p.name] = len(f["done"])
    assert done["rank1-of-2.npz"] == 2  # its two finished batches, checkpointed before the kill
    assert not list(root.rglob("*_mom2_21.npz"))  # no cache written

    ranks = _spawn(tmp_path, "rerun", root, corpus)
    assert sum(r["calls"] for r in ranks) == single.run.forward_calls - sum(done.values())
    assert ranks[1]["resumed"] == 2
    for name, moment in single.items():
        assert ranks[0]["counts"][name] == moment.count
        assert _max_rel_diff(ranks[0]["sums"][name], moment.sum) < 1e-10
    assert not list(root.rglob("partial_*"))
