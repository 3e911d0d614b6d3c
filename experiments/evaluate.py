"""Lifelong knowledge-editing evaluation (the WilKE protocol), for every algorithm in the dispatch table.

    python -m experiments.evaluate --alg_name=WilKE --model_name=smollm2-135m \
        --hparams_fname=smollm2-135m.json --ds_name=counterfact --dataset_size_limit=64 \
        --edit_times=4 --skip_generation_tests

Each edit n: apply the edit, evaluate it into ``edit_{n}_on_case_{id}.json``, roll it back (same
algorithm, targets swapped, WilKE on the same layer), never restoring weights; at the retention
checkpoints write ``retention_of_edit_{n}.json``. Everything needed to reproduce the run (command,
hparams, seed, data sizes, versions, git commit, context templates) is saved in the run folder.

Reliability: every input is checked before the model is loaded where possible (exit code 2 with a
message saying what, where and how to fix); bad records are skipped and listed in
``skipped_records.json``; the edited weights are checkpointed every ``--checkpoint_every`` edits and
at every retention checkpoint, so ``--continue_from_run run_NNN`` resumes a killed run with the
same results; a NaN/inf in edited weights or metrics stops the run (``failure.json``, exit code 3);
Ctrl-C/SIGTERM stops after the current edit (a second one abandons it), leaving a resumable run
(exit code 130/143).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import socket
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from tqdm import tqdm

from dsets.records import RecordError
from dsets.registry import EditDataset
from experiments.algorithms import ALGORITHMS, Algorithm, get_algorithm, update_norms
from experiments.checkpoints import CHECKPOINT_FILE, WeightLedger, checkpoint_index, load_checkpoint, save_checkpoint
from experiments.faults import (
    EXIT_BAD_INPUT,
    EXIT_NUMERICAL_FAULT,
    NumericalFault,
    RunInterrupted,
    RunStopped,
    StopRequest,
    check_metrics,
    check_weights,
    interrupt_handlers,
    signal_exit_code,
)
from experiments.protocol import (
    ProtocolSplit,
    count_retained,
    edit_request,
    retention_checkpoints,
    split_records,
    swapped_request,
)
from experiments.py.eval_utils_counterfact import compute_rewrite_quality_counterfact
from experiments.py.generation_metrics import (
    DEFAULT_MAX_OUT_LEN,
    DEFAULT_N_GEN_PER_PROMPT,
    GenerationTests,
    load_consistency_reference,
)
from experiments.resume import ResumeError, check_resumable, first_unfinished_edit, newest_unfinished_run, resolve_run_ref
from experiments.run_files import (
    FAILURE_FILE,
    PARAMS_FILE,
    SKIPPED_FILE,
    RunMeta,
    edit_file_name,
    environment_record,
    new_run_dir,
    read_json,
    reproducible_torch,
    retention_file_name,
    strip_timing,
    write_json_atomic,
)
from rome.resources import EditResources
from util import models
from util.architectures import check_hparams_against_model
from util.globals import Paths, load_paths
from util.hparams import HParamsError

LOG = logging.getLogger("experiments.evaluate")
DEFAULT_SEED = 9
DEFAULT_CHECKPOINT_EVERY = 5
# Exceptions that mean "this input cannot be used" while the run is being set up.
BAD_INPUT_ERRORS = (HParamsError, ValueError, FileNotFoundError, models.ModelUnavailableError)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--alg_name", default="WilKE", help=f"one of {', '.join(ALGORITHMS)}")
    p.add_argument("--model_name", default="smollm2-135m", help="smollm2-135m, gemma-3-270m, a Hugging Face id or a local folder")
    p.add_argument("--hparams_fname", default=None, help="file in hparams/<alg_name>/ (default: <model>.json) or a path")
    p.add_argument("--ds_name", default="counterfact", help="counterfact (the model's known subset), counterfact_full, zsre, or a file")
    p.add_argument("--dataset_size_limit", type=int, default=2048, help="known records used (edit stream + original retention)")
    p.add_argument("--edit_times", type=int, default=None, help="number of edits (default: the whole edit stream)")
    p.add_argument("--skip_generation_tests", action="store_true", help="skip fluency/consistency generation tests")
    p.add_argument("--generation_test_interval", type=int, default=1, help="run generation tests every N edits (edits 1, 1+N, ...)")
    p.add_argument("--generation_max_out_len", type=int, default=DEFAULT_MAX_OUT_LEN,
                   help="tokens per generated text, prompt included (ROME: 100; lower it for cheap CPU runs)")
    p.add_argument("--generation_n_per_prompt", type=int, default=DEFAULT_N_GEN_PER_PROMPT, help="texts per generation prompt (ROME: 1)")
    p.add_argument("--conserve_memory", action="store_true", help="keep weight snapshots on the CPU")
    p.add_argument("--dir_name", default=None, help="results/<dir_name>/run_NNN (default: alg_name)")
    p.add_argument("--continue_from_run", default=None, help="resume the unfinished run_NNN of results/<dir_name> (same command)")
    p.add_argument("--checkpoint_every", type=int, default=DEFAULT_CHECKPOINT_EVERY,
                   help="checkpoint the edited weights every K edits (also at every retention checkpoint)")
    p.add_argument("--no_rollback", action="store_true", help="keep every edit (plain sequential editing)")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help="shuffle seed of the known records (paper: 9); also seeds torch")
    p.add_argument("--num_threads", type=int, default=None, help="torch CPU threads (default: torch's); results can depend on it")
    p.add_argument("--implementation", choices=("fast", "reference"), default=None, help="override hparams' implementation")
    p.add_argument("--known_source", choices=("counterfact", "knowedit", "both"), default="counterfact",
                   help="records scanned when the known subset has to be built")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--data_dir", default=None)
    p.add_argument("--stats_dir", default=None)
    p.add_argument("--results_dir", default=None)
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# Input checks: each failure is a BadInputError naming what is wrong, where, and how to fix it.


class BadInputError(ValueError):
    def __init__(self, what: str, message: str, fix: str):
        self.what, self.message, self.fix = what, message, fix
        super().__init__(f"bad {what}: {message}\n  how to fix: {fix}")


@contextlib.contextmanager
def bad_input(what: str, fix: str) -> Iterator[None]:
    """Turn the usual input exceptions raised inside the block into a BadInputError."""
    try:
        yield
    except BadInputError:
        raise
    except KeyError as e:
        raise BadInputError(what, e.args[0] if e.args else str(e), fix) from e
    except BAD_INPUT_ERRORS as e:
        raise BadInputError(what, str(e), fix) from e


def check_flags(args: argparse.Namespace) -> None:
    positive = ("dataset_size_limit", "checkpoint_every", "generation_test_interval", "generation_max_out_len",
                "generation_n_per_prompt", "edit_times", "num_threads")
    for name in positive:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise BadInputError(f"flag --{name}", f"is {value}", "give a positive integer")


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


def check_statistics_corpus(hparams: Any, hparams_path: Path, paths: Paths) -> None:
    """The corpus of the second-moment statistics must be reachable before hours of editing start."""
    from rome.corpus import CorpusNotFoundError, open_corpus

    name = getattr(hparams, "mom2_dataset", None)
    if name is None or not getattr(hparams, "mom2_adjustment", True):
        return
    try:
        open_corpus(name, paths)
    except CorpusNotFoundError as e:
        raise BadInputError("statistics corpus", f"{hparams_path}: field 'mom2_dataset': {e}",
                            "install or point 'mom2_dataset' at an existing corpus (see rome/corpus.py for the names)") from None


class _RecordErrorLog(logging.Handler):
    """Collects the RecordErrors the dsets loaders log when they skip a bad record."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.errors: list[RecordError] = []

    def emit(self, record: logging.LogRecord) -> None:
        if isinstance(record.args, tuple):
            self.errors += [a for a in record.args if isinstance(a, RecordError)]


