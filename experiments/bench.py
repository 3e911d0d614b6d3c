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
``experiments.compare_runs`` on two ``experiments.evaluate`` runs (resumable too).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from editing.layer_stats import layer_stats
from editing.requests import normalise_request, record_request, swapped_request
from editing.resources import EditResources
from rome.rome_hparams import ROMEHyperParams
from rome.rome_main import apply_rome_to_model
from util.globals import load_paths
from wilke.wilke_hparams import WilKEHyperParams
from wilke.wilke_main import adaptabilities, apply_wilke_to_model, approximate_choice, choose_layer, scan_layers

LOG = logging.getLogger("experiments.bench")


@dataclasses.dataclass
class WilKETrace:
    seconds: list[float]
    layers: list[int]
    deltas: list[torch.Tensor]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load_bench_model(name: str, tmp: Path):
    """(model, tok, hparams_dir, slug, stats_dir): the tiny model is built here, real ones are loaded."""
    if name == "tiny":
        from tests.tiny import TinyWorld, rank_one_hparams

        world = TinyWorld(tmp / "tiny", "llama", n_layer=6)
        base = rank_one_hparams("llama", 6, mom2_n_samples=200)
        world.write_hparams("ROME", base)
        world.write_hparams("WilKE", {**base, "scanning_ceiling": 5})
        from util.models import load_model

        model, tok = load_model(str(world.model_dir), device="cpu")
        return model, tok, world.hparams_dir, "tiny-llama", world.stats_dir
    from util.models import load_model, model_slug

    model, tok = load_model(name)
    paths = load_paths()
    return model, tok, paths.hparams_dir, model_slug(name), paths.stats_dir


def bench_records(n: int) -> list[dict]:
    """The first n valid CounterFact records (edits need not be known facts to be timed)."""
    from dsets.counterfact import CounterFactDataset
    from tests.tiny import tiny_records

    try:
        records = CounterFactDataset(load_paths(), allow_download=False).records
    except FileNotFoundError:
        records = tiny_records()
    return [records[i % len(records)] for i in range(n)]


def time_stats(model, tok, hp, slug: str, stats_dir: Path, one_pass: bool, n_samples: int) -> dict:
    """Collect the candidate layers' statistics from scratch into ``stats_dir`` and time it."""
    names = [hp.rewrite_module_tmp.format(l) for l in range(hp.scanning_ceiling)]
    paths = load_paths(stats_dir=str(stats_dir))
    start = time.perf_counter()
    stats = layer_stats(model, tok, names, hp.mom2_dataset, n_samples, paths, slug,
                        dtype=hp.mom2_dtype, max_length=hp.mom2_max_length, one_pass=one_pass, progress=False)
    return {"seconds": time.perf_counter() - start, "forward_tokens": stats.run.forward_tokens,
            "corpus_passes": stats.run.corpus_passes, "layers": len(names), "samples": n_samples}


def run_wilke(model, tok, hp, records, resources) -> WilKETrace:
    trace = WilKETrace([], [], [])
    for record in records:
        request = record_request(record)
        start = time.perf_counter()
        _, orig, result = apply_wilke_to_model(model, tok, [request], hp, return_orig_weights=True, resources=resources)
        layer = result.edits[0].layer
        name = next(iter(orig))
        delta = dict(model.named_parameters())[name].detach() - orig[name]
        apply_wilke_to_model(model, tok, [swapped_request(request)], hp, edited_layer=layer, resources=resources)
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
        seconds.append(time.perf_counter() - start)
    return seconds


def mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def relative_difference(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    return max(float((x - y).norm() / x.norm()) if x.shape == y.shape else float("inf") for x, y in zip(a, b))


PARTS = ("stats", "wilke", "approximate", "rome", "agreement")


def bench_model(name: str, n_edits: int, n_approx: int, skip_reference: bool, stats_samples: int, tmp: Path,
                parts: Sequence[str] = PARTS, agreement_file: Optional[Path] = None,
                shard: tuple[int, int] = (0, 1), edit_stats_samples: Optional[int] = None) -> dict:
    model, tok, hp_dir, slug, stats_dir = load_bench_model(name, tmp)
    fname = f"{'tiny-llama' if name == 'tiny' else slug}.json"
    wh = WilKEHyperParams.from_json(hp_dir / "WilKE" / fname)
    rh = ROMEHyperParams.from_json(hp_dir / "ROME" / fname)
    if edit_stats_samples:
        # edit timings do not depend on how many samples the covariances came from
        wh, rh = wh.replace(mom2_n_samples=edit_stats_samples), rh.replace(mom2_n_samples=edit_stats_samples)
    out: dict[str, Any] = {"model": name, "candidate_layers": wh.scanning_ceiling, "edits": n_edits,
                           "edit_stats_samples": wh.mom2_n_samples}
    n_stats = min(stats_samples, wh.mom2_n_samples)
    if "stats" in parts:
        if not skip_reference:
            out["stats_reference"] = time_stats(model, tok, wh, slug, tmp / f"stats-ref-{slug}", False, n_stats)
        out["stats_fast"] = time_stats(model, tok, wh, slug, tmp / f"stats-one-{slug}", True, n_stats)
    # edits use the statistics of the hparams (from the run cache when already collected)
    paths = load_paths(stats_dir=str(stats_dir))
    records = bench_records(max(n_edits, n_approx))
    start_state = copy.deepcopy(model.state_dict())

    def fresh_resources(one_pass: bool = True) -> EditResources:
        model.load_state_dict(start_state)
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


def agreement_config(wh: WilKEHyperParams) -> dict:
    """What an exact scan depends on; stored lines with another config are not reused."""
    return {"scanning_ceiling": wh.scanning_ceiling, "v_num_grad_steps": wh.v_num_grad_steps, "v_lr": wh.v_lr,
            "layers_of": wh.rewrite_module_tmp, "context_template_length_params": wh.context_template_length_params,
            "mom2_n_samples": wh.mom2_n_samples, "mom2_adjustment": wh.mom2_adjustment}


class AgreementStore:
    """Per-edit agreement results, one JSON line each, so a long measurement resumes where it stopped.

    Each line is flushed and fsynced as soon as its edit is measured; a line cut short by a kill
    is ignored on reading (and logged), as are lines measured under another configuration.
    """

    def __init__(self, path: Path, config: dict):
        self.path = Path(path)
        self.config = json.loads(json.dumps(config))  # normalised as it will read back
        self.done: dict[str, dict] = {}
        if self.path.exists():
            for n, line in enumerate(self.path.read_text().splitlines(), 1):
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    LOG.warning("%s line %d is not JSON (cut short by a kill?); ignored", self.path, n)
                    continue
                if isinstance(entry, dict) and entry.get("config") == self.config and "case_id" in entry:
                    self.done[str(entry["case_id"])] = entry

    def get(self, case_id: Any) -> Optional[dict]:
        return self.done.get(str(case_id))

    def add(self, entry: dict) -> None:
        entry = {**entry, "config": self.config}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(entry) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.done[str(entry["case_id"])] = entry


APPROX_GRID = [(steps, top_k) for steps in (1, 2, 3, 5, 8) for top_k in (1, 2, 3)]


def bench_approximate(model, tok, wh, records, fresh_resources, store: Optional[AgreementStore] = None,
                      n_timed: int = 4, shard: tuple[int, int] = (0, 1)) -> dict:
    """Agreement of the approximate scan with the exact one, each edit from the unedited weights.

    Each edit gets one exact scan; the approximate choice for every (grad_steps, top_k) of
    APPROX_GRID is read off it (wilke_main.approximate_choice, equal by construction and tested).
    On the first ``n_timed`` edits the approximate scan is also run for real, to time it and to
    confirm the read-off choice. ``shard`` (i, n) measures only edits i, i+n, i+2n, ... so n
    processes can share one store; a later unsharded call reads all of them back.
    """
    res = fresh_resources()
    approx_hp = wh.replace(scan="approximate")
    entries, reused = [], 0
    for i, record in enumerate(records):
        request = normalise_request(record_request(record))
        entry = store.get(request.get("case_id")) if store else None
        if i % shard[1] != shard[0]:
            if entry is not None:
                entries.append(entry)
            continue
        if entry is None:
            t0 = time.perf_counter()
            la, la_by_pass = adaptabilities(model, scan_layers(model, tok, request, wh, wh.candidate_layers, res))
            entry = {"case_id": request.get("case_id"), "exact_layer": min(la, key=la.get),
                     "exact_seconds": time.perf_counter() - t0,
                     "la": {str(l): v for l, v in la.items()}, "la_by_pass": {str(l): v for l, v in la_by_pass.items()}}
            if store:
                store.add(entry)
        else:
            reused += 1
        if i < n_timed and entry.get("approx_setting") != [wh.approx_grad_steps, wh.approx_top_k]:
            t0 = time.perf_counter()
            approx, _ = choose_layer(model, tok, request, approx_hp, res)
            entry = {**entry, "approx_layer": approx.layer, "approx_seconds": time.perf_counter() - t0,
                     "approx_setting": [wh.approx_grad_steps, wh.approx_top_k]}
            if store:
                store.add(entry)
        LOG.info("agreement %d/%d: case %s exact layer %s", i + 1, len(records), entry["case_id"], entry["exact_layer"])
        entries.append(entry)
    if not entries:
        return {"edits": 0}
    grid = {f"{s}x{k}": sum(_read_off(e, s, k) == e["exact_layer"] for e in entries) / len(entries) for s, k in APPROX_GRID}
    setting = (wh.approx_grad_steps, wh.approx_top_k)
    timed = [e for e in entries if e.get("approx_setting") == list(setting)]
    return {
        "edits": len(entries), "reused_from_file": reused,
        "approx_grad_steps": setting[0], "approx_top_k": setting[1],
        "agreement": sum(_read_off(e, *setting) == e["exact_layer"] for e in entries) / len(entries),
        "agreement_by_setting": grid,
        "exact_scan_seconds": mean([e["exact_seconds"] for e in entries]),
        "approx_scan_seconds": mean([e["approx_seconds"] for e in timed]) if timed else None,
        "approx_runs_matching_read_off": f"{sum(e['approx_layer'] == _read_off(e, *setting) for e in timed)}/{len(timed)}",
        "disagreements": [(e["case_id"], e["exact_layer"], _read_off(e, *setting)) for e in entries
                          if _read_off(e, *setting) != e["exact_layer"]],
    }


def _read_off(entry: dict, steps: int, top_k: int) -> int:
    """The approximate scan's choice for a stored entry (JSON keys are strings)."""
    la_by_pass = {int(l): v for l, v in entry["la_by_pass"].items()}
    return approximate_choice(la_by_pass, {int(l): v for l, v in entry["la"].items()}, steps, top_k)


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
             "stats 1-pass s", "stats ref s", "approx agree", "cov MB", "peak MB")]
    for r in results:
        rows.append((
            r["model"],
            cell(r, "wilke_fast", "seconds_per_edit"),
            cell(r, "wilke_reference", "seconds_per_edit"),
            cell(r, "ratios", "wilke_reference_over_fast", suffix="x"),
            cell(r, "same_layers"),
            cell(r, "wilke_approximate", "seconds_per_edit"),
            cell(r, "rome_fast", "seconds_per_edit"),
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
                            shard=args.shard, edit_stats_samples=args.edit_stats_samples)
            r["ratios"] = ratios(r)
            results.append(r)
            print(json.dumps(r), flush=True)
    print(table(results))
    meta = {"torch_threads": torch.get_num_threads(), "command": ["python", "-m", "experiments.bench", *(sys.argv[1:] if argv is None else argv)], "results": results}
    if args.json:
        Path(args.json).write_text(json.dumps(meta, indent=1))
    return results


if __name__ == "__main__":
    main()
