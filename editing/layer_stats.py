"""Second-moment statistics C = E[k k^T] of the keys (inputs) of chosen modules over a text corpus.

ROME, MEMIT, WilKE and AlphaEdit all need C_l for the MLP output projection W_l of each layer
they may edit. The reference code makes one full corpus pass per layer; here every layer that is
not cached yet is collected in ONE pass (one TraceDict over all of them, the forward pass cut
after the highest), which costs about as much as the reference's pass for the highest layer
alone. ``one_pass=False`` keeps the reference behaviour for benchmarks.

Samples are the first ``n_samples`` texts of the corpus, each truncated to ``max_length`` tokens;
keys are taken at every real (non-pad) token. Batches group samples of similar length (sorted
by length, at most ``batch_tokens`` padded positions each), so padding is only the difference
within a bucket. Everything is ordered deterministically: the same inputs give bit-identical
moments, in one pass or in many.

Cache: one npz per module at ``<stats_dir>/<model_slug>/<corpus>_stats/<module>_<dtype>_mom2_<n>.npz``
(ROME's naming and keys ``mom2.mom2`` = sum of k k^T, ``mom2.count``, ``sample_size``, so files
from the ROME site load too), plus ``meta.*`` entries saying how it was made.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from editing.corpus import Corpus, open_corpus
from util import nethook
from util.architectures import context_length, weight_out_in
from util.atomic_files import atomic_path
from util.globals import Paths
from util.scoring import model_device, pad_right, pad_token_id

logger = logging.getLogger(__name__)

DEFAULT_MAX_LENGTH_CAP = 2048
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}


@dataclasses.dataclass(frozen=True)
class StatsMeta:
    """How a cached moment was made (``-1`` / ``""`` when a file predates this metadata)."""

    corpus: str = ""
    n_samples_requested: int = -1
    n_samples: int = -1  # texts actually used (fewer when the corpus is shorter)
    n_tokens: int = -1  # real tokens = keys summed
    max_length: int = -1
    dtype: str = ""
    forward_tokens: int = -1  # padded positions fed to the model by the pass that made it
    seconds: float = -1.0  # wall time of that pass (shared by all layers of a one-pass run)


class SecondMoment:
    """Running sum of k k^T and token count; ``mom2()`` is E[k k^T].

    The batch product is computed in the keys' dtype; the running sum is kept in ``accum_dtype``
    (float64 by default) so that summing millions of tokens loses no precision.
    """

    def __init__(self, dim: int, accum_dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu"):
        self.sum = torch.zeros(dim, dim, dtype=accum_dtype, device=device)
        self.count = 0
        self.meta = StatsMeta()
        self.from_cache = False

    @property
    def dim(self) -> int:
        return self.sum.shape[0]

    def add(self, keys: torch.Tensor) -> None:
        """Add keys of shape (n, dim)."""
        if keys.ndim != 2 or keys.shape[1] != self.dim:
            raise ValueError(f"expected keys of shape (n, {self.dim}), got {tuple(keys.shape)}")
        if keys.shape[0] == 0:
            return
        self.sum += (keys.T @ keys).to(device=self.sum.device, dtype=self.sum.dtype)
        self.count += int(keys.shape[0])

    def mom2(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """E[k k^T] = sum / count (in the accumulator's dtype unless ``dtype`` is given)."""
        if self.count == 0:
            raise ValueError("SecondMoment.mom2(): no keys were added")
        moment = self.sum / self.count
        return moment if dtype is None else moment.to(dtype)

    def to(self, device: torch.device | str) -> "SecondMoment":
        self.sum = self.sum.to(device)
        return self


@dataclasses.dataclass
class CollectionRun:
    """What one ``layer_stats`` call did, for logs and benchmarks."""

    layers_loaded: list[str] = dataclasses.field(default_factory=list)
    layers_computed: list[str] = dataclasses.field(default_factory=list)
    corpus_passes: int = 0
    forward_calls: int = 0
    forward_tokens: int = 0  # padded positions over all passes
    real_tokens: int = 0  # non-pad positions over all passes
    seconds: float = 0.0  # time spent in corpus passes

    @property
    def tokens_per_second(self) -> float:
        return self.real_tokens / self.seconds if self.seconds > 0 else float("nan")


class LayerStats(dict):
    """``{module name: SecondMoment}`` with ``.run`` telling what the call computed."""

    def __init__(self, moments: dict[str, SecondMoment], run: CollectionRun):
        super().__init__(moments)
        self.run = run


# --- cache files ---------------------------------------------------------------------------------


def stats_path(stats_dir: Path, model_slug: str, corpus_slug: str, module: str, dtype: str, n_samples: int) -> Path:
    """ROME's file name for one module's cached second moment."""
    model_dir = model_slug.replace("/", "_")
    return Path(stats_dir) / model_dir / f"{corpus_slug}_stats" / f"{module}_{dtype}_mom2_{n_samples}.npz"


def save_moment(path: Path, moment: SecondMoment) -> None:
    """Written atomically: a concurrent run may be reading the cache."""
    arrays = {
        "mom2.mom2": moment.sum.detach().cpu().numpy(),
        "mom2.count": np.array(moment.count, dtype=np.int64),
        "sample_size": np.array(moment.meta.n_samples_requested, dtype=np.int64),
    }
    for field in dataclasses.fields(StatsMeta):
        arrays[f"meta.{field.name}"] = np.array(getattr(moment.meta, field.name))
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, **arrays)