@contextlib.contextmanager
def collecting_record_errors() -> Iterator[_RecordErrorLog]:
    handler = _RecordErrorLog()
    logger = logging.getLogger("dsets")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


def skipped_entries(ds: EditDataset, errors: Sequence[RecordError]) -> list[dict]:
    """One entry per skipped record: case_id, file, field and problem (from the loaders' log)."""
    by_id = {e.case_id: e for e in errors}
    entries = []
    for case_id in ds.skipped_case_ids:
        e = by_id.get(case_id)
        entry = {"case_id": case_id, "stage": "load", "source": str(ds.source_path)}
        entry.update({"field": e.field, "problem": e.problem} if e else {"problem": "see the run's log"})
        entries.append(entry)
    return entries


def resolve_dataset(args: argparse.Namespace, paths: Paths, slug: str) -> tuple[EditDataset, list[dict]]:
    from dsets.registry import resolve_edit_dataset

    with collecting_record_errors() as log:
        ds = resolve_edit_dataset(args.ds_name, paths, slug, on_bad_record="skip")
    return ds, skipped_entries(ds, log.errors)


def build_known_dataset(args, paths: Paths, slug: str, model, tok, ds: EditDataset) -> tuple[EditDataset, list[dict]]:
    from dsets.make_known import build_known_subset

    LOG.info("building the known subset of %s at %s", slug, ds.source_path)
    with collecting_record_errors() as log:
        build_known_subset(model, tok, paths, slug, source=args.known_source, out=ds.source_path, on_bad_record="skip")
    built, skipped = resolve_dataset(args, paths, slug)
    extra = [{"case_id": e.case_id, "stage": "known-subset", "field": e.field, "problem": e.problem} for e in log.errors]
    return built, skipped + extra


