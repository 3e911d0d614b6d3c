"""Per-run resources every editor shares: context templates, factorised covariances, NAS's reference norms.

The reference keeps these in module-level caches keyed incompletely (its template cache ignores
which model made the templates, its inverse-covariance cache ignores corpus and sample count).
Here one ``EditResources`` object is created per run and passed down; every cache key is complete.
Covariances are factorised once (Cholesky, float64) and u = C^{-1} k is a triangular solve.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Optional, Sequence

from torch import nn
from transformers import PreTrainedTokenizerBase

from editing.context_templates import TemplateSpec, generate_context_templates
from editing.covariance import FactorisedCovariance
from editing.hparams import LocateEditHyperParams
from editing.layer_stats import DEFAULT_BATCH_TOKENS, ROME_SAMPLE_SEED, layer_stats
from editing.norm_reference import NormReferences
from util import nethook
from util.globals import Paths, load_paths
from util.placement import module_device

LOG = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class StatsKey:
    model_slug: str
    corpus: str
    n_samples: int
    dtype: str
    max_length: Optional[int]
    layer_name: str
    sample_seed: Optional[int] = ROME_SAMPLE_SEED


def _stats_key(model_slug: str, hparams: LocateEditHyperParams, layer_name: str) -> StatsKey:
    return StatsKey(
        model_slug=model_slug,
        corpus=hparams.mom2_dataset,
        n_samples=hparams.mom2_n_samples,
        dtype=hparams.mom2_dtype,
        max_length=hparams.mom2_max_length,
        layer_name=layer_name,
        sample_seed=hparams.mom2_sample_seed,
    )


def default_stats_batch_tokens() -> int:
    """The statistics' token budget per forward pass: WILKE_STATS_BATCH_TOKENS, else 4096. Raise it
    on a large GPU for speed; out-of-memory batches are retried in halves either way."""
    value = os.environ.get("WILKE_STATS_BATCH_TOKENS", "")
    return int(value) if value.strip() else DEFAULT_BATCH_TOKENS


class EditResources:
    """Everything a run's edits share: made once, keyed completely, never global."""

    def __init__(self, paths: Paths, model_slug: str, one_pass_stats: bool = True, progress: bool = True,
                 stats_batch_tokens: Optional[int] = None):
        self.paths = paths
        self.model_slug = model_slug
        self.one_pass_stats = one_pass_stats
        self.progress = progress
        self.stats_batch_tokens = stats_batch_tokens or default_stats_batch_tokens()
        self._templates: dict[tuple, list[str]] = {}
        self._covariances: dict[StatsKey, FactorisedCovariance] = {}
        self.forward_checked: dict[tuple[int, str], bool] = {}  # (model id, strategy) -> agrees with the full pass
        self.stats_seconds = 0.0
        self._norm_references = NormReferences(paths, model_slug)

    def context_templates(self, model: nn.Module, tok: PreTrainedTokenizerBase, spec: TemplateSpec) -> list[str]:
        """The templates of ``spec`` for this run's model, sampled once and kept for the run."""
        key = (self.model_slug, spec)
        if key not in self._templates:
            self._templates[key] = generate_context_templates(model, tok, spec.length_params, spec.seed, spec.prompts,
                                                              spec.style)
            LOG.info("context templates: %s", self._templates[key])
        return self._templates[key]

    def covariances(
        self,
        model: nn.Module,
        tok: PreTrainedTokenizerBase,
        hparams: LocateEditHyperParams,
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
            max_length=keys[names[0]].max_length,
            batch_tokens=self.stats_batch_tokens,
            one_pass=self.one_pass_stats,
            progress=self.progress,
            sample_seed=keys[names[0]].sample_seed,
        )
        for name in names:  # each covariance on the device of its layer (models placed over several)
            mom2 = stats[name].mom2().to(module_device(nethook.get_module(model, name)))
            self._covariances[keys[name]] = FactorisedCovariance(mom2, keep_matrix=keep_matrix, name=f"covariance of {name}")
        self.stats_seconds += time.perf_counter() - start

    def norm_reference(self, model: nn.Module, tok: PreTrainedTokenizerBase, hparams: LocateEditHyperParams,
                       layer: int) -> float:
        """NAS's reference norm r of ``layer`` (editing/norm_reference.py): made on first use, so the first
        use must be on the unedited model (``prepare_norm_anchors``, when an editor is built)."""
        return self._norm_references.get(model, tok, hparams, layer, self)

    def seal_norm_references(self) -> None:
        """From now on a reference norm that was not made (or cached) is an error, not a computation."""
        self._norm_references.sealed = True

    def release(self, hparams: LocateEditHyperParams, layer_names: Sequence[str]) -> None:
        """Drop these layers' covariances (a method that keeps only what it derived from them, as
        AlphaEdit keeps its projectors: on a large model each is gigabytes)."""
        for name in layer_names:
            self._covariances.pop(_stats_key(self.model_slug, hparams, name), None)

    @property
    def covariance_bytes(self) -> int:
        return sum(c.nbytes for c in self._covariances.values())


def default_resources(model: nn.Module) -> EditResources:
    """Resources for a model edited outside a run (the apply_<alg>_to_model functions): paths from
    globals.yml, statistics cached under the model's name."""
    slug = str(getattr(model.config, "_name_or_path", "") or model.config.model_type).replace("/", "_")
    return EditResources(load_paths(), slug)
