"""NAS's reference norm r: the mean ||v*|| the unedited model gives over seeded rewrites, made once, cached.

Upstream (SasyaTitech/NAS 5acab48 ``util/vstar_stats.py``): 1,000 rewrites drawn with
``random.Random(0).sample`` from every multi_counterfact ``requested_rewrite``; for each, MEMIT's v*
optimisation at the block output of the layer, on the BARE prompt (no context templates: the prompt
plus the target's leading tokens, and the KL prompt "{} is a"); v* = the layer's MLP output at the
fact token + the optimised delta; the top 5% of the norms are dropped and r is the mean of the rest.
It is computed on the first edit, before any weight changes, and cached per (model, layer, settings).

Here the dataset, the sample size and the seed are hparams fields (``value_norm_anchor_dataset``,
``_samples``, ``_seed``; multi_counterfact is not available offline, so the default is
counterfact.json). Two differences, both written down in docs/fidelity.md (UltraEdit and NAS):
- upstream optimises 16 rewrites at once with one Adam over their deltas and stops them together when
  the batch's mean loss is below 5e-2; here each rewrite is optimised as alone (its own early stop;
  batched, editing.value_optimisation),
  which is upstream's arithmetic with a batch of one (Adam is per coordinate);
- upstream reads the optimisation settings from ``hparams/MEMIT/<the same file name>``; here from the
  method's own hparams (identical for upstream's MEMIT/AlphaEdit/NAS files; ROME's clamp differs).

The value of r is stored as JSON beside the statistics (``<stats_dir>/<model>/norm_anchor/``) under a
key that names everything it depends on (model and dtype, layer, settings, dataset file, sample size,
seed), so a resumed run, built on the fresh model, reads the very r the killed run used.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import random
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from dsets.registry import resolve_edit_dataset
from editing.hparams import LocateEditHyperParams
from editing.norm_anchor import mlp_output_at_first_prompt
from editing.requests import normalise_request, record_request
from editing.value_optimisation import optimise_in_batches
from editing.value_problems import ValueTask, build_value_problem
from util.architectures import check_residual_targets
from util.atomic_files import write_json_atomic
from util.scoring import model_device

LOG = logging.getLogger(__name__)

TRIM_QUANTILE = 0.95  # upstream _NAS_OUTLIER_UPPER_QUANTILE: the top 5% of the norms are dropped
# the hparams fields the value optimisation reads: r depends on each of them
SETTINGS = ("fact_token", "v_num_grad_steps", "v_lr", "v_loss_layer", "v_weight_decay", "clamp_norm_factor",
            "kl_factor", "v_early_stop_loss", "layer_module_tmp", "mlp_module_tmp", "ln_f_module", "lm_head_module")


@dataclasses.dataclass(frozen=True)
class ReferenceKey:
    """Everything r depends on."""

    model_slug: str
    model_dtype: str
    module: str  # the MLP whose output v0 is
    layer: int
    dataset_file: str
    pool_size: int
    n_samples: int
    seed: int
    settings: tuple[tuple[str, Any], ...]
    trim_quantile: float = TRIM_QUANTILE

    def as_json(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.as_json(), sort_keys=True).encode()).hexdigest()[:16]

REWRITES_PER_GROUP = 16  # upstream's batch of rewrites; here the progress bar's step


def upper_trimmed_mean(values: Sequence[float], quantile: float = TRIM_QUANTILE) -> tuple[float, int]:
    """(mean after dropping the floor((1 - q) n) largest values, how many were dropped), in float64."""
    arr = np.sort(np.asarray(list(values), dtype=np.float64))
    if arr.size == 0 or not np.isfinite(arr).all():
        raise ValueError(f"NAS reference norm: {arr.size} norms, not all finite: {arr.tolist()[:8]}")
    drop = int(np.floor((1.0 - quantile) * arr.size))
    kept = arr[: arr.size - drop] if drop > 0 else arr
    return float(kept.mean()), drop


def sample_rewrites(hparams: LocateEditHyperParams, paths: Any, model_slug: str) -> tuple[list[dict], Path, int]:
    """(the seeded sample of requests, the dataset file, the pool size): upstream's random.Random(seed).sample."""
    ds = resolve_edit_dataset(hparams.value_norm_anchor_dataset, paths, model_slug)
    if ds.records is None:
        raise FileNotFoundError(f"field 'value_norm_anchor_dataset' is {hparams.value_norm_anchor_dataset!r}, "
                                f"whose records do not exist yet ({ds.source_path})")
    pool = [normalise_request(record_request(r)) for r in ds.records]
    n = hparams.value_norm_anchor_samples
    sample = list(pool) if n >= len(pool) else random.Random(hparams.value_norm_anchor_seed).sample(pool, n)
    return sample, Path(ds.source_path), len(pool)


def value_norms(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    hparams: LocateEditHyperParams,
    layer: int,
    requests: Sequence[dict],
    resources: Any,
) -> list[float]:
    """||v0 + delta|| per request: the delta optimised at block ``layer``'s output on the bare prompt.
    The rewrites' optimisations run in batches (each as alone, editing.value_optimisation), 16 at a
    time for the progress bar, as upstream groups them."""
    bare = hparams.replace(context_template_length_params=())  # the templates are then ["{}"] alone
    block, mlp = hparams.layer_module_tmp.format(layer), hparams.mlp_module_tmp.format(layer)
    device = model_device(model)
    norms = []
    groups = [requests[i : i + REWRITES_PER_GROUP] for i in range(0, len(requests), REWRITES_PER_GROUP)]
    for group in tqdm(groups, desc=f"NAS reference norm, layer {layer}", unit=f"{REWRITES_PER_GROUP} rewrites",
                      disable=not resources.progress):
        tasks = [ValueTask(build_value_problem(tok, r, ["{}"], bare.fact_token, device), block, layer,
                           bare.clamp_norm_factor) for r in group]
        values = optimise_in_batches(model, tasks, bare, resources.forward_checked, bare.v_batch_tokens)
        for task, value in zip(tasks, values):
            v0 = mlp_output_at_first_prompt(model, task.problem, mlp).to(value.delta.device)
            norms.append(float((v0 + value.delta).norm()))
    return norms