# ---------------------------------------------------------------------------------------------
# The plan of a run: everything decided before (and just after) the model is loaded.


@dataclasses.dataclass
class RunPlan:
    args: argparse.Namespace
    paths: Paths
    algorithm: Algorithm
    hparams: Any
    hparams_path: Path
    slug: str
    dataset: EditDataset
    skipped: list[dict]
    generation: Optional[GenerationTests]
    split: Optional[ProtocolSplit] = None
    edit_times: Optional[int] = None
    resume_dir: Optional[Path] = None

    @property
    def alg_dir(self) -> Path:
        return self.paths.results_dir / (self.args.dir_name or self.algorithm.name)

    def config(self) -> dict:
        """Everything that changes the results; a run is resumed only under the same config."""
        a = self.args
        return {
            "alg_name": self.algorithm.name,
            "model_name": a.model_name,
            "hparams": self.hparams.to_dict(),
            "dataset_file": str(self.dataset.source_path),
            "dataset_size_limit": a.dataset_size_limit,
            "edit_times": self.edit_times,
            "rollback": not a.no_rollback,
            "seed": a.seed,
            "num_threads": a.num_threads,
            "generation": self.generation_settings(),
        }

    def generation_settings(self, full: bool = False) -> Optional[dict]:
        """What run.json records about the generation tests (``full``: also why consistency was skipped)."""
        if self.generation is None:
            return None
        settings = {**self.generation.settings(), "interval": self.args.generation_test_interval}
        if not full:
            settings.pop("consistency_skipped_because")
        return settings


def make_generation_tests(args: argparse.Namespace, paths: Paths) -> Optional[GenerationTests]:
    if args.skip_generation_tests:
        return None
    reference, reason = load_consistency_reference(paths)
    return GenerationTests(args.seed, args.generation_max_out_len, args.generation_n_per_prompt, reference, reason)


def prepare(args: argparse.Namespace) -> RunPlan:
    """Every check that needs no model: flags, algorithm, hparams, corpus, dataset, resume target."""
    check_flags(args)
    with bad_input("--alg_name", f"use one of {', '.join(ALGORITHMS)} (experiments/algorithms.py)"):
        algorithm = get_algorithm(args.alg_name)
    with bad_input("paths or --model_name", "check globals.yml, the --*_dir flags and --model_name"):
        paths = load_paths(data_dir=args.data_dir, stats_dir=args.stats_dir, results_dir=args.results_dir)
        slug = models.model_slug(args.model_name)
    with bad_input("hyperparameters", f"fix the file, or pass another with --hparams_fname (see hparams/{algorithm.name}/)"):
        hparams, hparams_path = load_hparams(args, paths, algorithm, slug)
    check_statistics_corpus(hparams, hparams_path, paths)
    with bad_input("dataset", "fix the file, or choose another with --ds_name"):
        ds, skipped = resolve_dataset(args, paths, slug)
    plan = RunPlan(args, paths, algorithm, hparams, hparams_path, slug, ds, skipped, make_generation_tests(args, paths))
    if not ds.missing:
        finish_plan(plan, ds)
    return plan


