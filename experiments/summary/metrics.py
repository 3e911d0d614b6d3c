"""The numbers of a lifelong-editing summary, the same for every protocol.

A protocol's reader gives, at each checkpoint n, the per-record metrics that count at n edits
(roll-back and immediate: each of records 1..n read right after its own edit; sequential: records
1..n read after n edits) and the ratios only it measures (roll-back: ERS = edit_retention / n, ORS =
orig_retention / orig_retention_len; sequential and immediate: PS = share of the untouched records
still answered with target_true, PU = share answered as the unedited model did). From these:
- ES, GS, LS: mean over the records of each record's mean of rewrite / paraphrase / neighborhood
  ``*_prompts_correct`` (greedy decoding reproduces the expected target; zsRE: token accuracies);
- S: harmonic mean of ES, GS, LS, ERS, ORS, a zero counted as 1e-4 (so one collapsed component
  pulls S towards zero instead of making it undefined); only where the protocol measures ERS/ORS;
- ROME's probability scores: efficacy_score = P[nll(new) < nll(true)] on the rewrite prompts,
  paraphrase_score likewise, neighborhood_score = P[nll(true) < nll(new)];
- fluency (``ngram_entropy``) and consistency (``reference_score``) averaged over the records that
  have them (generation tests may be skipped or run every k edits);
- LU, locality as unchanged prediction: mean of the share of neighbourhood prompts the edited model
  answers as the unedited one did; LU_tokens the same over answer tokens (EasyEdit's locality);
- flashes: how many of the steps (edits or batches) up to n are toxicity flashes.
A record with no prompt of a kind (e.g. no paraphrases) is left out of that kind's mean. Across runs:
mean and population standard deviation (ddof=0, numpy's default) over the runs that reach n.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterable, Optional, Sequence

import numpy as np

from experiments.store.run_types import LoadedRuns, Run, SkippedRun
from experiments.summary.norm_growth import NormCurves, update_norms

COMPONENTS = ("ES", "GS", "LS", "ERS", "ORS")
RETENTION_RATIOS = ("ERS", "ORS")  # the roll-back protocol's: S exists where these do
PROBABILITY_SCORES = ("efficacy_score", "paraphrase_score", "neighborhood_score")
GENERATION_SCORES = {"fluency": "ngram_entropy", "consistency": "reference_score"}
LOCALITY_SCORES = {"LU": "neighborhood_prompts_unchanged", "LU_tokens": "neighborhood_prompts_unchanged_tokens"}
PRESERVATION_SCORES = ("PS", "PU")
# WILD (--wild): the same prompts answered by free generation; each beside its teacher-forced score
WILD_SCORES = {
    "ES_wild": "wild_rewrite_prompts_exact", "GS_wild": "wild_paraphrase_prompts_exact",
    "LS_wild": "wild_neighborhood_prompts_exact", "LU_wild": "wild_neighborhood_prompts_unchanged",
    "ES_wild_prefix": "wild_rewrite_prompts_lenient", "GS_wild_prefix": "wild_paraphrase_prompts_lenient",
    "ES_wild_f1": "wild_rewrite_prompts_f1", "GS_wild_f1": "wild_paraphrase_prompts_f1",
    "Port_wild": "wild_portability_prompts_exact",
}
PORTABILITY_SCORES = {"Port": "portability_prompts_correct"}  # zsRE records with portability questions
METRICS = (*COMPONENTS, "S", *LOCALITY_SCORES, *PRESERVATION_SCORES, *PROBABILITY_SCORES, *GENERATION_SCORES,
           *PORTABILITY_SCORES, *WILD_SCORES, "flashes")
OPTIONAL_METRICS = {*LOCALITY_SCORES, *PRESERVATION_SCORES, *GENERATION_SCORES, *PORTABILITY_SCORES, *WILD_SCORES,
                    "ERS", "ORS", "S"}
ZERO_AS = 1e-4
DEFAULT_FLASH_FACTOR = 5.0
CORRECT_KEYS = {"ES": "rewrite", "GS": "paraphrase", "LS": "neighborhood"}
# ROME's probability scores: the prompt kind and whether target_new must be the likelier one
PROBABILITY_KEYS = {
    "efficacy_score": ("rewrite", True),
    "paraphrase_score": ("paraphrase", True),
    "neighborhood_score": ("neighborhood", False),
}


def harmonic_score(components: Sequence[float], zero_as: float = ZERO_AS) -> float:
    """Harmonic mean with zeros counted as ``zero_as``; NaN when a component is unknown."""
    values = [zero_as if v == 0 else float(v) for v in components]
    if not values or any(math.isnan(v) for v in values):
        return math.nan
    return len(values) / sum(1.0 / v for v in values)


def _mean(values: Iterable[float]) -> float:
    values = [float(v) for v in values]
    return float(np.mean(values)) if values else math.nan


def _nll_pair(entry: Any) -> tuple[float, float]:
    return float(entry["target_new"]), float(entry["target_true"])


def record_scores(post: dict[str, Any]) -> dict[str, float]:
    """One record's means over its prompts (NaN for a kind it has no prompts or values of)."""
    scores = {name: _mean(post[f"{kind}_prompts_correct"]) for name, kind in CORRECT_KEYS.items()}
    for name, key in {**LOCALITY_SCORES, **PORTABILITY_SCORES, **WILD_SCORES}.items():
        scores[name] = _mean(post[key]) if isinstance(post.get(key), list) and post[key] else math.nan
    for name, (kind, new_wins) in PROBABILITY_KEYS.items():
        pairs = [_nll_pair(p) for p in post.get(f"{kind}_prompts_probs") or []]
        scores[name] = _mean((new < true) if new_wins else (true < new) for new, true in pairs)
    for name, key in GENERATION_SCORES.items():
        value = post.get(key)
        scores[name] = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan
    return scores


