"""Everything decided before a run starts: flags, algorithm, hparams, corpus, dataset, protocol.

Every input is checked before the model is loaded where possible; a failure is a ``BadInputError``
saying what is wrong, where, and how to fix it (exit code 2), and nothing has been edited by then.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Iterator, NamedTuple, Optional

import torch

from dsets.files import DataFileMissingError
from dsets.registry import EditDataset
from experiments.algorithms import ALGORITHMS, Algorithm, get_algorithm
from experiments.protocols import PROTOCOLS, FlagError, Protocol, get_protocol
from experiments.protocols.split import ProtocolSplit, split_in_file_order, split_records
from experiments.py.capability import CapabilityProbe, CapabilitySettings, ProbeSetupError
from experiments.py.dataset_metrics import DatasetMetrics, metrics_for
from experiments.py.generation_metrics import GenerationTests, load_consistency_reference
from experiments.py.perplexity import PerplexitySettings
from experiments.py.wild import WildSettings
from experiments.run.data import build_known, build_known_dataset, resolve_dataset, resolve_known
from experiments.run.resume import AUTO, check_resumable, choose_auto, newest_unfinished_run, resolve_run_ref
from util import models
from util.architectures import check_hparams_against_model
from util.globals import Paths, load_paths
from util.hparams import HParamsError, resolve_hparams_file

LOG = logging.getLogger("experiments.evaluate")
# Exceptions that mean "this input cannot be used" while the run is being set up.
BAD_INPUT_ERRORS = (HParamsError, ValueError, FileNotFoundError, models.ModelUnavailableError)


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
    except BAD_INPUT_ERRORS as e:  # an error that knows its own fix (ResidualTargetsError) gives it
        raise BadInputError(what, str(e), getattr(e, "fix", None) or fix) from e


def check_flags(args: argparse.Namespace) -> None:
    positive = ("dataset_size_limit", "checkpoint_every", "generation_test_interval", "generation_max_out_len",
                "generation_n_per_prompt", "edit_times", "num_threads", "preservation_size", "wild_max_new_tokens",
                "capability_items", "capability_every")
    for name in positive:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise BadInputError(f"flag --{name}", f"is {value}", "give a positive integer")
    if args.checkpoint_minutes < 0 or args.checkpoint_minutes != args.checkpoint_minutes:  # NaN too
        raise BadInputError("flag --checkpoint_minutes", f"is {args.checkpoint_minutes}", "give 0 (off) or more minutes")


def check_protocol_flags(args: argparse.Namespace, algorithm: Algorithm) -> type[Protocol]:
    """--protocol, and the flags the protocol declares (its own checks)."""
    if args.protocol not in PROTOCOLS:
        raise BadInputError("flag --protocol", f"is {args.protocol!r}", f"use one of {', '.join(PROTOCOLS)}")
    protocol = get_protocol(args.protocol)
    with protocol_flags():
        protocol.check_arguments(args, algorithm.load_editor_class().batch_edits)
    return protocol


@contextlib.contextmanager
def protocol_flags() -> Iterator[None]:
    """A protocol's ``FlagError`` as the CLI's ``BadInputError``."""
    try:
        yield
    except FlagError as e:
        raise BadInputError(f"flag {e.flag}", e.message, e.fix) from None


def load_hparams(args: argparse.Namespace, paths: Paths, algorithm: Algorithm, slug: str) -> tuple[Any, Path]:
    path = resolve_hparams_file(paths.hparams_dir, algorithm.name, args.hparams_fname, slug)
    hparams = algorithm.load_hparams_class().from_json(path)
    if args.implementation and hasattr(hparams, "implementation"):
        hparams = hparams.replace(implementation=args.implementation)
    return hparams, path


def check_statistics_corpus(hparams: Any, hparams_path: Path, paths: Paths, slug: str, model_name: str) -> None:
    """The corpus of the second-moment statistics must be reachable before hours of editing start,
    unless every statistics file the run needs is already cached (ROME's official files, say)."""
    from editing.corpus import CorpusNotFoundError, corpus_slug, open_corpus

    name = getattr(hparams, "mom2_dataset", None)
    if name is None or not getattr(hparams, "mom2_adjustment", True):
        return
    try:
        open_corpus(name, paths)
    except CorpusNotFoundError as e:
        try:
            missing = missing_statistics(hparams, paths, slug, model_name, corpus_slug(name, paths))
        except CorpusNotFoundError:  # a corpus file that does not exist has no cache name either
            missing = ["<no cache name>"]
        if missing:
            raise BadInputError("statistics corpus", f"{hparams_path}: field 'mom2_dataset': {e}; and no cached "
                                f"statistics at {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""),
                                "install or point 'mom2_dataset' at an existing corpus (see editing/corpus.py for the "
                                "names), or put the statistics files there") from None
        LOG.warning("statistics corpus %r is not reachable (%s); every statistics file this run needs is cached, so "
                    "it is not needed", name, e)


def missing_statistics(hparams: Any, paths: Paths, slug: str, model_name: str, corpus: str) -> list[Path]:
    """The cached statistics files this run would need and that do not exist."""
    from editing.stats_cache import find_stats_file, model_dir_names

    layers = hparams.statistics_layers
    dirs = model_dir_names(paths.stats_dir, slug, model_name)
    files = [find_stats_file(paths.stats_dir, dirs, corpus, hparams.rewrite_module_tmp.format(l), hparams.mom2_dtype,
                             hparams.mom2_n_samples) for l in layers]
    return [f for f in files if not f.is_file()]


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
    protocol: type[Protocol]
    split: Optional[ProtocolSplit] = None
    edit_times: Optional[int] = None
    protocol_settings: dict = dataclasses.field(default_factory=dict)  # the protocol's, checked (Protocol.settings)
    resume_dir: Optional[Path] = None
    finished_dir: Optional[Path] = None  # --continue_from_run auto found this configuration finished
    known: Optional[EditDataset] = None  # --stream_order file: the known facts its watched set comes from
    wild: Optional[WildSettings] = None  # --wild: WILD scores beside the teacher-forced ones
    capability: Optional[CapabilityProbe] = None  # --capability_checks: general abilities at checkpoints
    unedited_source: Optional[Path] = None  # --unedited_from, once checked (experiments/run/reuse.py)

    @property
    def ready_to_split(self) -> bool:
        """Every record the split needs is there (a known subset may be built only with the model)."""
        return not self.dataset.missing and not (self.known is not None and self.known.missing)

    @property
    def metrics(self) -> DatasetMetrics:
        return metrics_for(self.dataset.kind)

    @property
    def alg_dir(self) -> Path:
        return self.paths.results_dir / (self.args.dir_name or self.algorithm.name)

    def config_defaults(self) -> dict[str, Any]:
        """'hparams.<field>' -> the field's default: what a run started before the field existed ran with."""
        out = {}
        for f in dataclasses.fields(self.hparams):
            if f.default is not dataclasses.MISSING:
                out[f"hparams.{f.name}"] = f.default
            elif f.default_factory is not dataclasses.MISSING:
                out[f"hparams.{f.name}"] = f.default_factory()
        return out

    def config(self) -> dict:
        """Everything that changes the results; a run is resumed only under the same config."""
        a = self.args
        return {
            "alg_name": self.algorithm.name,
            "model_name": a.model_name,
            "hparams": self.hparams.to_dict(),
            "dataset_file": str(self.dataset.source_path),
            "dataset_size_limit": a.dataset_size_limit,
            "stream_order": a.stream_order,
            **({"preservation_size": a.preservation_size} if a.stream_order == "file" else {}),
            "edit_times": self.edit_times,
            "protocol": self.protocol.name,
            **self.protocol_settings,
            "seed": a.seed,
            "num_threads": a.num_threads,
            "dtype": a.dtype,
            "generation": self.generation_settings(),
            **self.evaluation_settings(),
        }

    def evaluation_settings(self) -> dict:
        """What run.json and the configuration record of the evaluations beside the dataset's metrics."""
        settings = {}
        if self.wild is not None:
            settings["wild"] = self.wild.as_dict()
        if self.capability is not None:
            settings["capability"] = {**self.capability.settings.as_dict(), "every": self.args.capability_every}
        return settings

    def generation_settings(self, full: bool = False) -> Optional[dict]:
        """What run.json records about the generation tests (``full``: also why consistency was skipped)."""
        if self.generation is None:
            return None
        settings = {**self.generation.settings(), "interval": self.args.generation_test_interval}
        if not full:
            settings.pop("consistency_skipped_because")
        return settings


def make_generation_tests(args: argparse.Namespace, paths: Paths, metrics: DatasetMetrics) -> Optional[GenerationTests]:
    if args.skip_generation_tests:
        return None
    if not metrics.generation_tests:
        LOG.warning("%s records have no generation prompts: no fluency/consistency tests", metrics.kind)
        return None
    reference, reason = load_consistency_reference(paths)
    return GenerationTests(args.seed, args.generation_max_out_len, args.generation_n_per_prompt, reference, reason)


def make_capability_probe(args: argparse.Namespace, paths: Paths) -> Optional[CapabilityProbe]:
    """The probes ``--capability_checks`` names, their files found and read (before any model work)."""
    if not args.capability_checks:
        return None
    names = [n.strip() for n in args.capability_checks.split(",") if n.strip()]
    tasks = tuple(n for n in names if n != "perplexity")
    settings = CapabilitySettings(tasks=tasks, n_items=args.capability_items, n_few_shots=args.capability_few_shots,
                                  perplexity=PerplexitySettings() if "perplexity" in names else None)
    with bad_input("flag --capability_checks", "name probe tasks that exist, and put their files where the message says"):
        try:
            return CapabilityProbe(settings, paths)
        except ProbeSetupError as e:
            raise ValueError(str(e)) from None


class CheckedCommand(NamedTuple):
    algorithm: Algorithm
    protocol: type[Protocol]
    paths: Paths
    slug: str
    hparams: Any
    hparams_path: Path


def check_command(args: argparse.Namespace) -> CheckedCommand:
    """The checks that read only the command and the repository's files (no model, corpus or data).

    ``prepare`` starts with them; tests run them on every line of the shipped plans.
    """
    check_flags(args)
    with bad_input("--alg_name", f"use one of {', '.join(ALGORITHMS)} (experiments/algorithms.py)"):
        algorithm = get_algorithm(args.alg_name)
    with bad_input("paths or --model_name", "check globals.yml, the --*_dir flags and --model_name"):
        paths = load_paths(data_dir=args.data_dir, stats_dir=args.stats_dir, results_dir=args.results_dir)
        slug = models.model_slug(args.model_name)
    with bad_input("hyperparameters", f"fix the file, or pass another with --hparams_fname (see hparams/{algorithm.name}/)"):
        hparams, hparams_path = load_hparams(args, paths, algorithm, slug)
    protocol = check_protocol_flags(args, algorithm)
    parse_device_map(args.device_map)
    with bad_input("flags --wild_*", "give --wild_max_new_tokens and --wild_batch_size positive numbers"):
        wild_settings(args)
    return CheckedCommand(algorithm, protocol, paths, slug, hparams, hparams_path)


def wild_settings(args: argparse.Namespace) -> WildSettings:
    return WildSettings(args.wild_max_new_tokens, args.wild_template, batch_size=args.wild_batch_size)


def prepare(args: argparse.Namespace) -> RunPlan:
    """Every check that needs no model: flags, algorithm, hparams, corpus, dataset, resume target."""
    command = check_command(args)
    check_statistics_corpus(command.hparams, command.hparams_path, command.paths, command.slug, args.model_name)
    plan = plan_records(args, command)
    if plan.ready_to_split:
        finish_plan(plan)
    return plan


def plan_records(args: argparse.Namespace, command: CheckedCommand) -> RunPlan:
    """The plan with its dataset (and, for a file-order stream, the known facts it watches)."""
    algorithm, protocol, paths, slug, hparams, hparams_path = command
    with bad_input("dataset", "fix the file, or choose another with --ds_name"):
        ds, skipped = resolve_dataset(args, paths, slug)
    generation = make_generation_tests(args, paths, metrics_for(ds.kind))
    with protocol_flags():
        protocol.check_dataset(ds)
    plan = RunPlan(args, paths, algorithm, hparams, hparams_path, slug, ds, skipped, generation, protocol)
    plan.wild = wild_settings(args) if args.wild else None
    plan.capability = make_capability_probe(args, paths)
    if args.stream_order == "file":
        with bad_input("known facts of the preservation set", "build them with python -m dsets.make_known"):
            plan.known = ds if args.ds_name == "counterfact" else resolve_known(args, paths, slug)
    return plan


def check_without_model(args: argparse.Namespace) -> Optional[str]:
    """Every check ``prepare`` makes that needs neither the model, the statistics corpus nor the
    results folder: the command (``check_command``), the dataset, the split and --edit_times, the
    protocol's settings. For documented commands and plans. Returns None when all of it was checked,
    else what this machine cannot check (a dataset to download, a known subset built by the model)."""
    command = check_command(args)
    try:
        plan = plan_records(args, command)
    except BadInputError as e:
        if isinstance(e.__cause__, DataFileMissingError):
            return f"the dataset is not on this machine ({e.message.splitlines()[0]})"
        raise
    if not plan.ready_to_split:
        return f"the known subset of {plan.slug} is built by the model on first use"
    decide_edits(plan)
    return None


def split_plan(plan: RunPlan) -> ProtocolSplit:
    """The run's edit stream and watched set, in the order ``--stream_order`` names."""
    args, ds = plan.args, plan.dataset
    with bad_input("dataset", "fix the file, or choose another with --ds_name"):
        if not ds.records:
            raise ValueError(f"{ds.source_path}: no usable records for {plan.slug} (skipped: {len(plan.skipped)})")
    if args.stream_order == "shuffled":
        answer = "target_true" if ds.target_true_is_answer else "target_new"
        return split_records(ds.records, args.seed, args.dataset_size_limit, answer)
    return split_in_file_order(ds.records, args.seed, args.dataset_size_limit, plan.known.records,
                               str(plan.known.source_path), args.preservation_size, ds.kind == "counterfact")


def finish_plan(plan: RunPlan) -> None:
    """Split the records, check --edit_times, and decide between a new and a resumed run folder."""
    decide_edits(plan)
    decide_run_folder(plan)


def decide_edits(plan: RunPlan) -> None:
    """The split, the number of edits and the protocol's settings, checked against each other."""
    args = plan.args
    plan.split = split_plan(plan)
    n_stream = len(plan.split.edit_stream)
    plan.edit_times = n_stream if args.edit_times is None else args.edit_times
    if plan.edit_times > n_stream:
        how = "split in halves" if plan.split.order == "shuffled" else f"the first {n_stream} in file order"
        raise BadInputError("flag --edit_times", f"{plan.edit_times} exceeds the {n_stream} records of the edit stream "
                            f"({plan.split.n_known} usable records, {how})", f"use at most {n_stream}, or a larger "
                            "--dataset_size_limit (a file-order stream takes that many records)")
    with protocol_flags():
        plan.protocol_settings = plan.protocol.settings(args, plan.edit_times)


def decide_run_folder(plan: RunPlan) -> None:
    """A new run, the one to resume, or (``--continue_from_run auto``) nothing to do."""
    args = plan.args
    with bad_input("--continue_from_run", "name an unfinished run of this same command, or drop the flag"):
        if args.continue_from_run == AUTO:
            plan.finished_dir, plan.resume_dir = choose_auto(plan.alg_dir, plan.config(), plan.config_defaults())
            LOG.info("--continue_from_run auto: %s", f"{plan.finished_dir} has finished this configuration; nothing to do"
                     if plan.finished_dir else f"resuming {plan.resume_dir}" if plan.resume_dir else "no run yet; a new one")
        elif args.continue_from_run:
            plan.resume_dir = resolve_run_ref(plan.alg_dir, args.continue_from_run)
            check_resumable(plan.resume_dir, plan.config(), plan.config_defaults())
        else:
            offer_resume(plan)


def offer_resume(plan: RunPlan) -> None:
    found = newest_unfinished_run(plan.alg_dir, plan.config(), plan.config_defaults())
    if found is not None:
        run_dir, meta = found
        LOG.warning("%s is an unfinished run of this same configuration (status %s); a NEW run is started. "
                    "To resume it instead, rerun this command with --continue_from_run %s",
                    run_dir, meta.get("status"), run_dir.name)


def parse_device_map(value: Optional[str]) -> Any:
    """--device_map: a name accelerate knows, or a {module: device} map inline or in a .json file."""
    if value is None or value in ("auto", "balanced", "balanced_low_0", "sequential"):
        return value
    try:
        text = Path(value).read_text() if value.endswith(".json") else value
        device_map = json.loads(text)
    except (OSError, json.JSONDecodeError) as e:
        raise BadInputError("flag --device_map", f"{value!r} is not auto/balanced/sequential or a JSON map ({e})",
                            "give auto, or a JSON object {module name: device} inline or as a .json file") from None
    if not isinstance(device_map, dict):
        raise BadInputError("flag --device_map", f"{value!r} is not a JSON object", 'give {"model.layers.0": 0, ...}')
    return device_map


def load_checked_model(plan: RunPlan) -> tuple[Any, Any]:
    """The model, then every check that needs it (architecture, layers, known subset)."""
    args = plan.args
    with bad_input("--model_name", "use smollm2-135m, gemma-3-270m, a local model folder or a Hugging Face id"):
        model, tok = models.load_model(args.model_name, plan.paths, device=models.pick_device(args.device),
                                       dtype=getattr(torch, args.dtype), device_map=parse_device_map(args.device_map))
    with bad_input("hyperparameters for this model", "use the hparams file made for this model's architecture and size"):
        check_hparams_against_model(plan.hparams, model, source=str(plan.hparams_path))
    if plan.split is None:
        with bad_input("dataset", "fix the data files, or choose another --ds_name"):
            if plan.dataset.missing:
                plan.dataset, plan.skipped = build_known_dataset(plan.args, plan.paths, plan.slug, model, tok, plan.dataset)
            if plan.known is not None and plan.known.missing:
                plan.known = build_known(plan.args, plan.paths, plan.slug, model, tok, plan.known)
            if plan.args.ds_name == "counterfact" and plan.known is not None:
                plan.known = plan.dataset
        finish_plan(plan)
    return model, tok