def load_moment(path: Path) -> SecondMoment:
    """Read a cached moment (ours or ROME's format; no pickles)."""
    with np.load(path, allow_pickle=False) as data:
        total = torch.from_numpy(np.array(data["mom2.mom2"]))
        moment = SecondMoment(total.shape[0], accum_dtype=total.dtype)
        moment.sum = total
        moment.count = int(data["mom2.count"])
        values = {}
        for field in dataclasses.fields(StatsMeta):
            key = f"meta.{field.name}"
            if key in data.files:
                values[field.name] = type(getattr(StatsMeta(), field.name))(data[key].item())
    moment.meta = StatsMeta(**values)
    moment.from_cache = True
    return moment


def _usable_cache(path: Path, max_length: int, dim: Optional[int]) -> Optional[SecondMoment]:
    """The cached moment at ``path`` when it exists and matches this request, else None."""
    if not path.is_file():
        return None
    try:
        moment = load_moment(path)
    except (OSError, KeyError, ValueError) as e:
        logger.warning("ignoring unreadable statistics file %s (%s); recomputing", path, e)
        return None
    if moment.meta.max_length not in (-1, max_length):
        logger.warning("%s was collected with max_length %d, not %d; recomputing and replacing it",
                       path, moment.meta.max_length, max_length)
        return None
    if dim is not None and moment.dim != dim:
        logger.warning("%s has dimension %d but the module takes %d inputs; recomputing", path, moment.dim, dim)
        return None
    return moment


# --- samples and batches ---------------------------------------------------------------------------


def tokenize_samples(tok: PreTrainedTokenizerBase, texts: Sequence[str], max_length: int, chunk: int = 256) -> list[list[int]]:
    """Token ids of each text (with the tokenizer's own special tokens), truncated to max_length."""
    out: list[list[int]] = []
    for start in range(0, len(texts), chunk):
        encoded = tok(list(texts[start : start + chunk]), truncation=True, max_length=max_length)
        out.extend(list(ids) for ids in encoded["input_ids"])
    return [ids for ids in out if ids]