def finish_plan(plan: RunPlan, ds: EditDataset) -> None:
    """Split the records, check --edit_times, and decide between a new and a resumed run folder."""
    args = plan.args
    with bad_input("dataset", "fix the file, or choose another with --ds_name"):
        if not ds.records:
            raise ValueError(f"{ds.source_path}: no usable records for {plan.slug} (skipped: {len(plan.skipped)})")
        plan.dataset, plan.split = ds, split_records(ds.records, args.seed, args.dataset_size_limit)
    n_stream = len(plan.split.edit_stream)
    plan.edit_times = n_stream if args.edit_times is None else args.edit_times
    if plan.edit_times > n_stream:
        raise BadInputError("flag --edit_times", f"{plan.edit_times} exceeds the {n_stream} records of the edit stream "
                            f"({plan.split.n_known} usable records, split in halves)", f"use at most {n_stream}")
    with bad_input("--continue_from_run", "name an unfinished run of this same command, or drop the flag"):
        if args.continue_from_run:
            plan.resume_dir = resolve_run_ref(plan.alg_dir, args.continue_from_run)
            check_resumable(plan.resume_dir, plan.config())
        else:
            offer_resume(plan)


def offer_resume(plan: RunPlan) -> None:
    found = newest_unfinished_run(plan.alg_dir, plan.config())
    if found is not None:
        run_dir, meta = found
        LOG.warning("%s is an unfinished run of this same configuration (status %s); a NEW run is started. "
                    "To resume it instead, rerun this command with --continue_from_run %s",
                    run_dir, meta.get("status"), run_dir.name)


def load_checked_model(plan: RunPlan) -> tuple[Any, Any]:
    """The model, then every check that needs it (architecture, layers, known subset)."""
    with bad_input("--model_name", "use smollm2-135m, gemma-3-270m, a local model folder or a Hugging Face id"):
        model, tok = models.load_model(plan.args.model_name, plan.paths, device=models.pick_device(plan.args.device))
    with bad_input("hyperparameters for this model", "use the hparams file made for this model's architecture and size"):
        check_hparams_against_model(plan.hparams, model, source=str(plan.hparams_path))
    if plan.split is None:
        with bad_input("dataset", "fix the data files, or choose another --ds_name"):
            ds, plan.skipped = build_known_dataset(plan.args, plan.paths, plan.slug, model, tok, plan.dataset)
        finish_plan(plan, ds)
    return model, tok


# ---------------------------------------------------------------------------------------------
# The run.


