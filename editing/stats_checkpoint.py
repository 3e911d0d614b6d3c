"""Partial statistics: what a collection has summed so far, so a killed one resumes where it stopped.

Each process writes its own file, ``<cache folder>/partial_<dtype>_mom2_<n>_<key>/rank<r>-of-<w>.npz``,
beside the cache files the collection will write (``<key>`` hashes the batch plan and the modules,
so a changed corpus, tokenizer, budget or module list never resumes from foreign sums). A file
holds, per module, the float64 running sum of k k^T and the token count, plus the indices of the
batches already summed and the seconds spent; it is replaced atomically, so a process killed at any
moment leaves either the previous file or the new one. A resumed process adds the remaining
batches to the loaded sums in the same order, so the result is bit-identical to an uninterrupted
run. Partial files of another number of processes are not merged (their batches were assigned
differently); rerun with the same number of processes to use them.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import shutil
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from editing.stats_moments import SecondMoment
from util.atomic_files import atomic_path

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Partial:
    """A process's progress: its moments (sums and counts), done batch indices, seconds spent."""

    moments: dict[str, SecondMoment]
    done: set[int]
    seconds: float


def partial_dir(cache_file: Path, layers: Sequence[str], dtype: str, n_samples: int, plan_fingerprint: str) -> Path:
    """The folder of one collection's partial files, beside its cache files."""
    key = hashlib.sha256("|".join([plan_fingerprint, dtype, *layers]).encode()).hexdigest()[:16]
    return cache_file.parent / f"partial_{dtype}_mom2_{n_samples}_{key}"


class PartialStore:
    """This process's partial file of one collection."""

    def __init__(self, directory: Path, rank: int, world_size: int, layers: Sequence[str]):
        self.directory = Path(directory)
        self.rank, self.world_size = rank, world_size
        self.layers = list(layers)
        self.path = self.directory / f"rank{rank}-of-{world_size}.npz"

    def load(self, device: torch.device | str) -> Optional[Partial]:
        """This process's earlier progress, or None (no file, or one for other modules)."""
        self._warn_other_world_sizes()
        if not self.path.is_file():
            return None
        try:
            with np.load(self.path, allow_pickle=False) as data:
                if [str(x) for x in data["layers"]] != self.layers:
                    logger.warning("ignoring %s: it holds other modules", self.path)
                    return None
                moments = {name: self._moment(data, name, device) for name in self.layers}
                done = {int(i) for i in data["done"]}
                seconds = float(data["seconds"])
        except (OSError, KeyError, ValueError) as e:
            logger.warning("ignoring unreadable partial statistics %s (%s)", self.path, e)
            return None
        logger.info("resuming from %s: %d batches already summed", self.path, len(done))
        return Partial({n: m for n, m in moments.items() if m is not None}, done, seconds)

    @staticmethod
    def _moment(data: np.lib.npyio.NpzFile, name: str, device: torch.device | str) -> Optional[SecondMoment]:
        count = int(data[f"count.{name}"])
        if count == 0:
            return None
        total = torch.from_numpy(np.array(data[f"sum.{name}"])).to(device)
        moment = SecondMoment(total.shape[0], accum_dtype=total.dtype, device=device)
        moment.sum, moment.count = total, count
        return moment

    def save(self, partial: Partial) -> None:
        """Replace this process's file atomically with the current progress."""
        arrays: dict[str, np.ndarray] = {
            "layers": np.array(self.layers),
            "done": np.array(sorted(partial.done), dtype=np.int64),
            "seconds": np.array(partial.seconds),
        }
        for name in self.layers:
            moment = partial.moments.get(name)
            arrays[f"count.{name}"] = np.array(moment.count if moment else 0, dtype=np.int64)
            arrays[f"sum.{name}"] = moment.sum.detach().cpu().numpy() if moment else np.zeros((0, 0))
        with atomic_path(self.path) as tmp, open(tmp, "wb") as handle:
            np.savez(handle, **arrays)
        logger.debug("partial statistics: %d batches saved to %s", len(partial.done), self.path)

    def remove_all(self) -> None:
        """Delete the collection's partial folder (once its cache files are written)."""
        shutil.rmtree(self.directory, ignore_errors=True)

    def _warn_other_world_sizes(self) -> None:
        if not self.directory.is_dir():
            return
        others = sorted(p.name for p in self.directory.glob("rank*-of-*.npz") if not p.name.endswith(f"-of-{self.world_size}.npz"))
        if others:
            logger.warning("partial statistics %s in %s were made by another number of processes and are not "
                           "used; rerun with that number of processes to resume them", ", ".join(others), self.directory)
