"""The objects of the second-moment statistics: running sums, how a moment was made, what a call did."""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}


@dataclasses.dataclass(frozen=True)
class StatsMeta:
    """How a cached moment was made (``-1`` / ``""`` when a file predates a field).

    ``sampling`` is "seeded" (ROME's seeded random sample of the corpus records, ``sample_seed``)
    or "first" (the first texts); ``corpus_size`` is the number of records sampled from.
    """

    corpus: str = ""
    n_samples_requested: int = -1
    n_samples: int = -1  # texts actually used (fewer when the corpus is shorter or has empty records)
    n_tokens: int = -1  # real tokens = keys summed
    max_length: int = -1
    dtype: str = ""
    forward_tokens: int = -1  # padded positions fed to the model by the collection that made it
    seconds: float = -1.0  # compute time of that collection (all ranks' wall time, resumed parts summed)
    sampling: str = ""
    sample_seed: int = -1
    corpus_size: int = -1
    world_size: int = -1  # processes that collected it

    @property
    def whole_corpus(self) -> bool:
        """Every record of the corpus was used, so the sampling does not matter."""
        return 0 <= self.corpus_size <= self.n_samples_requested


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
        self.origin = "harness"  # "rome": an official file of the ROME site

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
    """What one ``layer_stats`` call did in this process, for logs and benchmarks."""

    layers_loaded: list[str] = dataclasses.field(default_factory=list)
    layers_computed: list[str] = dataclasses.field(default_factory=list)
    corpus_passes: int = 0
    forward_calls: int = 0  # model calls, OOM retries included
    forward_tokens: int = 0  # padded positions over all passes
    real_tokens: int = 0  # non-pad positions over all passes
    seconds: float = 0.0  # time spent in corpus passes
    batches_resumed: int = 0  # batches found done in partial statistics and skipped
    oom_splits: int = 0  # batches split in half after an out-of-memory error
    rank: int = 0
    world_size: int = 1
    sample_seed: int = -1
    sampling: str = ""

    @property
    def tokens_per_second(self) -> float:
        return self.real_tokens / self.seconds if self.seconds > 0 else float("nan")


class LayerStats(dict):
    """``{module name: SecondMoment}`` with ``.run`` telling what the call computed."""

    def __init__(self, moments: dict[str, SecondMoment], run: CollectionRun):
        super().__init__(moments)
        self.run = run