class LifelongRun:
    """One run of the protocol: owns the run folder, the model and the resources of its edits."""

    def __init__(self, args, paths, algorithm, hparams, model, tok, split: ProtocolSplit, run_dir: Path, resources,
                 generation: Optional[GenerationTests] = None, meta: Optional[RunMeta] = None):
        self.args, self.paths, self.algorithm, self.hparams = args, paths, algorithm, hparams
        self.model, self.tok, self.split, self.run_dir, self.resources = model, tok, split, run_dir, resources
        n_stream = len(split.edit_stream)
        self.edit_times = n_stream if args.edit_times is None else args.edit_times
        if self.edit_times > n_stream:
            raise ValueError(f"--edit_times {self.edit_times} exceeds the {n_stream} records of the edit stream")
        self.checkpoints = set(retention_checkpoints(self.edit_times))
        self.generation, self.meta = generation, meta or RunMeta(run_dir, {})
        self.checkpoint_every = getattr(args, "checkpoint_every", DEFAULT_CHECKPOINT_EVERY)
        self.ledger = WeightLedger()
        self.stop = StopRequest()
        self.last_checkpoint = 0
        self.current_edit = 0
        self.replays: dict[int, bool] = {}  # edit index -> identical to the file the killed run wrote

    @property
    def checkpoint_path(self) -> Path:
        return self.run_dir / CHECKPOINT_FILE

    def restore(self) -> int:
        """Load the last weight checkpoint (if any) into the fresh model; the first edit to run."""
        index = checkpoint_index(self.checkpoint_path)
        if index is None:
            return 1
        self.last_checkpoint = load_checkpoint(self.checkpoint_path, self.model, self.ledger)
        return self.last_checkpoint + 1

    def _edit(self, request: dict, layer: Optional[int], stage: str = "edit") -> tuple[Any, dict]:
        start = time.perf_counter()
        outcome = self.algorithm.edit(self.model, self.tok, request, self.hparams, self.resources, layer)
        if self.args.conserve_memory:
            outcome.orig_weights = {k: v.cpu() for k, v in outcome.orig_weights.items()}
        self.ledger.note(outcome.orig_weights)
        check_weights(self.model, list(outcome.orig_weights), stage)
        norms = update_norms(self.model, outcome.orig_weights)
        info = {**outcome.details, **norms, "seconds": time.perf_counter() - start}
        return outcome, info

    def execute(self, start: int = 1) -> None:
        """``run`` plus the bookkeeping of how it ended (run.json status, failure.json)."""
        try:
            self.run(start)
        except RunStopped:
            raise
        except NumericalFault as fault:
            self.record_failure(fault.stage, fault.problem, fault.details)
            raise RunStopped(EXIT_NUMERICAL_FAULT, f"numerical fault at edit {self.current_edit} ({fault}); "
                             f"the {self.current_edit - 1} finished edit(s) are kept; see {self.run_dir / FAILURE_FILE}") from fault
        except RunInterrupted as e:
            self.meta.update(status="interrupted", stopped_during_edit=self.current_edit)
            raise RunStopped(signal_exit_code(e.signum), self.resume_hint(f"abandoned edit {self.current_edit}")) from None
        except Exception as e:
            self.record_failure("unexpected error", f"{type(e).__name__}: {e}", {"traceback": traceback.format_exc()})
            raise
        self.meta.update(
            status="finished",
            replayed_edits=self.replay_summary(),
            covariance_bytes=self.resources.covariance_bytes,  # one factorised covariance per layer used
            statistics_seconds=self.resources.stats_seconds,
        )

    def run(self, start: int = 1) -> None:
        edits = range(start, self.edit_times + 1)
        for n in tqdm(edits, initial=start - 1, total=self.edit_times, desc=f"{self.algorithm.name} edits", unit="edit"):
            self.current_edit = n
            self.step(n)
            if n in self.checkpoints or n % self.checkpoint_every == 0 or self.stop.requested:
                self.save_checkpoint(n)
            if self.stop.requested and n < self.edit_times:
                self.meta.update(status="interrupted", stopped_after_edit=n, replayed_edits=self.replay_summary())
                raise RunStopped(signal_exit_code(self.stop.signum), self.resume_hint(f"stopped after edit {n}"))

    def step(self, n: int) -> None:
        record = self.split.edit_stream[n - 1]
        request = edit_request(record)
        outcome, edit_info = self._edit(request, None, "edit")
        start = time.perf_counter()
        post = compute_rewrite_quality_counterfact(self.model, self.tok, record, self.generation_for(n))
        check_metrics(post, "evaluation")
        eval_seconds = time.perf_counter() - start
        rollback_info = None
        if not self.args.no_rollback:
            _, rollback_info = self._edit(swapped_request(request), outcome.rollback_layer, "rollback")
        self.write_edit_result(n, {
            "case_id": record["case_id"],
            "edit_index": n,
            "requested_rewrite": record["requested_rewrite"],
            "time": edit_info["seconds"],
            "post": post,
            "edit": edit_info,
            "rollback": rollback_info,
            "eval_seconds": eval_seconds,
        })
        if n in self.checkpoints:
            self.write_retention(n)

    def generation_for(self, n: int) -> Optional[GenerationTests]:
        interval = getattr(self.args, "generation_test_interval", 1)
        return self.generation if self.generation is not None and (n - 1) % interval == 0 else None

    def write_edit_result(self, n: int, result: dict) -> None:
        """Write edit n; when replaying an edit the killed run had finished, say whether it matches."""
        path = self.run_dir / edit_file_name(n, result["case_id"])
        if path.is_file():
            same = strip_timing(read_json(path)) == strip_timing(_json_roundtrip(result))
            self.replays[n] = same
            log = LOG.info if same else LOG.warning
            log("replayed edit %d: %s the result of the interrupted run", n, "identical to" if same else "DIFFERENT from")
        write_json_atomic(path, result)

    def write_retention(self, n: int) -> None:
        edited = self.split.edit_stream[:n]
        write_json_atomic(
            self.run_dir / retention_file_name(n),
            {
                "edit_index": n,
                "edit_retention": count_retained(self.model, self.tok, edited),
                "edit_retention_len": len(edited),
                "orig_retention": count_retained(self.model, self.tok, self.split.orig_retention),
                "orig_retention_len": len(self.split.orig_retention),
            },
        )

    def save_checkpoint(self, n: int) -> None:
        if n != self.last_checkpoint:
            save_checkpoint(self.checkpoint_path, self.model, self.ledger, n)
            self.last_checkpoint = n
            self.meta.update(last_checkpoint=n)

    def record_failure(self, stage: str, problem: str, details: dict) -> None:
        n = self.current_edit
        case_id = self.split.edit_stream[n - 1]["case_id"] if n else None
        failure = {"edit_index": n, "case_id": case_id, "stage": stage, "problem": problem, "details": details,
                   "finished_edits": n - 1 if n else 0, "last_checkpoint": self.last_checkpoint}
        write_json_atomic(self.run_dir / FAILURE_FILE, failure)
        self.meta.update(status="failed", failure=f"edit {n}, {stage}: {problem}")
        LOG.error("edit %s (case %s) failed at %s: %s", n, case_id, stage, problem)

    def resume_hint(self, what: str) -> str:
        return (f"{what}; results of finished edits are kept in {self.run_dir}. Resume with the same command plus "
                f"--continue_from_run {self.run_dir.name} (restarts from the checkpoint after edit {self.last_checkpoint})")

    def replay_summary(self) -> dict:
        return {str(k): v for k, v in sorted(self.replays.items())}