class NormReferences:
    """r per ``ReferenceKey``: kept for the run, and read from / written to the statistics folder."""

    def __init__(self, paths: Any, model_slug: str):
        self.paths, self.model_slug = paths, model_slug
        self._memory: dict[ReferenceKey, float] = {}
        self._samples: dict[tuple, tuple[list[dict], Path, int]] = {}
        self.sealed = False  # set once an editor made its references: nothing is computed after that


    def get(self, model: nn.Module, tok: PreTrainedTokenizerBase, hparams: LocateEditHyperParams, layer: int,
            resources: Any) -> float:
        """r of ``layer``; computed from the model as it is when neither memory nor the file has it."""
        requests, dataset_file, pool_size = self._sample(hparams)
        key = ReferenceKey(self.model_slug, str(next(model.parameters()).dtype), hparams.mlp_module_tmp.format(layer),
                           layer, str(dataset_file), pool_size, hparams.value_norm_anchor_samples,
                           hparams.value_norm_anchor_seed, tuple((name, getattr(hparams, name)) for name in SETTINGS))
        if key not in self._memory:
            loaded = self._load(key)
            if loaded is None and self.sealed:
                raise RuntimeError(f"NAS: no reference norm of layer {layer} for these settings was made before the "
                                   f"first edit, and the model may be edited now ({key})")
            self._memory[key] = loaded if loaded is not None else self._compute(model, tok, hparams, key, requests,
                                                                                resources)
        return self._memory[key]

    def _sample(self, hparams: LocateEditHyperParams) -> tuple[list[dict], Path, int]:
        spec = (hparams.value_norm_anchor_dataset, hparams.value_norm_anchor_samples, hparams.value_norm_anchor_seed)
        if spec not in self._samples:
            self._samples[spec] = sample_rewrites(hparams, self.paths, self.model_slug)
        return self._samples[spec]

    def file(self, key: ReferenceKey) -> Optional[Path]:
        """``<stats_dir>/<model>/norm_anchor/<mlp module>_<digest of the key>.json`` (None without paths)."""
        if self.paths is None:
            return None
        folder = Path(self.paths.stats_dir) / self.model_slug.replace("/", "_") / "norm_anchor"
        return folder / f"{key.module}_{key.digest()}.json"

    def _load(self, key: ReferenceKey) -> Optional[float]:
        file = self.file(key)
        if file is None or not file.is_file():
            return None
        try:
            data = json.loads(file.read_text())
            if data["key"] != key.as_json():
                LOG.warning("%s holds the reference norm of other settings; recomputing", file)
                return None
            value = float(data["reference_norm"])
        except (OSError, KeyError, ValueError, TypeError) as e:
            LOG.warning("ignoring unreadable NAS reference file %s (%s); recomputing", file, e)
            return None
        LOG.info("NAS reference norm of layer %d: %.6f (read from %s)", key.layer, value, file)
        return value

    def _compute(self, model, tok, hparams, key: ReferenceKey, requests: list[dict], resources: Any) -> float:
        start = time.perf_counter()
        norms = value_norms(model, tok, hparams, key.layer, requests, resources)
        seconds = time.perf_counter() - start
        if hasattr(resources, "stats_seconds"):  # a statistic of the unedited model: the run's "statistics" time
            resources.stats_seconds += seconds
        r, dropped = upper_trimmed_mean(norms, key.trim_quantile)
        LOG.info("NAS reference norm of layer %d: %.6f over %d rewrites (raw mean %.6f, top %d dropped)",
                 key.layer, r, len(norms), float(np.mean(norms)), dropped)
        file = self.file(key)
        if file is not None:
            write_json_atomic(file, {"key": key.as_json(), "reference_norm": r, "raw_mean": float(np.mean(norms)),
                                     "dropped": dropped, "norms": norms, "seconds": seconds,
                                     "case_ids": [q.get("case_id") for q in requests]})
        return r


def prepare_norm_anchors(model: nn.Module, tok: PreTrainedTokenizerBase, hparams: LocateEditHyperParams,
                         resources: Any) -> dict[int, float]:
    """r of every layer whose values the method solves (for each of its settings), made now; returns the main
    settings' r per layer. An editor calls this when it is built, on the freshly loaded model, before any edit
    or restored checkpoint changes it; the references are then sealed, so that none is ever computed from an
    edited model. Nothing when NAS is off."""
    if not hparams.value_norm_anchor:
        return {}
    check_residual_targets(hparams, model, type(hparams).__name__)  # not on Gemma 2/3 (its docstring)
    for variant in hparams.norm_anchor_variants:
        for layer in hparams.norm_anchor_layers:
            resources.norm_reference(model, tok, variant, layer)
    resources.seal_norm_references()
    return {layer: resources.norm_reference(model, tok, hparams, layer) for layer in hparams.norm_anchor_layers}
