"""Second-moment statistics C = E[k k^T] of the keys (inputs) of chosen modules over a text corpus.

ROME, MEMIT, WilKE and AlphaEdit all need C_l for the MLP output projection W_l of each layer
they may edit. The reference code makes one full corpus pass per layer; here every layer that is
not cached yet is collected in ONE pass (one TraceDict over all of them, the forward pass cut
after the highest), which costs about as much as the reference's pass for the highest layer
alone. ``one_pass=False`` keeps the reference behaviour for benchmarks.

Samples: ROME's seeded random sample of ``n_samples`` corpus records (``random.Random(1)``
shuffle of the record positions, ``editing.corpus_sample``; the whole corpus when it is smaller),
each truncated to ``max_length`` tokens: the hparams' ``mom2_max_length``, else the model's context
(``n_positions`` / ``max_position_embeddings``) as ROME's ``layer_stats`` (``maxlen =
model.config.n_positions``; AlphaEdit reads ``max_position_embeddings`` for Llama: 8,192 for
Llama-3). Upstream truncates further only when a caller passes ``batch_tokens`` below the context
(none does); here ``batch_tokens`` is a memory budget and never truncates. Keys are taken at every
real (non-pad) token. Batches group samples of similar length within a token budget
(``editing.stats_plan``); a text longer than the budget gets a batch of its own. Everything is
ordered deterministically: the same inputs give bit-identical moments, in one pass or in many.

Collection (``editing.stats_collection``): an out-of-memory batch is retried in halves; partial
sums are checkpointed beside the cache and a killed collection resumes; under torchrun the batches
are sharded over the processes and their float64 sums all-reduced (``editing.stats_distributed``).

Cache (``editing.stats_cache``): one npz per module at
``<stats_dir>/<model_slug>/<corpus>_stats/<module>_<dtype>_mom2_<n>.npz``, ROME's naming and keys
(``mom2.mom2`` = SUM of k k^T, ``mom2.count``, ``sample_size``), so the official files from
rome.baulab.info/data/stats/ load as they are, plus ``meta.*`` entries saying how it was made.
The truncation length is part of the cache key through ``meta.max_length`` (an official file,
which has none, counts as made at the model's context, as ROME made it): a file of another length
is recomputed and replaced, never reused.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from editing.corpus import corpus_slug, open_corpus
from editing.corpus_sample import FIRST, ROME_SAMPLE_SEED, SEEDED, draw_sample
from editing.stats_cache import find_stats_file, load_moment, model_dir_names, save_moment, stats_path, usable_cache
from editing.stats_checkpoint import PartialStore, partial_dir
from editing.stats_collection import CollectionOptions, StatsOutOfMemoryError, run_pass
from editing.stats_distributed import DistContext
from editing.stats_moments import DTYPES, CollectionRun, LayerStats, SecondMoment, StatsMeta
from editing.stats_plan import DEFAULT_BATCH_TOKENS, BatchPlan, length_batches, make_plan, tokenize_samples
from util import nethook
from util.architectures import context_length, weight_out_in
from util.globals import Paths
from util.scoring import model_device, pad_token_id

__all__ = [
    "DEFAULT_BATCH_TOKENS", "DTYPES", "ROME_SAMPLE_SEED", "CollectionOptions", "CollectionRun", "LayerStats",
    "SecondMoment", "StatsMeta", "StatsOutOfMemoryError", "forward_order", "layer_stats", "length_batches",
    "load_moment", "save_moment", "stats_path", "tokenize_samples",
]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class StatsRequest:
    """Everything that decides which statistics a call wants (the cache key, in effect)."""

    paths: Paths
    model_slug: str
    corpus: str
    corpus_slug: str
    n_samples: int
    dtype: str
    max_length: int  # tokens per text
    sample_seed: Optional[int]  # None: the first n texts
    context: int  # the model's context: the length ROME's official files were truncated to

    @property
    def sampling(self) -> str:
        return FIRST if self.sample_seed is None else SEEDED

    @property
    def seed(self) -> int:
        return -1 if self.sample_seed is None else self.sample_seed

    def cache_file(self, module: str) -> Path:
        """Where this harness writes the module's statistics."""
        return stats_path(self.paths.stats_dir, self.model_slug, self.corpus_slug, module, self.dtype, self.n_samples)


def forward_order(model: nn.Module, layer_names: Sequence[str]) -> list[str]:
    """Modules sorted by registration order, which is forward order for HF decoder stacks
    (TraceDict stops after the last listed module, so that one must run last)."""
    index = {name: i for i, (name, _) in enumerate(model.named_modules())}
    for name in layer_names:
        if name not in index:
            nethook.get_module(model, name)  # raises a LookupError naming near misses
    return sorted(dict.fromkeys(layer_names), key=lambda n: index[n])


def _input_dim(model: nn.Module, name: str) -> Optional[int]:
    module = nethook.get_module(model, name)
    if getattr(module, "weight", None) is None or module.weight.ndim != 2:
        return None
    return int(weight_out_in(module).shape[1])


