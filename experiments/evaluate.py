"""Lifelong knowledge-editing evaluation, for every algorithm of the dispatch table and both protocols.

    python -m experiments.evaluate --alg_name=WilKE --model_name=smollm2-135m \
        --hparams_fname=smollm2-135m.json --ds_name=counterfact --dataset_size_limit=64 \
        --edit_times=4 --skip_generation_tests
    python -m experiments.evaluate --alg_name=MEMIT --protocol sequential --num_edits 8 --edit_times 64 ...

``--protocol`` picks how edits are run and evaluated (experiments/protocols/, each protocol with
its own flags): ``rollback`` (default; the WilKE paper's: each edit applied, evaluated and rolled
back, weights never restored), ``sequential`` (AlphaEdit's: records edited in order in batches of
``--num_edits``, never rolled back, every record edited so far evaluated at ``--eval_checkpoints``)
or ``immediate`` (EasyEdit's since 2026-06: the same edits, each request evaluated right after its
own edit). Metrics are chosen by dataset (CounterFact or zsRE), all with unchanged-prediction
locality. Everything needed to reproduce the run is saved in its folder (experiments/store/files.py).

Reliability: inputs are checked before the model loads (exit code 2 with what, where and how to
fix); bad records are skipped and listed in ``skipped_records.json``; weights and editor state are
checkpointed every ``--checkpoint_every`` steps, every ``--checkpoint_minutes`` and at every
evaluation, so ``--continue_from_run run_NNN`` resumes a killed run with the same results; a NaN/inf
stops the run (``failure.json``, exit code 3); Ctrl-C/SIGTERM stops after the current step (a second
one abandons it), leaving a resumable run (exit code 130/143); one that comes while the run is
prepared (the unedited model's answers, its probes) lets that finish and be written, then stops
before the first edit. The pieces: run/setup.py (checks and plan), run/start.py (run folders),
run/loop.py (steps and checkpoints), protocols/ (what a step does).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from editing.resources import EditResources
from experiments.algorithms import ALGORITHMS
from experiments.protocols import PROTOCOLS
from experiments.protocols.split import DEFAULT_PRESERVATION_SIZE, STREAM_ORDERS
from experiments.py.capability import CapabilitySettings
from experiments.py.generation_metrics import DEFAULT_MAX_OUT_LEN, DEFAULT_N_GEN_PER_PROMPT
from experiments.py.probe_tasks import DEFAULT_TASKS, PROBE_TASKS
from experiments.py.wild import TEMPLATES as WILD_TEMPLATES
from experiments.py.wild import WildSettings
from experiments.run.faults import (
    EXIT_BAD_INPUT,
    RunInterrupted,
    RunStopped,
    StopRequest,
    interrupt_handlers,
    signal_exit_code,
)
from experiments.run.loop import DEFAULT_CHECKPOINT_EVERY, DEFAULT_CHECKPOINT_MINUTES
from experiments.run.reuse import check_source, unedited_fields
from experiments.run.setup import BadInputError, RunPlan, bad_input, load_checked_model, prepare
from experiments.run.start import held_run_folder, open_new_run, open_resumed_run
from experiments.store.files import reproducible_torch

LOG = logging.getLogger("experiments.evaluate")
DEFAULT_SEED = 9


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The command's flags: the common ones, and those of the protocol ``--protocol`` names (each
    protocol declares its own; ``--help`` lists every protocol's)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    chosen = _protocol_arg().parse_known_args(argv)[0].protocol
    p = _parser(chosen, every_protocol="-h" in argv or "--help" in argv)
    args, unknown = p.parse_known_args(argv)
    if unknown:
        owners = [name for name, cls in PROTOCOLS.items() if unknown[0].split("=")[0] in _flags_of(cls)]
        p.error(f"{unknown[0]} is a flag of --protocol {' / '.join(owners)}: add --protocol {owners[0]}, or drop it"
                if owners else f"unrecognized arguments: {' '.join(unknown)}")
    return args


def _protocol_arg() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--protocol", default="rollback",
                   help=f"how edits are run and evaluated, one of: {'; '.join(f'{k} ({c.description})' for k, c in PROTOCOLS.items())}")
    return p


def _parser(protocol: str, every_protocol: bool) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.evaluate", description=__doc__.split("\n")[0],
                                parents=[_protocol_arg()])
    _common_arguments(p)
    chosen = {protocol: PROTOCOLS[protocol]} if protocol in PROTOCOLS else {}
    _ProtocolGroups(p, PROTOCOLS if every_protocol else chosen).add_all()
    return p


class _ProtocolGroups:
    """Each protocol's flags in a help group titled by the protocols that have them (a flag that
    several protocols share, such as --num_edits, is added once)."""

    def __init__(self, parser: argparse.ArgumentParser, protocols: dict[str, type]):
        self.parser, self.protocols = parser, protocols
        self.owners = {flag: [n for n, c in protocols.items() if flag in _flags_of(c)]
                       for c in protocols.values() for flag in _flags_of(c)}
        self.groups: dict[tuple[str, ...], Any] = {}
        self.added: set[str] = set()

    def add_all(self) -> None:
        for cls in self.protocols.values():
            cls.add_arguments(self)

    def add_argument(self, *names: str, **kwargs: Any) -> None:
        if any(n in self.added for n in names):
            return
        owners = tuple(self.owners[names[0]])
        if owners not in self.groups:
            self.groups[owners] = self.parser.add_argument_group(f"--protocol {' / '.join(owners)}")
        self.groups[owners].add_argument(*names, **kwargs)
        self.added.update(names)


def _flags_of(cls: type) -> set[str]:
    p = argparse.ArgumentParser(add_help=False)
    cls.add_arguments(p.add_argument_group())
    return {s for action in p._actions for s in action.option_strings}


def _common_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--alg_name", default="WilKE", help=f"one of {', '.join(ALGORITHMS)}")
    p.add_argument("--model_name", default="smollm2-135m", help="smollm2-135m, gemma-3-270m, a Hugging Face id or a local folder")
    p.add_argument("--hparams_fname", default=None, help="file in hparams/<alg_name>/ (default: <model>.json) or a path")
    p.add_argument("--ds_name", default="counterfact", help="counterfact (the model's known subset), counterfact_full, zsre, or a file")
    p.add_argument("--dataset_size_limit", type=int, default=2048, help="records used: shuffled, the known records split in "
                   "halves (edit stream + original retention); file, the edit stream itself")
    p.add_argument("--stream_order", choices=STREAM_ORDERS, default="shuffled",
                   help="shuffled (the WilKE reference's: the first --dataset_size_limit records shuffled with --seed, "
                   "the first half edited) or file (AlphaEdit's: the first --dataset_size_limit records in file order, "
                   "unfiltered, all edited; the watched set is facts the model knows)")
    p.add_argument("--preservation_size", type=int, default=DEFAULT_PRESERVATION_SIZE,
                   help="--stream_order file: known facts watched for preservation (PS/PU, ORS)")
    p.add_argument("--edit_times", type=int, default=None, help="number of edits (default: the whole edit stream)")
    p.add_argument("--skip_generation_tests", action="store_true", help="skip fluency/consistency generation tests")
    p.add_argument("--generation_test_interval", type=int, default=1, help="run generation tests every N edits (edits 1, 1+N, ...)")
    p.add_argument("--generation_max_out_len", type=int, default=DEFAULT_MAX_OUT_LEN,
                   help="tokens per generated text, prompt included (ROME: 100; lower it for cheap CPU runs)")
    p.add_argument("--generation_n_per_prompt", type=int, default=DEFAULT_N_GEN_PER_PROMPT, help="texts per generation prompt (ROME: 1)")
    p.add_argument("--wild", action="store_true", help="also score every evaluation WILD (the Mirage paper's): "
                   "answers generated from the prompt alone, judged by exact match, prefix and token F1")
    p.add_argument("--wild_max_new_tokens", type=int, default=WildSettings.max_new_tokens,
                   help="--wild: the cap of a generated answer (it stops at EOS, a newline or the first sentence's end)")
    p.add_argument("--wild_batch_size", type=int, default=WildSettings.batch_size,
                   help="--wild: prompts generated together (greedy answers are the same at any size; 64 is ~1.9x "
                        "faster than 16 for SmolLM2 on one CPU thread; lower it if a large model runs out of memory)")
    p.add_argument("--wild_template", choices=tuple(WILD_TEMPLATES), default=WildSettings.template,
                   help="--wild: the prompt as it is (plain) or inside Mirage's question-answering template (qa_inst)")
    p.add_argument("--capability_checks", default=None,
                   help="general abilities checked on the unedited model and then at the protocol's checkpoints, "
                   f"comma-separated from perplexity,{','.join(PROBE_TASKS)} (AlphaEdit's: perplexity,{','.join(DEFAULT_TASKS)})")
    p.add_argument("--capability_items", type=int, default=CapabilitySettings.n_items, help="items per probe task")
    p.add_argument("--capability_few_shots", type=int, default=CapabilitySettings.n_few_shots,
                   help="few-shot examples before each probe item (AlphaEdit's run: 0)")
    p.add_argument("--capability_every", type=int, default=None,
                   help="check general abilities every N edits (where a step ends) instead of at the protocol's checkpoints")
    p.add_argument("--conserve_memory", action="store_true", help="keep weight snapshots on the CPU")
    p.add_argument("--dir_name", default=None, help="results/<dir_name>/run_NNN (default: alg_name)")
    p.add_argument("--continue_from_run", default=None, help="resume the unfinished run_NNN of results/<dir_name> (same command); 'auto': do nothing if this "
                   "configuration has finished, resume its newest unfinished run, else start one (for plans of many runs)")
    p.add_argument("--checkpoint_every", type=int, default=DEFAULT_CHECKPOINT_EVERY,
                   help="checkpoint the edited weights every K steps (also at every evaluation checkpoint)")
    p.add_argument("--unedited_from", default=None, metavar="RUN_DIR",
                   help="take the unedited model's answers and probes at 0 edits from this earlier run "
                   "(results/<dir>/run_NNN) of the same model, stream and evaluation settings, not computing them")
    p.add_argument("--checkpoint_minutes", type=float, default=DEFAULT_CHECKPOINT_MINUTES,
                   help="also checkpoint after a step that ends this long after the last checkpoint, so a kill redoes "
                   "at most about this much (long steps: batches of 100); 0: off")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help="shuffle seed of the known records (paper: 9); also seeds torch")
    p.add_argument("--num_threads", type=int, default=None, help="torch CPU threads (default: torch's); results can depend on it")
    p.add_argument("--implementation", choices=("fast", "reference"), default=None, help="override hparams' implementation")
    p.add_argument("--known_source", choices=("counterfact", "knowedit", "both"), default="counterfact",
                   help="which known subset --ds_name counterfact means: facts known among counterfact.json (the "
                   "WilKE paper's), the flat KnowEdit records, or both (about 1,300 for SmolLM2); built when missing")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="the model's precision (the papers': float32); keys, optimisation and solves run in float32 or wider")
    p.add_argument("--device_map", default=None,
                   help="place a model larger than one GPU with accelerate: auto, balanced, sequential, or a JSON "
                   "{module: device} map (inline or a .json file)")
    p.add_argument("--data_dir", default=None)
    p.add_argument("--stats_dir", default=None)
    p.add_argument("--results_dir", default=None)
    p.add_argument("-v", "--verbose", action="store_true")


def configure_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")


def main(argv: Optional[Sequence[str]] = None) -> Path:
    """Run (or resume) one evaluation; returns the run folder. Raises BadInputError / RunStopped."""
    args = parse_args(argv)
    configure_logging(args.verbose)
    argv = list(sys.argv[1:] if argv is None else argv)
    plan = prepare(args)
    run_dir = plan.finished_dir or execute(plan, argv)
    LOG.info("results are in %s", run_dir)
    print(f"Results: {run_dir}")
    return run_dir


def execute(plan: RunPlan, argv: list[str]) -> Path:
    """Load the model, then run or resume the plan's run (or nothing, when auto finds it finished)."""
    with reproducible_torch(plan.args.seed, plan.args.num_threads):
        model, tok = load_checked_model(plan)  # may finish the plan (a known subset built just now)
        if plan.finished_dir is not None:
            return plan.finished_dir
        resources = EditResources(plan.paths, plan.slug)
        if plan.args.unedited_from and plan.resume_dir is None:
            with bad_input("--unedited_from", "give a run of the same model, stream and evaluation settings, or drop it"):
                check_source(Path(plan.args.unedited_from), unedited_fields(plan, model))
            plan.unedited_source = Path(plan.args.unedited_from)
        opener = open_resumed_run if plan.resume_dir is not None else open_new_run
        stop = StopRequest()  # a first signal while the run is prepared waits for its files, then stops it
        with held_run_folder(plan) as run_dir, interrupt_handlers(stop):
            try:
                run, start = opener(plan, model, tok, resources, argv, run_dir, stop)
            except RunInterrupted as e:
                raise RunStopped(signal_exit_code(e.signum), f"abandoned while preparing {run_dir} (a second signal); "
                                 f"the same command with --continue_from_run {run_dir.name} prepares it again") from None
            run.execute(start)
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
