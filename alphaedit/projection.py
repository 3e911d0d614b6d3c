"""AlphaEdit's null-space projector of one layer: P = U0 U0^T, computed once, cached beside the statistics.

C0 = E[k k^T] is the layer's key second moment (the cached statistics ROME and MEMIT use). With
C0 = U diag(lambda) U^T, U0 holds the eigenvectors whose eigenvalue is below ``nullspace_threshold``
(an absolute bound on the eigenvalues of the mean second moment; 2e-2 in the paper). An update with
Delta P = Delta leaves Delta k0 ~ 0 for every key k0 of preserved knowledge, since such keys live in
the span of the large eigenvalues.

Upstream (``experiments/evaluate.py`` ``get_project``) takes ``torch.linalg.svd`` of C0 in float32
on the CPU and keeps the singular values strictly below the threshold; C0 is symmetric positive
semi-definite, so those are its eigenvalues and here ``eigh`` in float64 gives the same split (the
tiny negative eigenvalues rounding can give fall below the threshold either way). Upstream recomputes
P every run (it saves it to ``null_space_project.pt`` in the working directory and never reads it;
EasyEdit reads that file back without checking which model wrote it). Here U0 is written beside the
statistics, in a file whose name carries the model, layer, statistics dtype and sample count and the
threshold, together with a SHA-256 digest of the C0 it was cut from (the float64 matrix the run's
resources load, so a cached P is used only for bit-identical statistics): a file
whose statistics have since changed is ignored and rewritten.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from editing.corpus import corpus_slug
from editing.resources import EditResources
from util import nethook
from util.atomic_files import atomic_path
from util.placement import module_device

LOG = logging.getLogger(__name__)


@dataclasses.dataclass
class NullSpace:
    """One layer's projector and what it was cut from."""

    module_name: str
    projector: torch.Tensor  # P = U0 U0^T (in_features x in_features, float64), on the edited layer's device
    eigenvalues: torch.Tensor  # every eigenvalue of C0, ascending (float64, CPU)
    threshold: float

    @property
    def dim(self) -> int:
        """How many directions P keeps: eigenvalues strictly below the threshold."""
        return int((self.eigenvalues < self.threshold).sum())

    @property
    def share(self) -> float:
        return self.dim / self.eigenvalues.numel()