@torch.no_grad()
def layer_stats(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    layer_names: Sequence[str],
    corpus: str,
    n_samples: int,
    paths: Paths,
    model_slug: str,
    dtype: str = "float32",
    max_length: Optional[int] = None,
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
    one_pass: bool = True,
    progress: bool = True,
    sample_seed: Optional[int] = ROME_SAMPLE_SEED,
    checkpoint_every: int = 0,
    checkpoint_seconds: float = 600.0,
) -> LayerStats:
    """E[k k^T] for the input k of each module in ``layer_names``, loaded from cache or collected.

    All modules missing from the cache are collected in one corpus pass (``one_pass=False``: one
    pass per module, as the reference code does). ``batch_tokens`` bounds the padded positions of
    one forward pass; ``checkpoint_every`` (batches) and ``checkpoint_seconds`` say how often
    partial statistics are saved for a resume. Under torchrun every process calls this with the
    same arguments and gets the same statistics; rank 0 writes the cache.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if n_samples <= 0:
        raise ValueError(f"n_samples must be positive, got {n_samples}")
    context = context_length(model)
    request = StatsRequest(paths, model_slug, corpus, corpus_slug(corpus, paths), n_samples, dtype,
                           max_length or context, sample_seed, context)
    layers = forward_order(model, layer_names)
    ctx = DistContext.current()
    run = CollectionRun(rank=ctx.rank, world_size=ctx.world_size, sample_seed=request.seed, sampling=request.sampling)
    result = _cached(model, layers, request, ctx)
    run.layers_loaded = [n for n in layers if n in result]
    missing = [n for n in layers if n not in result]
    if missing:
        options = CollectionOptions(batch_tokens, checkpoint_every, checkpoint_seconds, progress)
        was_training = model.training
        model.eval()  # dropout would make the moments random
        try:
            result.update(_collect_missing(model, tok, request, missing, options, one_pass, ctx, run))
        finally:
            model.train(was_training)
    return LayerStats({n: result[n] for n in layer_names}, run)


def _cached(model: nn.Module, layers: Sequence[str], request: StatsRequest, ctx: DistContext) -> dict[str, SecondMoment]:
    """The usable cached moments; rank 0 decides which, so every process collects the same modules."""
    found: dict[str, SecondMoment] = {}
    files: dict[str, str] = {}
    if ctx.rank == 0:
        name_or_path = str(getattr(model.config, "_name_or_path", "") or "")
        dirs = model_dir_names(request.paths.stats_dir, request.model_slug, name_or_path)
        for name in layers:
            path = find_stats_file(request.paths.stats_dir, dirs, request.corpus_slug, name, request.dtype, request.n_samples)
            moment = usable_cache(path, request.max_length, _input_dim(model, name), request.sampling, request.seed,
                                  request.context)
            if moment is not None:
                found[name], files[name] = moment, str(path)
    files = ctx.broadcast(files)
    if ctx.rank != 0:  # STATS_DIR is shared by the processes of one collection
        found = {n: load_moment(Path(p)) for n, p in files.items()}
    return found


def _collect_missing(model: nn.Module, tok: PreTrainedTokenizerBase, request: StatsRequest, missing: Sequence[str],
                     options: CollectionOptions, one_pass: bool, ctx: DistContext, run: CollectionRun) -> dict[str, SecondMoment]:
    """Draw the sample, plan the batches, collect the missing modules (one pass, or one each)."""
    source = open_corpus(request.corpus, request.paths)
    sample = draw_sample(source, request.n_samples, request.sample_seed)
    plan = make_plan(tok, sample, request.max_length, options.batch_tokens, pad_token_id(tok))
    if not plan.samples:
        raise ValueError(f"corpus {source.name!r} ({source.source}) yielded no non-empty texts")
    if plan.n_samples < request.n_samples:
        logger.warning("corpus %s has %d usable texts of the %d requested", source.name, plan.n_samples, request.n_samples)
    how = f"seeded sample (seed {sample.seed})" if sample.sampling == SEEDED else "first texts"
    logger.info("mom2: collecting %d module(s) from %d samples of %s (%s of %s records; %d tokens, max_length %d, "
                "%d batches of <= %d tokens) in %s%s", len(missing), plan.n_samples, source.name, how,
                sample.corpus_size if sample.corpus_size >= 0 else "?", plan.n_tokens, request.max_length,
                len(plan.batches), options.batch_tokens, "one pass" if one_pass else "one pass per module",
                f" over {ctx.world_size} processes" if ctx.active else "")
    groups = [list(missing)] if one_pass else [[n] for n in missing]
    out: dict[str, SecondMoment] = {}
    for group in groups:
        out.update(_collect_group(model, plan, group, request, options, ctx, run))
    logger.info("mom2: %d pass(es), %d forward tokens in this process, %.1f s (%.0f real tokens/s); cached under %s",
                run.corpus_passes, run.forward_tokens, run.seconds, run.tokens_per_second, request.cache_file(missing[0]).parent)
    return out


def _collect_group(model: nn.Module, plan: BatchPlan, group: list[str], request: StatsRequest, options: CollectionOptions,
                   ctx: DistContext, run: CollectionRun) -> dict[str, SecondMoment]:
    """One corpus pass for ``group``: sum (resuming partial sums), add the processes, write the cache."""
    files = {n: request.cache_file(n) for n in group}
    folder = partial_dir(files[group[0]], group, request.dtype, request.n_samples, plan.fingerprint)
    store = PartialStore(folder, ctx.rank, ctx.world_size, group)
    partial = run_pass(model, plan, group, DTYPES[request.dtype], options, ctx, store, run)
    moments = ctx.sum_moments(partial.moments, group, model_device(model))
    sample = plan.sample
    meta = StatsMeta(request.corpus_slug, request.n_samples, plan.n_samples, plan.n_tokens, request.max_length, request.dtype,
                     plan.forward_tokens, ctx.max(partial.seconds), sample.sampling, sample.seed, sample.corpus_size, ctx.world_size)
    for name in group:
        moments[name] = moments[name].to("cpu")
        moments[name].meta = meta
        if ctx.rank == 0:
            save_moment(files[name], moments[name])
    ctx.barrier()  # the cache is written: the partial sums are no longer needed
    store.path.unlink(missing_ok=True)
    if ctx.rank == 0:
        store.remove_all()
    run.layers_computed.extend(group)
    run.corpus_passes += 1
    return moments
