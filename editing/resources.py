"""Per-run resources of the rank-one editors: context templates and factorised covariances.

The reference keeps these in module-level caches keyed incompletely (its template cache ignores
which model made the templates, its inverse-covariance cache ignores corpus and sample count).
Here one ``EditResources`` object is created per run and passed down; every cache key is complete.
Covariances are factorised once (Cholesky, float64) and u = C^{-1} k is a triangular solve.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Optional, Sequence

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from rome.context_templates import generate_context_templates
from rome.layer_stats import layer_stats
from util.globals import Paths

LOG = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class StatsKey:
    model_slug: str
    corpus: str
    n_samples: int
    dtype: str
    max_length: Optional[int]
    layer_name: str


def _stats_key(model_slug: str, hparams: Any, layer_name: str) -> StatsKey:
    return StatsKey(
        model_slug=model_slug,
        corpus=hparams.mom2_dataset,
        n_samples=hparams.mom2_n_samples,
        dtype=hparams.mom2_dtype,
        max_length=getattr(hparams, "mom2_max_length", None),
        layer_name=layer_name,
    )


class FactorisedCovariance:
    """C = E[k k^T] of one layer's keys, held as its Cholesky factor (float64).

    A covariance from few samples (or keys confined to a subspace, as in tiny random models) can be
    singular. The reference inverts it anyway and gets whatever float32 gives; here the smallest
    diagonal jitter (1e-8, 1e-6 or 1e-4 of the mean variance) that makes it factorisable is added,
    with a warning, and a matrix beyond that is refused with advice.

    With ``keep_matrix`` (MEMIT, which solves with lambda C + K K^T, never with C alone) the matrix is
    held and the factor is made only if something asks C^{-1}: no factorisation is paid for, or
    refused, that no edit uses.
    """

    JITTERS = (1e-8, 1e-6, 1e-4)

    def __init__(self, mom2: torch.Tensor, keep_matrix: bool = False, name: str = "covariance"):
        c = mom2.to(torch.float64)
        if not bool(torch.isfinite(c).all()):
            raise ValueError(f"{name}: the second-moment statistics contain NaN or inf; delete and recollect them")
        self.name = name
        self.matrix = c if keep_matrix else None
        self._factor = None if keep_matrix else self._cholesky(c)

    def _cholesky(self, c: torch.Tensor) -> torch.Tensor:
        factor, info = torch.linalg.cholesky_ex(c)
        scale = c.diagonal().mean().clamp_min(torch.finfo(torch.float64).tiny)
        for relative in self.JITTERS:
            if int(info) == 0:
                break
            jitter = relative * scale
            LOG.warning("%s is not positive definite; adding %.3g (%.0e of its mean variance) to its diagonal",
                        self.name, float(jitter), relative)
            factor, info = torch.linalg.cholesky_ex(c + jitter * torch.eye(c.shape[0], dtype=c.dtype, device=c.device))
        if int(info) != 0:
            raise ValueError(f"{self.name} is singular even with {self.JITTERS[-1]:g} of its mean variance on the "
                             "diagonal; collect statistics from more samples (mom2_n_samples) or edit without "
                             "mom2_adjustment")
        return factor

    @property
    def factor(self) -> torch.Tensor:
        if self._factor is None:
            self._factor = self._cholesky(self.matrix)
        return self._factor

    def solve(self, rhs: torch.Tensor) -> torch.Tensor:
        """C^{-1} rhs for a vector or a matrix of column vectors, in rhs's dtype."""
        b = rhs.to(torch.float64, copy=False)
        col = b.dim() == 1
        x = torch.cholesky_solve(b[:, None] if col else b, self.factor)
        return (x[:, 0] if col else x).to(rhs.dtype)

    @property
    def nbytes(self) -> int:
        held = [t for t in (self._factor, self.matrix) if t is not None]
        return sum(t.numel() * t.element_size() for t in held)


class EditResources:
    """Everything a run's edits share: made once, keyed completely, never global."""

    def __init__(self, paths: Paths, model_slug: str, one_pass_stats: bool = True, progress: bool = True):
        self.paths = paths
        self.model_slug = model_slug
        self.one_pass_stats = one_pass_stats
        self.progress = progress
        self._templates: dict[tuple, list[str]] = {}
        self._covariances: dict[StatsKey, FactorisedCovariance] = {}
        self.forward_checked: dict[tuple[int, str], bool] = {}  # (model id, strategy) -> agrees with the full pass
        self.stats_seconds = 0.0

    def context_templates(self, model: nn.Module, tok: PreTrainedTokenizerBase, hparams: Any) -> list[str]:
        key = (
            self.model_slug,
            tuple(tuple(p) for p in hparams.context_template_length_params),
            getattr(hparams, "context_template_seed", 0),
        )
        if key not in self._templates:
            self._templates[key] = generate_context_templates(
                model, tok, hparams.context_template_length_params, key[2]
            )
            LOG.info("context templates: %s", self._templates[key])
        return self._templates[key]

    def covariances(
        self,
        model: nn.Module,
        tok: PreTrainedTokenizerBase,
        hparams: Any,
        layer_names: Sequence[str],
        keep_matrix: bool = False,
    ) -> dict[str, FactorisedCovariance]:
        """Factorised covariances for these layers; missing statistics are collected in one pass."""
        keys = {name: _stats_key(self.model_slug, hparams, name) for name in layer_names}
        missing = [n for n, k in keys.items() if k not in self._covariances or (keep_matrix and self._covariances[k].matrix is None)]
        if missing:
            self._load(model, tok, hparams, missing, keys, keep_matrix)
        return {n: self._covariances[keys[n]] for n in layer_names}

    def _load(self, model, tok, hparams, names: list[str], keys: dict, keep_matrix: bool) -> None:
        start = time.perf_counter()
        stats = layer_stats(
            model,
            tok,
            names,
            corpus=hparams.mom2_dataset,
            n_samples=hparams.mom2_n_samples,
            paths=self.paths,
            model_slug=self.model_slug,
            dtype=hparams.mom2_dtype,
            max_length=getattr(hparams, "mom2_max_length", None),
            one_pass=self.one_pass_stats,
            progress=self.progress,
        )
        device = next(model.parameters()).device
        for name in names:
            mom2 = stats[name].mom2().to(device)
            self._covariances[keys[name]] = FactorisedCovariance(mom2, keep_matrix=keep_matrix, name=f"covariance of {name}")
        self.stats_seconds += time.perf_counter() - start

    @property
    def covariance_bytes(self) -> int:
        return sum(c.nbytes for c in self._covariances.values())