def length_batches(lengths: Sequence[int], batch_tokens: int) -> list[list[int]]:
    """Sample indices grouped by length (longest first, ties by index) into batches whose padded
    size rows * longest stays within batch_tokens; a longer sample gets a batch of its own."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    for i in order:
        # Sorted descending, so the first sample of a batch is its longest.
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= batch_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


# --- collection ----------------------------------------------------------------------------------


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


def _corpus_pass(
    model: nn.Module,
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    layers: Sequence[str],
    dtype: torch.dtype,
    run: CollectionRun,
    progress: bool,
) -> dict[str, SecondMoment]:
    """One pass over all batches, summing k k^T at every real token for each traced module."""
    moments: dict[str, SecondMoment] = {}
    start = time.perf_counter()
    desc = f"mom2 {layers[0]}" + (f" .. {layers[-1]} ({len(layers)} modules)" if len(layers) > 1 else "")
    device = model_device(model)
    for ids, mask in tqdm(batches, desc=desc, disable=not progress, leave=False):
        ids, mask = ids.to(device), mask.to(device)
        with nethook.TraceDict(model, layers, retain_output=False, retain_input=True, stop=True) as td:
            model(input_ids=ids, attention_mask=mask, use_cache=False)
        real = mask.bool()
        for name in layers:
            keys = td[name].input[real].to(dtype)
            if name not in moments:
                moments[name] = SecondMoment(keys.shape[1], device=keys.device)
            moments[name].add(keys)
        run.forward_calls += 1
        run.forward_tokens += ids.numel()
        run.real_tokens += int(real.sum())
    run.seconds += time.perf_counter() - start
    run.corpus_passes += 1
    return moments


def _prepare_batches(
    tok: PreTrainedTokenizerBase, corpus: Corpus, n_samples: int, max_length: int, batch_tokens: int
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], int, int]:
    """Tokenized, length-bucketed, right-padded batches (kept on the CPU, moved one at a time);
    also the sample and real-token counts."""
    samples = tokenize_samples(tok, corpus.first(n_samples), max_length)
    if not samples:
        raise ValueError(f"corpus {corpus.name!r} ({corpus.source}) yielded no non-empty texts")
    if len(samples) < n_samples:
        logger.warning("corpus %s has only %d usable texts; %d were requested", corpus.name, len(samples), n_samples)
    pad = pad_token_id(tok)
    groups = length_batches([len(s) for s in samples], batch_tokens)
    batches = [pad_right([samples[i] for i in group], pad, torch.device("cpu")) for group in groups]
    return batches, len(samples), sum(len(s) for s in samples)


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
    batch_tokens: int = 4096,
    one_pass: bool = True,
    progress: bool = True,
) -> LayerStats:
    """E[k k^T] for the input k of each module in ``layer_names``, loaded from cache or collected.

    All modules missing from the cache are collected in one corpus pass (``one_pass=False``: one
    pass per module, as the reference code does). Peak extra memory during a pass is about
    batch_tokens * input width * number of modules values (the retained inputs).
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if n_samples <= 0:
        raise ValueError(f"n_samples must be positive, got {n_samples}")
    max_length = max_length or min(context_length(model), DEFAULT_MAX_LENGTH_CAP)
    source = open_corpus(corpus, paths)
    layers = forward_order(model, layer_names)
    run = CollectionRun()
    result: dict[str, SecondMoment] = {}
    files = {n: stats_path(paths.stats_dir, model_slug, source.slug, n, dtype, n_samples) for n in layers}
    for name in layers:
        cached = _usable_cache(files[name], max_length, _input_dim(model, name))
        if cached is not None:
            result[name] = cached
            run.layers_loaded.append(name)
    missing = [n for n in layers if n not in result]
    if missing:
        was_training = model.training
        model.eval()  # dropout would make the moments random
        try:
            result.update(_collect_missing(model, tok, source, missing, files, n_samples, max_length,
                                           dtype, batch_tokens, one_pass, progress, run))
        finally:
            model.train(was_training)
    return LayerStats({n: result[n] for n in layer_names}, run)


def _collect_missing(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    source: Corpus,
    missing: Sequence[str],
    files: dict[str, Path],
    n_samples: int,
    max_length: int,
    dtype: str,
    batch_tokens: int,
    one_pass: bool,
    progress: bool,
    run: CollectionRun,
) -> dict[str, SecondMoment]:
    """Collect the missing modules (one pass, or one pass each) and write their cache files."""
    batches, used, n_tokens = _prepare_batches(tok, source, n_samples, max_length, batch_tokens)
    logger.info("mom2: collecting %d module(s) from %d samples (%d tokens, max_length %d) of %s in %s",
                len(missing), used, n_tokens, max_length, source.name, "one pass" if one_pass else "one pass per module")
    groups = [list(missing)] if one_pass else [[n] for n in missing]
    out: dict[str, SecondMoment] = {}
    for group in groups:
        before = (run.forward_tokens, run.seconds)
        moments = _corpus_pass(model, batches, group, DTYPES[dtype], run, progress)
        meta = StatsMeta(source.slug, n_samples, used, n_tokens, max_length, dtype,
                         run.forward_tokens - before[0], run.seconds - before[1])
        for name in group:
            moment = moments[name].to("cpu")
            moment.meta = meta
            save_moment(files[name], moment)
            out[name] = moment
        run.layers_computed.extend(group)
    logger.info("mom2: %d pass(es), %d forward tokens, %.1f s (%.0f real tokens/s); cached under %s",
                run.corpus_passes, run.forward_tokens, run.seconds, run.tokens_per_second, files[missing[0]].parent)
    return out