def _json_roundtrip(obj: Any) -> Any:
    import json

    return json.loads(json.dumps(obj))


# ---------------------------------------------------------------------------------------------
# Run folders: a new one, or the one being resumed.


def new_run_meta(plan: RunPlan, run_dir: Path, model, templates: Optional[list[str]], argv) -> dict:
    split = plan.split
    return {
        "status": "running",
        "alg_name": plan.algorithm.name,
        "model_name": plan.args.model_name,
        "model_slug": plan.slug,
        "hparams_file": str(plan.hparams_path),
        "dataset": plan.args.ds_name,
        "dataset_file": str(plan.dataset.source_path),
        "skipped_case_ids": [s["case_id"] for s in plan.skipped],
        "edit_times": plan.edit_times,
        "rollback": not plan.args.no_rollback,
        "device": str(next(model.parameters()).device),
        "retention_checkpoints": retention_checkpoints(plan.edit_times),
        "checkpoint_every": plan.args.checkpoint_every,
        "checkpoint_file": CHECKPOINT_FILE,
        "generation": plan.generation_settings(full=True),
        "context_templates": templates,
        "edit_stream_case_ids": [r["case_id"] for r in split.edit_stream],
        "orig_retention_case_ids": [r["case_id"] for r in split.orig_retention],
        **split.sizes(),
        "config": _json_roundtrip(plan.config()),
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **environment_record(argv),
    }


def context_templates(plan: RunPlan, resources: EditResources, model, tok) -> Optional[list[str]]:
    """Made on the freshly loaded model, before any edit (or restored checkpoint) changes it."""
    if not hasattr(plan.hparams, "context_template_length_params"):
        return None
    return resources.context_templates(model, tok, plan.hparams)


