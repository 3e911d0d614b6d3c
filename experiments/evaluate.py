"""Lifelong knowledge-editing evaluation (the WilKE protocol), for every algorithm in the dispatch table.

    python -m experiments.evaluate --alg_name=WilKE --model_name=smollm2-135m \
        --hparams_fname=smollm2-135m.json --ds_name=counterfact --dataset_size_limit=64 \
        --edit_times=4 --skip_generation_tests

Each edit n: apply the edit, evaluate it into ``edit_{n}_on_case_{id}.json``, roll it back (same
algorithm, targets swapped, WilKE on the same layer), never restoring weights; at the retention
checkpoints write ``retention_of_edit_{n}.json``. Everything needed to reproduce the run (command,
hparams, seed, data sizes, versions, git commit, context templates) is saved in the run folder.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from tqdm import tqdm

from experiments.algorithms import ALGORITHMS, Algorithm, get_algorithm, update_norms
from experiments.protocol import (
    ProtocolSplit,
    count_retained,
    edit_request,
    retention_checkpoints,
    split_records,
    swapped_request,
)
from experiments.py.eval_utils_counterfact import compute_rewrite_quality_counterfact
from experiments.run_files import environment_record, new_run_dir, write_json_atomic
from rome.resources import EditResources
from util.architectures import check_hparams_against_model
from util.globals import Paths, load_paths
from util.hparams import HParamsError

LOG = logging.getLogger("experiments.evaluate")
DEFAULT_SEED = 9


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--alg_name", default="WilKE", help=f"one of {', '.join(ALGORITHMS)}")
    p.add_argument("--model_name", default="smollm2-135m", help="smollm2-135m, gemma-3-270m, a Hugging Face id or a local folder")
    p.add_argument("--hparams_fname", default=None, help="file in hparams/<alg_name>/ (default: <model>.json) or a path")
    p.add_argument("--ds_name", default="counterfact", help="counterfact (the model's known subset), counterfact_full, zsre, or a file")
    p.add_argument("--dataset_size_limit", type=int, default=2048, help="known records used (edit stream + original retention)")
    p.add_argument("--edit_times", type=int, default=None, help="number of edits (default: the whole edit stream)")
    p.add_argument("--skip_generation_tests", action="store_true", help="skip fluency/consistency generation tests")
    p.add_argument("--generation_test_interval", type=int, default=1, help="run generation tests every N edits")
    p.add_argument("--conserve_memory", action="store_true", help="keep weight snapshots on the CPU")
    p.add_argument("--dir_name", default=None, help="results/<dir_name>/run_NNN (default: alg_name)")
    p.add_argument("--no_rollback", action="store_true", help="keep every edit (plain sequential editing)")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help="shuffle seed of the known records (paper: 9)")
    p.add_argument("--implementation", choices=("fast", "reference"), default=None, help="override hparams' implementation")
    p.add_argument("--known_source", choices=("counterfact", "knowedit", "both"), default="counterfact",
                   help="records scanned when the known subset has to be built")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--data_dir", default=None)
    p.add_argument("--stats_dir", default=None)
    p.add_argument("--results_dir", default=None)
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


def resolve_hparams_path(paths: Paths, alg: str, fname: Optional[str], slug: str) -> Path:
    name = fname or f"{slug}.json"
    given = Path(name)
    if given.is_file():
        return given
    path = paths.hparams_dir / alg / name
    if not path.is_file():
        available = sorted(p.name for p in (paths.hparams_dir / alg).glob("*.json"))
        raise HParamsError(f"hyperparameter file {path} does not exist; available for {alg}: {available}")
    return path


def load_hparams(args: argparse.Namespace, paths: Paths, algorithm: Algorithm, slug: str) -> tuple[Any, Path]:
    path = resolve_hparams_path(paths, algorithm.name, args.hparams_fname, slug)
    hparams = algorithm.load_hparams_class().from_json(path)
    if args.implementation and hasattr(hparams, "implementation"):
        hparams = hparams.replace(implementation=args.implementation)
    return hparams, path


def load_records(args, paths: Paths, slug: str, model, tok) -> tuple[list[dict], Path, list]:
    from dsets.make_known import build_known_subset
    from dsets.registry import resolve_edit_dataset

    ds = resolve_edit_dataset(args.ds_name, paths, slug, on_bad_record="skip")
    if ds.missing:
        LOG.info("building the known subset of %s at %s", slug, ds.source_path)
        build_known_subset(model, tok, paths, slug, source=args.known_source, out=ds.source_path, on_bad_record="skip")
        ds = resolve_edit_dataset(args.ds_name, paths, slug, on_bad_record="skip")
    if not ds.records:
        raise ValueError(f"{ds.source_path}: no usable records for {slug}")
    return ds.records, ds.source_path, list(ds.skipped_case_ids)


class LifelongRun:
    """One run of the protocol: owns the run folder, the model and the resources of its edits."""

    def __init__(self, args, paths, algorithm, hparams, model, tok, split: ProtocolSplit, run_dir: Path, resources):
        self.args, self.paths, self.algorithm, self.hparams = args, paths, algorithm, hparams
        self.model, self.tok, self.split, self.run_dir, self.resources = model, tok, split, run_dir, resources
        n_stream = len(split.edit_stream)
        self.edit_times = n_stream if args.edit_times is None else args.edit_times
        if self.edit_times > n_stream:
            raise ValueError(f"--edit_times {self.edit_times} exceeds the {n_stream} records of the edit stream")
        self.checkpoints = set(retention_checkpoints(self.edit_times))

    def _edit(self, request: dict, layer: Optional[int]) -> tuple[Any, dict]:
        start = time.perf_counter()
        outcome = self.algorithm.edit(self.model, self.tok, request, self.hparams, self.resources, layer)
        if self.args.conserve_memory:
            outcome.orig_weights = {k: v.cpu() for k, v in outcome.orig_weights.items()}
        norms = update_norms(self.model, outcome.orig_weights)
        info = {**outcome.details, **norms, "seconds": time.perf_counter() - start}
        return outcome, info

    def run(self) -> None:
        for n in tqdm(range(1, self.edit_times + 1), desc=f"{self.algorithm.name} edits", unit="edit"):
            self.step(n)

    def step(self, n: int) -> None:
        record = self.split.edit_stream[n - 1]
        request = edit_request(record)
        outcome, edit_info = self._edit(request, None)
        start = time.perf_counter()
        post = compute_rewrite_quality_counterfact(self.model, self.tok, record)
        eval_seconds = time.perf_counter() - start
        rollback_info = None
        if not self.args.no_rollback:
            _, rollback_info = self._edit(swapped_request(request), outcome.rollback_layer)
        write_json_atomic(
            self.run_dir / f"edit_{n}_on_case_{record['case_id']}.json",
            {
                "case_id": record["case_id"],
                "edit_index": n,
                "requested_rewrite": record["requested_rewrite"],
                "time": edit_info["seconds"],
                "post": post,
                "edit": edit_info,
                "rollback": rollback_info,
                "eval_seconds": eval_seconds,
            },
        )
        if n in self.checkpoints:
            self.write_retention(n)

    def write_retention(self, n: int) -> None:
        edited = self.split.edit_stream[:n]
        write_json_atomic(
            self.run_dir / f"retention_of_edit_{n}.json",
            {
                "edit_index": n,
                "edit_retention": count_retained(self.model, self.tok, edited),
                "edit_retention_len": len(edited),
                "orig_retention": count_retained(self.model, self.tok, self.split.orig_retention),
                "orig_retention_len": len(self.split.orig_retention),
            },
        )


def main(argv: Optional[Sequence[str]] = None) -> Path:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from util.models import load_model, model_slug, pick_device

    algorithm = get_algorithm(args.alg_name)
    paths = load_paths(data_dir=args.data_dir, stats_dir=args.stats_dir, results_dir=args.results_dir)
    slug = model_slug(args.model_name)
    hparams, hparams_path = load_hparams(args, paths, algorithm, slug)
    model, tok = load_model(args.model_name, paths, device=pick_device(args.device))
    check_hparams_against_model(hparams, model, source=str(hparams_path))
    records, ds_path, skipped = load_records(args, paths, slug, model, tok)
    split = split_records(records, args.seed, args.dataset_size_limit)
    run_dir = new_run_dir(paths.results_dir / (args.dir_name or algorithm.name))
    resources = EditResources(paths, slug)
    write_json_atomic(run_dir / "params.json", hparams.to_dict())
    run = LifelongRun(args, paths, algorithm, hparams, model, tok, split, run_dir, resources)
    meta = {
        "alg_name": algorithm.name,
        "model_name": args.model_name,
        "model_slug": slug,
        "hparams_file": str(hparams_path),
        "dataset": args.ds_name,
        "dataset_file": str(ds_path),
        "skipped_case_ids": skipped,
        "edit_times": run.edit_times,
        "rollback": not args.no_rollback,
        "device": str(next(model.parameters()).device),
        "retention_checkpoints": sorted(run.checkpoints),
        "edit_stream_case_ids": [r["case_id"] for r in split.edit_stream],
        "orig_retention_case_ids": [r["case_id"] for r in split.orig_retention],
        **split.sizes(),
        **environment_record(),
    }
    write_json_atomic(run_dir / "run.json", meta)
    LOG.info("run folder %s: %d edits of %d known records", run_dir, run.edit_times, split.n_known)
    run.run()
    if hasattr(hparams, "context_template_length_params"):
        meta["context_templates"] = resources.context_templates(model, tok, hparams)
        write_json_atomic(run_dir / "run.json", meta)
    LOG.info("results are in %s", run_dir)
    print(f"Results: {run_dir}")
    return run_dir


if __name__ == "__main__":
    try:
        main()
    except (HParamsError, KeyError, ValueError, FileNotFoundError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        logging.getLogger("experiments.evaluate").error("%s", msg)
        sys.exit(2)