def toxicity_flashes(norms: Sequence[float], factor: float = DEFAULT_FLASH_FACTOR) -> list[bool]:
    """Edit i is a toxicity flash when its update norm exceeds ``factor`` times the median norm of
    edits 1..i-1 (the running median of earlier edits). The first edit has no history and is
    never a flash; NaN norms are never flashes and are left out of later medians."""
    flags: list[bool] = []
    history: list[float] = []
    for norm in norms:
        norm = float(norm)
        flags.append(bool(history) and not math.isnan(norm) and norm > factor * float(np.median(history)))
        if not math.isnan(norm):
            history.append(norm)
    return flags


def _column_means(rows: Sequence[dict[str, float]]) -> dict[str, float]:
    """NaN-ignoring mean of each per-edit score over ``rows`` (NaN when no row has it)."""
    scores: dict[str, float] = {}
    for name in (*CORRECT_KEYS, *LOCALITY_SCORES, *PROBABILITY_KEYS, *GENERATION_SCORES, *PORTABILITY_SCORES,
                 *WILD_SCORES):
        column = np.array([e[name] for e in rows], dtype=float)
        scores[name] = float(np.nanmean(column)) if not np.all(np.isnan(column)) else math.nan
    return scores


def checkpoint_scores(run: Run, n: int, flash_factor: float = DEFAULT_FLASH_FACTOR,
                      cache: Optional[dict[int, dict[str, float]]] = None) -> dict[str, float]:
    """Every metric of ``run`` at checkpoint n (one of its protocol's checkpoints). ``cache`` keeps
    per-record scores by ``id`` of the post, for protocols whose checkpoints share posts."""
    if n not in run.checkpoints or n > run.n_edits:
        raise KeyError(f"{run.label} has no checkpoint {n}")
    checkpoint = run.checkpoints[n]
    cache = {} if cache is None else cache
    rows = [cache.setdefault(id(post), record_scores(post)) for post in checkpoint.posts]
    scores = {m: math.nan for m in METRICS}
    scores.update(_column_means(rows))
    scores.update(checkpoint.ratios)  # the protocol's ratios, and general abilities where checked
    if all(c in checkpoint.ratios for c in RETENTION_RATIOS):
        scores["S"] = harmonic_score([scores[c] for c in COMPONENTS])
    steps = sum(1 for end in run.step_ends if end <= n)
    scores["flashes"] = float(sum(toxicity_flashes(update_norms(run)[:steps], flash_factor)))
    return scores