def open_new_run(plan: RunPlan, model, tok, resources: EditResources, argv) -> tuple[LifelongRun, int]:
    run_dir = new_run_dir(plan.alg_dir)
    meta = RunMeta(run_dir, new_run_meta(plan, run_dir, model, context_templates(plan, resources, model, tok), argv))
    meta.update()
    write_json_atomic(run_dir / PARAMS_FILE, plan.hparams.to_dict())
    write_json_atomic(run_dir / SKIPPED_FILE, {"source": str(plan.dataset.source_path), "skipped": plan.skipped})
    run = LifelongRun(plan.args, plan.paths, plan.algorithm, plan.hparams, model, tok, plan.split, run_dir,
                      resources, plan.generation, meta)
    LOG.info("run folder %s: %d edits of %d known records", run_dir, run.edit_times, plan.split.n_known)
    return run, 1


def open_resumed_run(plan: RunPlan, model, tok, resources: EditResources, argv) -> tuple[LifelongRun, int]:
    run_dir = plan.resume_dir
    meta = RunMeta.load(run_dir)
    with bad_input("--continue_from_run", "start a new run (drop --continue_from_run)"):
        if meta.data["edit_stream_case_ids"] != [r["case_id"] for r in plan.split.edit_stream]:
            raise ResumeError(f"{run_dir}: the dataset now gives a different edit stream than when the run started")
    for stale in run_dir.glob(".*.tmp"):  # temporary files of writes a SIGKILL interrupted
        stale.unlink(missing_ok=True)
    templates = context_templates(plan, resources, model, tok)
    if templates != meta.data.get("context_templates"):
        LOG.warning("context templates differ from the interrupted run's; replayed edits may differ")
    run = LifelongRun(plan.args, plan.paths, plan.algorithm, plan.hparams, model, tok, plan.split, run_dir,
                      resources, plan.generation, meta)
    start = run.restore()
    first_missing = first_unfinished_edit(run_dir, meta.data["edit_stream_case_ids"][: run.edit_times])
    note_resume(meta, start, first_missing, argv)
    LOG.info("resuming %s: checkpoint after edit %d; replaying edits %d..%d, then new edits from %d",
             run_dir, start - 1, start, first_missing - 1, first_missing)
    return run, start


def note_resume(meta: RunMeta, start: int, first_missing: int, argv) -> None:
    failure_path = meta.run_dir / FAILURE_FILE
    previous_failure = read_json(failure_path) if failure_path.is_file() else None
    env = environment_record(argv)
    if env["torch_num_threads"] != meta.data.get("torch_num_threads"):
        LOG.warning("torch uses %s threads, the interrupted run used %s: replayed edits may differ in the last bits",
                    env["torch_num_threads"], meta.data.get("torch_num_threads"))
    entry = {"checkpoint": start - 1, "first_unfinished_edit": first_missing, "argv": env["argv"], "pid": os.getpid(),
             "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "previous_status": meta.data.get("status"),
             "previous_failure": previous_failure}
    meta.update(status="running", pid=os.getpid(), host=socket.gethostname(),
                resumes=[*meta.data.get("resumes", []), entry])
    failure_path.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# Entry points.


def configure_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")


def main(argv: Optional[Sequence[str]] = None) -> Path:
    """Run (or resume) one evaluation; returns the run folder. Raises BadInputError / RunStopped."""
    args = parse_args(argv)
    configure_logging(args.verbose)
    argv = list(sys.argv[1:] if argv is None else argv)
    plan = prepare(args)
    with reproducible_torch(args.seed, args.num_threads):
        model, tok = load_checked_model(plan)
        resources = EditResources(plan.paths, plan.slug)
        opener = open_resumed_run if plan.resume_dir is not None else open_new_run
        run, start = opener(plan, model, tok, resources, argv)
        with interrupt_handlers(run.stop):
            run.execute(start)
    LOG.info("results are in %s", run.run_dir)
    print(f"Results: {run.run_dir}")
    return run.run_dir


def cli(argv: Optional[Sequence[str]] = None) -> int:
    """``main`` with the exit codes: 0 done, 2 bad input, 3 numerical fault, 128+signal interrupted."""
    try:
        main(argv)
    except BadInputError as e:
        LOG.error("%s", e)
        return EXIT_BAD_INPUT
    except RunStopped as e:
        LOG.error("%s", e)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(cli())
