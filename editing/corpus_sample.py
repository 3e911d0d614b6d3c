"""Which texts of a corpus the second-moment statistics use: ROME's seeded random sample.

ROME's ``layer_stats`` passes ``random_sample=1`` to ``util.runningstats.tally``, whose sampler
shuffles the record positions 0..N-1 of the whole dataset with Python's ``random.Random(1)`` and
keeps the first n positions of that order (all N when n >= N). The same positions are drawn here,
over the records of every corpus (empty records included, as in ROME, where they yield no tokens
and are skipped), so the sample is reproducible from the corpus and the seed alone, and a corpus
of ROME's length yields ROME's positions. The drawn texts are kept in corpus order: the sample is
a set (a sum of k k^T does not depend on order), and the whole corpus is then read exactly as
before sampling existed, so caches of whole corpora stay bit-identical.

Streamed Hugging Face corpora: when the dataset's metadata gives its number of rows, the same
positions are drawn and the stream is read up to the last drawn position, keeping only the drawn
texts (nothing is stored on disk; for 100,000 of some 6 million Wikipedia articles this reads
nearly the whole dump, as ROME's own download does). When the size is unknown (WikiText-103,
read as articles) the first n texts are used, with a warning, and the cache metadata says so
(sampling ``"first"``). ``seed=None`` asks for the first n texts of any corpus.
"""
from __future__ import annotations

import dataclasses
import logging
import random
from typing import Optional

from editing.corpus import Corpus

logger = logging.getLogger(__name__)

ROME_SAMPLE_SEED = 1  # rome/layer_stats.py: tally(..., random_sample=1)
SEEDED = "seeded"
FIRST = "first"


@dataclasses.dataclass(frozen=True)
class CorpusSample:
    """The texts drawn, and how: enough to record in the cache and to redraw them."""

    texts: list[str]  # the non-empty drawn texts, in corpus order
    positions: list[int]  # record position of each text in the corpus (ascending)
    sampling: str  # SEEDED or FIRST
    seed: int  # -1 when sampling is FIRST
    corpus_size: int  # records in the corpus (-1 when unknown)
    requested: int

    @property
    def whole_corpus(self) -> bool:
        """Every record was drawn, so neither the seed nor the sampling matters."""
        return 0 <= self.corpus_size <= self.requested


def sample_positions(size: int, n: int, seed: int) -> list[int]:
    """ROME's draw: positions 0..size-1 shuffled by ``random.Random(seed)``, the first n kept."""
    order = list(range(size))
    random.Random(seed).shuffle(order)
    return order[:n]


def draw_sample(corpus: Corpus, n: int, seed: Optional[int] = ROME_SAMPLE_SEED) -> CorpusSample:
    """The texts of ``corpus`` the statistics use (see the module docstring)."""
    if n <= 0:
        raise ValueError(f"the sample size must be positive, got {n}")
    if seed is None:
        return _first(corpus, n, corpus_size=-1)
    if not corpus.streamed:  # local: count the records (one extra read, nothing held in memory)
        return _seeded(corpus, n, seed, sum(1 for _ in corpus.records()))
    size = corpus.streamed_size()
    if size is None:
        logger.warning("corpus %s (%s) does not publish its size, so no seeded sample can be drawn "
                       "without reading it all; using its first %d texts", corpus.name, corpus.source, n)
        return _first(corpus, n, corpus_size=-1)
    positions = sample_positions(size, n, seed)
    logger.warning("drawing a seeded sample of %d of the %d records of %s: the stream is read up to "
                   "record %d (nothing is stored on disk)", n, size, corpus.source, max(positions))
    return _seeded(corpus, n, seed, size)


def _first(corpus: Corpus, n: int, corpus_size: int) -> CorpusSample:
    texts: list[str] = []
    positions: list[int] = []
    for position, text in enumerate(corpus.records()):
        if len(texts) == n:
            break
        if text:
            texts.append(text)
            positions.append(position)
    return CorpusSample(texts, positions, FIRST, -1, corpus_size, n)


def _seeded(corpus: Corpus, n: int, seed: int, size: int) -> CorpusSample:
    """Read the records once up to the last drawn position, keeping the drawn non-empty texts."""
    if size == 0:
        return CorpusSample([], [], SEEDED, seed, 0, n)
    wanted = set(sample_positions(size, n, seed))
    last = max(wanted)
    texts: list[str] = []
    positions: list[int] = []
    read = 0
    for read, text in enumerate(corpus.records(), start=1):
        if read - 1 in wanted and text:
            texts.append(text)
            positions.append(read - 1)
        if read - 1 >= last:
            break
    if read <= last:
        logger.warning("%s ended after %d records, not the %d announced; the sample has %d texts",
                       corpus.source, read, size, len(texts))
    return CorpusSample(texts, positions, SEEDED, seed, size, n)