@dataclasses.dataclass
class Summary:
    """Per-run scores, the table aggregated over runs, and what was left out and why."""

    rows: list[dict[str, Any]]  # one per (algorithm, checkpoint): n_runs, <metric>_mean, <metric>_std
    per_run: list[dict[str, Any]]  # one per (run, checkpoint)
    runs: list[Run]
    skipped: list[SkippedRun]
    notes: list[str]
    flash_factor: float
    extra_metrics: list[str] = dataclasses.field(default_factory=list)  # general abilities (capability checks)
    saved_curves: list[NormCurves] = dataclasses.field(default_factory=list)  # of saved summaries' runs (no folders)

    @property
    def algorithms(self) -> list[str]:
        """The algorithms of the rows (a saved summary's too, which have no run folders here), then any
        run's whose rows are missing."""
        return list(dict.fromkeys([r["algorithm"] for r in self.rows] + [r.algorithm for r in self.runs]))

    def runs_of(self, algorithm: str) -> list[Run]:
        return [r for r in self.runs if r.algorithm == algorithm]

    def norm_curves_of(self, algorithm: str) -> list[NormCurves]:
        """Norm curves of the algorithm's runs: from their folders, or as a saved summary kept them."""
        return ([NormCurves.of_run(r) for r in self.runs_of(algorithm)]
                + [c for c in self.saved_curves if c.algorithm == algorithm])

    def present_metrics(self) -> list[str]:
        """METRICS without the optional ones (generation, locality, protocol-specific) that no row has."""
        return [m for m in METRICS if m not in OPTIONAL_METRICS
                or any(not _isnan(r.get(f"{m}_mean")) for r in self.rows)] + list(self.extra_metrics)


def _isnan(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _aggregate(algorithm: str, n: int, run_rows: list[dict[str, Any]], metrics: Sequence[str]) -> dict[str, Any]:
    row: dict[str, Any] = {"algorithm": algorithm, "checkpoint": n, "n_runs": len(run_rows),
                           "runs": ",".join(r["run"] for r in run_rows),
                           # records the scores average over: n, or fewer at a sampled checkpoint (--eval_sample)
                           "evaluated": min((r["evaluated"] for r in run_rows), default=0)}
    for m in metrics:
        values = np.array([r.get(m, math.nan) for r in run_rows], dtype=float)
        known = values[~np.isnan(values)]
        # NaN when any run lacks the metric: a mean over a different set of runs would mislead
        complete = known.size == values.size and known.size > 0
        row[f"{m}_mean"] = float(known.mean()) if complete else math.nan
        row[f"{m}_std"] = float(known.std()) if complete else math.nan
    return row


def summarize(loaded: LoadedRuns, checkpoints: Optional[Sequence[int]] = None,
              flash_factor: float = DEFAULT_FLASH_FACTOR) -> Summary:
    """Scores of every run at every checkpoint, and their mean/std per algorithm.

    Default checkpoints: per algorithm, every checkpoint any of its runs has. A run without
    checkpoint n (fewer edits, or n not one of its checkpoints) is left out of that row, and a note
    says so; a checkpoint no run of the algorithm has gets no row at all."""
    notes: list[str] = []
    rows, per_run = [], []
    extras = list(dict.fromkeys(k for r in loaded.runs for c in r.checkpoints.values() for k in c.ratios
                                if k not in METRICS))
    for algorithm, runs in loaded.by_algorithm().items():
        caches: dict[str, dict[int, dict[str, float]]] = {r.label: {} for r in runs}
        points = sorted(checkpoints) if checkpoints else sorted({n for r in runs for n in r.checkpoints})
        for n in points:
            run_rows = []
            for run in runs:
                if n not in run.checkpoints:
                    notes.append(f"{run.label}: no checkpoint {n} (it has {run.n_edits} edits, "
                                 f"checkpoints {sorted(run.checkpoints)}); left out of checkpoint {n}")
                    continue
                scores = checkpoint_scores(run, n, flash_factor, caches[run.label])
                run_rows.append({"algorithm": algorithm, "run": run.name, "checkpoint": n,
                                 "evaluated": len(run.checkpoints[n].posts), **scores})
            per_run += run_rows
            if run_rows:  # a checkpoint none of the algorithm's runs has gets no row (the notes say why)
                rows.append(_aggregate(algorithm, n, run_rows, [*METRICS, *extras]))
    return Summary(rows, per_run, list(loaded.runs), list(loaded.skipped), notes, flash_factor, extras)
