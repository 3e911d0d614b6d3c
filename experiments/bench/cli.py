"""Speed benchmark: figures and fast/reference ratios, as a table and as JSON.

    python -m experiments.bench --models tiny,smollm2-135m --edits 4 --json bench.json

Measured in one process per model, on copies of the same starting weights:
- statistics collection for the candidate layers: one corpus pass vs one pass per layer (reference);
- seconds per WilKE edit (scan + apply + roll-back) in fast and reference mode, and whether both
  choose the same layer and produce the same update on every edit;
- seconds per ROME edit at the fixed layer;
- the approximate scan: seconds per edit (sequential, with roll-back) and, over separate edits each
  scanned from the unedited weights, how often it chooses the exact scan's layer;
- peak resident memory and the bytes of factorised covariances held.
Edits run sequentially with roll-back, as in the lifelong protocol. ``--parts`` picks what to
measure; ``--agreement_file`` keeps the per-edit agreement results so a long measurement (64 exact
scans) resumes after a stop. The 16-edit fast/reference comparison of two whole runs is
``experiments.summary.compare_runs`` on two ``experiments.evaluate`` runs (resumable too).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from editing.layer_stats import layer_stats
from editing.requests import record_request, swapped_request
from editing.resources import EditResources
from experiments.bench.agreement import AgreementStore, agreement_config, bench_approximate
from experiments.bench.models import load_bench_model
from rome.editor import apply_rome_to_model
from rome.rome_hparams import ROMEHyperParams
from util import nethook
from util.architectures import num_layers
from util.globals import load_paths
from util.placement import device_name, synchronize
from wilke.editor import apply_wilke_to_model
from wilke.wilke_hparams import WilKEHyperParams

LOG = logging.getLogger("experiments.bench")


@dataclasses.dataclass
class WilKETrace:
    seconds: list[float]
    layers: list[int]
    deltas: list[torch.Tensor]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_records(n: int, run_dir: Optional[Path] = None) -> list[dict]:
    """The first n valid CounterFact records (edits need not be known facts to be timed), or the first
    n records of an evaluate run's edit stream (to measure on the edits that run made)."""
    from dsets.counterfact import CounterFactDataset
    from dsets.records import load_counterfact_file
    from util.tiny_models import tiny_records

    if run_dir is not None:
        meta = json.loads((Path(run_dir) / "run.json").read_text())
        by_id = {r["case_id"]: r for r in load_counterfact_file(meta["dataset_file"], "skip").records}
        return [by_id[c] for c in meta["edit_stream_case_ids"][:n]]
    try:
        records = CounterFactDataset(load_paths(), allow_download=False).records
    except FileNotFoundError:
        records = tiny_records()
    return [records[i % len(records)] for i in range(n)]


def time_stats(model, tok, hp, slug: str, stats_dir: Path, one_pass: bool, n_samples: int) -> dict:
    """Collect the candidate layers' statistics from scratch into ``stats_dir`` and time it."""
    names = [hp.rewrite_module_tmp.format(l) for l in range(hp.scanning_ceiling)]
    paths = load_paths(stats_dir=str(stats_dir))
    synchronize(model)
    start = time.perf_counter()
    stats = layer_stats(model, tok, names, hp.mom2_dataset, n_samples, paths, slug,
                        dtype=hp.mom2_dtype, max_length=hp.mom2_max_length, one_pass=one_pass, progress=False)
    synchronize(model)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "forward_tokens": stats.run.forward_tokens, "real_tokens": stats.run.real_tokens,
            "real_tokens_per_second": stats.run.real_tokens / seconds, "corpus_passes": stats.run.corpus_passes,
            "layers": len(names), "samples": n_samples}




def run_wilke(model, tok, hp, records, resources) -> WilKETrace:
    trace = WilKETrace([], [], [])
    for record in records:
        request = record_request(record)
        start = time.perf_counter()
        _, orig, result = apply_wilke_to_model(model, tok, [request], hp, return_orig_weights=True, resources=resources)
        layer = result.edits[0].layer
        name = next(iter(orig))
        delta = nethook.get_parameter(model, name).detach() - orig[name]
        apply_wilke_to_model(model, tok, [swapped_request(request)], hp, edited_layer=layer, resources=resources)
        synchronize(model)
        trace.seconds.append(time.perf_counter() - start)
        trace.layers.append(layer)
        trace.deltas.append(delta)
    return trace