def spectrum(c0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(eigenvalues ascending, eigenvectors as columns) of the symmetric C0, in float64."""
    c = c0.to(torch.float64)
    return torch.linalg.eigh((c + c.T) / 2)


def null_space_basis(c0: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(U0, eigenvalues): the eigenvectors of the symmetric C0 with eigenvalue < threshold, in float64."""
    eigenvalues, vectors = spectrum(c0)
    return vectors[:, eigenvalues < threshold].contiguous(), eigenvalues


def projector(basis: torch.Tensor) -> torch.Tensor:
    """P = U0 U0^T (the same product whether U0 was just computed or read from the cache)."""
    return basis @ basis.T


@dataclasses.dataclass(frozen=True)
class ProjectorKey:
    """Everything a projector depends on: the statistics (named, and their digest), the layer, the threshold."""

    model_slug: str
    corpus: str
    n_samples: int
    dtype: str
    module_name: str
    threshold: float
    c0_sha256: str


def c0_digest(c0: torch.Tensor) -> str:
    """SHA-256 of C0 as float64 bytes: a cached null space is only used for the very same statistics."""
    return hashlib.sha256(c0.detach().to("cpu", torch.float64).contiguous().numpy().tobytes()).hexdigest()


class ProjectorCache:
    """The null spaces a run uses: computed once per layer from the statistics the run's resources
    load (E[k k^T] in float64), kept in memory and on disk. One object per run (the editor's), never
    a module-level cache."""

    def __init__(self, resources: EditResources):
        self.resources = resources
        self._memory: dict[ProjectorKey, NullSpace] = {}

    def file(self, key: ProjectorKey) -> Path:
        """Beside the statistics: ``<stats_dir>/<model>/<corpus>_stats/`` +
        ``nullspace_<model>_<module>_<dtype>_mom2_<n>_below_<threshold>.npz``."""
        model_dir = key.model_slug.replace("/", "_")
        corpus = corpus_slug(key.corpus, self.resources.paths)  # without opening it (offline official files)
        name = f"nullspace_{model_dir}_{key.module_name}_{key.dtype}_mom2_{key.n_samples}_below_{key.threshold:.6g}.npz"
        return Path(self.resources.paths.stats_dir) / model_dir / f"{corpus}_stats" / name

    def null_spaces(
        self, model: nn.Module, tok: PreTrainedTokenizerBase, hparams: Any, module_names: Optional[Sequence[str]] = None
    ) -> dict[str, NullSpace]:
        """The null space of every edited layer (``hparams.layers`` unless ``module_names`` are given).

        Call it on the unedited model: statistics missing from the cache are collected from the
        model as it is (all missing layers in one corpus pass).
        """
        names = list(module_names or [hparams.rewrite_module_tmp.format(l) for l in hparams.layers])
        covariances = self.resources.covariances(model, tok, hparams, names, keep_matrix=True)
        spaces = {}
        for name in names:
            c0 = covariances[name].matrix
            key = ProjectorKey(self.resources.model_slug, hparams.mom2_dataset, hparams.mom2_n_samples,
                               hparams.mom2_dtype, name, float(hparams.nullspace_threshold), c0_digest(c0))
            if key not in self._memory:
                self._memory[key] = self._load(key, model) or self._compute(key, c0, model)
            spaces[name] = self._memory[key]
        return spaces

    def _compute(self, key: ProjectorKey, c0: torch.Tensor, model: nn.Module) -> NullSpace:
        basis, eigenvalues = null_space_basis(c0, key.threshold)
        _save(self.file(key), basis, eigenvalues, key)
        return self._null_space(key, basis, eigenvalues, model)

    def _load(self, key: ProjectorKey, model: nn.Module) -> Optional[NullSpace]:
        file = self.file(key)
        if not file.is_file():
            return None
        try:
            with np.load(file, allow_pickle=False) as data:
                if str(data["c0_sha256"]) != key.c0_sha256 or float(data["threshold"]) != key.threshold:
                    LOG.warning("%s was cut from other statistics than the current ones; recomputing", file)
                    return None
                basis = torch.from_numpy(np.array(data["basis"]))
                eigenvalues = torch.from_numpy(np.array(data["eigenvalues"]))
        except (OSError, KeyError, ValueError) as e:
            LOG.warning("ignoring unreadable null-space file %s (%s); recomputing", file, e)
            return None
        LOG.info("null space of %s read from %s", key.module_name, file)
        return self._null_space(key, basis, eigenvalues, model)

    def _null_space(
        self, key: ProjectorKey, basis: torch.Tensor, eigenvalues: torch.Tensor, model: nn.Module
    ) -> NullSpace:
        device = module_device(nethook.get_module(model, key.module_name))
        space = NullSpace(key.module_name, projector(basis.to(device)), eigenvalues.cpu(), key.threshold)
        LOG.info("AlphaEdit null space of %s: %d of %d directions have eigenvalue < %g (%.1f%%)",
                 key.module_name, space.dim, eigenvalues.numel(), key.threshold, 100 * space.share)
        return space


def _save(file: Path, basis: torch.Tensor, eigenvalues: torch.Tensor, key: ProjectorKey) -> None:
    """Written atomically: another run may be reading the cache."""
    arrays = {
        "basis": basis.cpu().numpy(),
        "eigenvalues": eigenvalues.cpu().numpy(),
        "threshold": np.array(key.threshold),
        "c0_sha256": np.array(key.c0_sha256),
        "model_slug": np.array(key.model_slug),
        "module_name": np.array(key.module_name),
        "corpus": np.array(key.corpus),
        "n_samples": np.array(key.n_samples, dtype=np.int64),
    }
    with atomic_path(file) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, **arrays)
    LOG.info("null space of %s cached at %s", key.module_name, file)