def run_rome(model, tok, hp, records, resources) -> list[float]:
    seconds = []
    for record in records:
        request = record_request(record)
        start = time.perf_counter()
        apply_rome_to_model(model, tok, [request], hp, resources=resources)
        synchronize(model)
        seconds.append(time.perf_counter() - start)
    return seconds


def time_alphaedit(model, tok, hparams_file: Path, records: list[dict], resources: EditResources) -> dict:
    """One AlphaEdit edit of a batch, timed after its statistics and null spaces were made."""
    from alphaedit import AlphaEditEditor, AlphaEditHyperParams, apply_alphaedit_to_model

    hp = AlphaEditHyperParams.from_json(hparams_file)
    start = time.perf_counter()
    editor = AlphaEditEditor(model, tok, hp, resources)  # statistics and null spaces
    synchronize(model)
    setup = time.perf_counter() - start
    start = time.perf_counter()
    apply_alphaedit_to_model(model, tok, [record_request(r) for r in records], hp, editor=editor)
    synchronize(model)
    seconds = time.perf_counter() - start
    return {"batch": len(records), "seconds_per_batch": seconds, "seconds_per_edit": seconds / len(records),
            "layers": list(hp.layers), "statistics_and_null_spaces_seconds": setup}


def mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def relative_difference(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    return max(float((x - y).norm() / x.norm()) if x.shape == y.shape else float("inf") for x, y in zip(a, b))


PARTS = ("stats", "wilke", "approximate", "rome", "alphaedit", "agreement")
ALPHAEDIT_BATCH = 4  # requests per timed AlphaEdit edit


def bench_model(name: str, n_edits: int, n_approx: int, skip_reference: bool, stats_samples: int, tmp: Path,
                parts: Sequence[str] = PARTS, agreement_file: Optional[Path] = None,
                shard: tuple[int, int] = (0, 1), edit_stats_samples: Optional[int] = None,
                dtype: str = "float32", device: Optional[str] = None, records_from_run: Optional[Path] = None) -> dict:
    model, tok, hp_dir, slug, stats_dir = load_bench_model(name, tmp, getattr(torch, dtype), device)
    fname = f"{'tiny-llama' if name == 'tiny' else slug}.json"
    wh = WilKEHyperParams.from_json(hp_dir / "WilKE" / fname)
    rh = ROMEHyperParams.from_json(hp_dir / "ROME" / fname)
    if edit_stats_samples:
        # edit timings do not depend on how many samples the covariances came from
        wh, rh = wh.replace(mom2_n_samples=edit_stats_samples), rh.replace(mom2_n_samples=edit_stats_samples)
    out: dict[str, Any] = {"model": name, "candidate_layers": wh.scanning_ceiling, "edits": n_edits,
                           "edit_stats_samples": wh.mom2_n_samples, "dtype": dtype,
                           "device": str(next(model.parameters()).device), "device_name": device_name(model)}
    n_stats = min(stats_samples, wh.mom2_n_samples)
    if "stats" in parts:
        if not skip_reference:
            out["stats_reference"] = time_stats(model, tok, wh, slug, tmp / f"stats-ref-{slug}", False, n_stats)
        out["stats_fast"] = time_stats(model, tok, wh, slug, tmp / f"stats-one-{slug}", True, n_stats)
    # edits use the statistics of the hparams (from the run cache when already collected)
    paths = load_paths(stats_dir=str(stats_dir))
    records = bench_records(max(n_edits, n_approx, ALPHAEDIT_BATCH if "alphaedit" in parts else 0), records_from_run)
    editable = {f"{wh.rewrite_module_tmp.format(l)}.weight" for l in range(num_layers(model))}
    start_state = {n: p.detach().clone() for n, p in model.named_parameters() if n in editable}

    def fresh_resources(one_pass: bool = True) -> EditResources:
        with torch.no_grad():
            for n, value in start_state.items():
                nethook.get_parameter(model, n).copy_(value)
        return EditResources(paths, slug, one_pass_stats=one_pass, progress=False)

    # statistics missing from the cache are collected here, outside every timed edit
    out["covariance_bytes"] = _covariance_bytes(model, tok, wh, paths, slug)
    _progress(out)
    if "wilke" in parts:
        fast = run_wilke(model, tok, wh.replace(implementation="fast"), records[:n_edits], fresh_resources())
        out["wilke_fast"] = {"seconds_per_edit": mean(fast.seconds), "layers": fast.layers}
        _progress(out)
        if not skip_reference:
            ref = run_wilke(model, tok, wh.replace(implementation="reference"), records[:n_edits], fresh_resources())
            out["wilke_reference"] = {"seconds_per_edit": mean(ref.seconds), "layers": ref.layers}
            out["same_layers"] = ref.layers == fast.layers
            out["max_relative_update_difference"] = relative_difference(ref.deltas, fast.deltas)
            _progress(out)
    if "approximate" in parts:
        approx = run_wilke(model, tok, wh.replace(scan="approximate"), records[:n_edits], fresh_resources())
        out["wilke_approximate"] = {"seconds_per_edit": mean(approx.seconds), "layers": approx.layers}
        _progress(out)
    if "rome" in parts:
        out["rome_fast"] = {"seconds_per_edit": mean(run_rome(model, tok, rh, records[:n_edits], fresh_resources()))}
        _progress(out)
    if "alphaedit" in parts and not (hp_dir / "AlphaEdit" / fname).is_file():
        LOG.info("%s: no AlphaEdit hparams file (none for Gemma 2/3: util/architectures.py check_residual_targets)", name)
    elif "alphaedit" in parts:
        out["alphaedit"] = time_alphaedit(model, tok, hp_dir / "AlphaEdit" / fname, records[:ALPHAEDIT_BATCH],
                                          fresh_resources())
        _progress(out)
    if "agreement" in parts and n_approx:
        store = AgreementStore(agreement_file, {"model": name, **agreement_config(wh)}) if agreement_file else None
        out["approximate_agreement"] = bench_approximate(model, tok, wh, records[:n_approx], fresh_resources, store,
                                                         shard=shard)
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def _progress(partial: dict) -> None:
    """Figures so far, so a long benchmark that is stopped still leaves its measurements."""
    print("partial: " + json.dumps({k: v for k, v in partial.items()}), flush=True)


def _covariance_bytes(model, tok, wh, paths, slug) -> int:
    res = EditResources(paths, slug, progress=False)
    res.covariances(model, tok, wh, [wh.rewrite_module_tmp.format(l) for l in range(wh.scanning_ceiling)])
    return res.covariance_bytes


def _seconds(r: dict, key: str) -> Optional[float]:
    return r[key]["seconds_per_edit"] if key in r else None


def ratios(r: dict) -> dict:
    out = {}
    ref, fast, approx = (_seconds(r, k) for k in ("wilke_reference", "wilke_fast", "wilke_approximate"))
    if ref and fast:
        out["wilke_reference_over_fast"] = ref / fast
    if ref and approx:
        out["wilke_reference_over_approximate"] = ref / approx
    if "stats_reference" in r and "stats_fast" in r:
        out["stats_reference_over_one_pass"] = r["stats_reference"]["seconds"] / r["stats_fast"]["seconds"]
        out["stats_forward_token_ratio"] = r["stats_reference"]["forward_tokens"] / r["stats_fast"]["forward_tokens"]
    agreement = r.get("approximate_agreement")
    if agreement and agreement.get("approx_scan_seconds"):
        out["exact_over_approximate_scan"] = agreement["exact_scan_seconds"] / agreement["approx_scan_seconds"]
    return out


def table(results: list[dict]) -> str:
    def cell(r: dict, *keys: str, spec: str = ".2f", scale: float = 1.0, suffix: str = "") -> str:
        value: Any = r
        for k in keys:
            if not isinstance(value, dict) or k not in value:
                return "-"
            value = value[k]
        return f"{value * scale:{spec}}{suffix}" if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)

    rows = [("model", "WilKE fast s/edit", "WilKE ref s/edit", "ratio", "same layers", "approx s/edit", "ROME s/edit",
             "AlphaEdit s/edit", "stats 1-pass s", "stats ref s", "approx agree", "cov MB", "peak MB")]
    for r in results:
        rows.append((
            r["model"],
            cell(r, "wilke_fast", "seconds_per_edit"),
            cell(r, "wilke_reference", "seconds_per_edit"),
            cell(r, "ratios", "wilke_reference_over_fast", suffix="x"),
            cell(r, "same_layers"),
            cell(r, "wilke_approximate", "seconds_per_edit"),
            cell(r, "rome_fast", "seconds_per_edit"),
            cell(r, "alphaedit", "seconds_per_edit"),
            cell(r, "stats_fast", "seconds", spec=".1f"),
            cell(r, "stats_reference", "seconds", spec=".1f"),
            cell(r, "approximate_agreement", "agreement", spec=".0%"),
            cell(r, "covariance_bytes", spec=".0f", scale=2**-20),
            cell(r, "peak_rss_mb", spec=".0f"),
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments.bench", description=__doc__.split("\n")[0])
    p.add_argument("--models", default="tiny,smollm2-135m,gemma-3-270m")
    p.add_argument("--edits", type=int, default=16, help="sequential WilKE edits (with roll-back) per mode")
    p.add_argument("--approx_edits", type=int, default=64, help="edits for the approximate-scan agreement (0: skip)")
    p.add_argument("--skip_reference", action="store_true", help="time the fast mode only")
    p.add_argument("--stats_samples", type=int, default=200, help="corpus samples for the statistics timing")
    p.add_argument("--edit_stats_samples", type=int, default=None,
                   help="covariances of this many samples for the timed edits (default: the hparams'; "
                        "saves collecting full statistics on a machine that has none cached)")
    p.add_argument("--parts", default=",".join(PARTS),
                   help=f"what to measure, comma-separated from {','.join(PARTS)} (default: all)")
    p.add_argument("--agreement_file", default=None,
                   help="JSON-lines file of per-edit agreement results: measured edits are appended and "
                        "reused by the next run, so a long agreement measurement resumes")
    p.add_argument("--agreement_shard", default="0/1",
                   help="i/n: measure only agreement edits i, i+n, ... (run n processes on one --agreement_file)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32", help="the models' precision")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--records_from_run", default=None,
                   help="edit the first records of this evaluate run's edit stream (e.g. to measure the approximate "
                   "scan's agreement on the edits a run made) instead of the first CounterFact records")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    try:
        i, n = (int(x) for x in args.agreement_shard.split("/"))
        if not 0 <= i < n:
            raise ValueError
    except ValueError:
        p.error(f"--agreement_shard {args.agreement_shard!r}: expected i/n with 0 <= i < n")
    args.shard = (i, n)
    unknown = set(args.parts.split(",")) - set(PARTS)
    if unknown:
        p.error(f"--parts: unknown part(s) {sorted(unknown)}; choose from {list(PARTS)}")
    return args


def main(argv: Optional[Sequence[str]] = None) -> list[dict]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    LOG.setLevel(logging.INFO)
    parts = args.parts.split(",")
    results = []
    with tempfile.TemporaryDirectory(prefix="wilke-bench-") as tmp:
        for name in [m for m in args.models.split(",") if m]:
            r = bench_model(name, args.edits, args.approx_edits, args.skip_reference, args.stats_samples, Path(tmp),
                            parts=parts, agreement_file=Path(args.agreement_file) if args.agreement_file else None,
                            shard=args.shard, edit_stats_samples=args.edit_stats_samples, dtype=args.dtype,
                            device=args.device,
                            records_from_run=Path(args.records_from_run) if args.records_from_run else None)
            r["ratios"] = ratios(r)
            results.append(r)
            print(json.dumps(r), flush=True)
    print(table(results))
    meta = {"torch_threads": torch.get_num_threads(), "command": ["python", "-m", "experiments.bench", *(sys.argv[1:] if argv is None else argv)], "results": results}
    if args.json:
        Path(args.json).write_text(json.dumps(meta, indent=1))
    return results
