"""Collect the second-moment statistics a run will need, ahead of it, in one process or many.

Without options it collects what ``experiments.evaluate`` with the same ``--model_name``,
``--alg_name`` and ``--hparams_fname`` will load: the modules of the algorithm's layers (WilKE:
every candidate layer; ROME, MEMIT, AlphaEdit: ``layers``), with the hparams' corpus, sample size,
dtype and max_length, into the same cache files (STATS_DIR). Any of these can be given instead::

    python -m experiments.collect_stats --model_name smollm2-135m                    # WilKE's 15 layers
    python -m experiments.collect_stats --model_name smollm2-135m --alg_name MEMIT
    python -m experiments.collect_stats --model_name gpt2-xl --alg_name ROME --hparams_fname gpt2-xl.json
    python -m experiments.collect_stats --model_name smollm2-135m --layers 3,6 --n_samples 300

Sharded over processes (each reads its own round-robin share of the batches; sums are added in
float64 with an all-reduce, gloo on CPU, nccl on GPU; rank 0 writes the cache)::

    torchrun --nproc_per_node 2 -m experiments.collect_stats --model_name smollm2-135m

A collection that is killed resumes from its partial statistics when the same command is run
again (same number of processes). Rank 0 prints a JSON summary.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from editing.layer_stats import ROME_SAMPLE_SEED, layer_stats
from editing.resources import default_stats_batch_tokens
from editing.stats_distributed import DistContext, init_from_env, shutdown
from experiments.algorithms import get_algorithm
from util.architectures import arch_of, check_hparams_against_model
from util.atomic_files import write_json_atomic
from util.globals import Paths, load_paths
from util.hparams import HParamsError, resolve_hparams_file

LOG = logging.getLogger("experiments.collect_stats")


def _ints(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t.strip()]


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_name", default="smollm2-135m")
    p.add_argument("--alg_name", default="WilKE", help="whose hparams say which statistics (default WilKE)")
    p.add_argument("--hparams_fname", default=None, help="hparams/<alg>/<file> or a path (default <model>.json)")
    p.add_argument("--layers", type=_ints, default=None, help="layer numbers, e.g. 3,6 (default: the hparams')")
    p.add_argument("--modules", default=None, help="comma-separated module names instead of --layers")
    p.add_argument("--corpus", default=None, help="default: the hparams' mom2_dataset")
    p.add_argument("--n_samples", type=int, default=None, help="default: the hparams' mom2_n_samples")
    p.add_argument("--dtype", default=None, help="default: the hparams' mom2_dtype")
    p.add_argument("--max_length", type=int, default=None, help="default: the hparams' mom2_max_length, else the context")
    p.add_argument("--sample_seed", default=None,
                   help=f"seed of the corpus sample (default: the hparams', else ROME's {ROME_SAMPLE_SEED}); 'none': first texts")
    p.add_argument("--batch_tokens", type=int, default=None, help="padded tokens per forward pass (default 4096 or "
                   "WILKE_STATS_BATCH_TOKENS); out-of-memory batches are halved")
    p.add_argument("--checkpoint_every", type=int, default=0, help="save partial statistics every N batches")
    p.add_argument("--checkpoint_seconds", type=float, default=600.0, help="... and at least this often")
    p.add_argument("--per_module", action="store_true", help="one corpus pass per module (the reference's way)")
    p.add_argument("--stats_dir", default=None)
    p.add_argument("--device", default=None, help="default: cuda (GPU LOCAL_RANK under torchrun) when available, else cpu")
    p.add_argument("--num_threads", type=int, default=None, help="torch CPU threads per process")
    p.add_argument("--output_json", default=None, help="also write the summary here")
    p.add_argument("--no_progress", action="store_true")
    return p.parse_args(argv)


@dataclasses.dataclass(frozen=True)
class StatsJob:
    """Which statistics to collect: the arguments of ``layer_stats``."""

    modules: list[str]
    corpus: str
    n_samples: int
    dtype: str
    max_length: Optional[int]
    sample_seed: Optional[int]
    hparams_file: str


def _load_hparams(args: argparse.Namespace, paths: Paths, slug: str) -> tuple[Any, Optional[Path]]:
    """The algorithm's hparams, or (None, None) when absent and every value is given on the command line."""
    try:
        path = resolve_hparams_file(paths.hparams_dir, args.alg_name, args.hparams_fname, slug)
    except HParamsError as e:
        explicit = (args.layers or args.modules) and args.corpus and args.n_samples
        if args.hparams_fname or not explicit:
            raise SystemExit(f"{e}: pass --hparams_fname, or all of --layers/--modules, --corpus and --n_samples") from None
        return None, None
    hparams = get_algorithm(args.alg_name).load_hparams_class().from_json(path)
    if not hasattr(hparams, "mom2_dataset"):
        raise SystemExit(f"{args.alg_name} ({path}) uses no second-moment statistics")
    return hparams, path


def resolve_job(args: argparse.Namespace, hparams: Any, hparams_path: Optional[Path], model: torch.nn.Module) -> StatsJob:
    """Command-line values first, then the hparams', as an evaluate run would read them."""
    def pick(value: Any, field: str, default: Any = None) -> Any:
        return value if value is not None else getattr(hparams, field, default)

    if args.modules:
        modules = [m.strip() for m in args.modules.split(",") if m.strip()]
    else:
        layers = args.layers or hparams.statistics_layers
        template = hparams.rewrite_module_tmp if hparams is not None else arch_of(model).rewrite_module_tmp
        modules = [template.format(layer) for layer in layers]
    seed = hparams.mom2_sample_seed if hparams is not None else ROME_SAMPLE_SEED
    if args.sample_seed is not None:
        seed = None if args.sample_seed.strip().lower() == "none" else int(args.sample_seed)
    return StatsJob(modules, pick(args.corpus, "mom2_dataset"), pick(args.n_samples, "mom2_n_samples"),
                    pick(args.dtype, "mom2_dtype", "float32"), pick(args.max_length, "mom2_max_length"), seed,
                    str(hparams_path or ""))


def _device(requested: Optional[str], ctx: DistContext) -> Optional[str]:
    if requested is None and ctx.backend == "nccl":
        return f"cuda:{torch.cuda.current_device()}"
    return requested


def _collect(args: argparse.Namespace, ctx: DistContext) -> dict:
    from util.models import load_model, model_slug  # imported here: loading models is only the CLI's job

    paths = load_paths(stats_dir=args.stats_dir)
    slug = model_slug(args.model_name)
    hparams, hparams_path = _load_hparams(args, paths, slug)
    model, tok = load_model(args.model_name, paths, device=_device(args.device, ctx))
    if hparams is not None:
        check_hparams_against_model(hparams, model, str(hparams_path))
    job = resolve_job(args, hparams, hparams_path, model)
    stats = layer_stats(model, tok, job.modules, job.corpus, job.n_samples, paths, slug, dtype=job.dtype,
                        max_length=job.max_length, batch_tokens=args.batch_tokens or default_stats_batch_tokens(),
                        one_pass=not args.per_module, progress=not args.no_progress and ctx.rank == 0,
                        sample_seed=job.sample_seed, checkpoint_every=args.checkpoint_every,
                        checkpoint_seconds=args.checkpoint_seconds)
    runs = ctx.gather(dataclasses.asdict(stats.run))
    meta = dataclasses.asdict(stats[job.modules[0]].meta)
    return {"model": args.model_name, "model_slug": slug, "stats_dir": str(paths.stats_dir), **dataclasses.asdict(job),
            "meta": meta, "per_process": runs}


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Collect (or find cached) statistics; returns the summary rank 0 prints."""
    args = parse_args(argv)
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(level=logging.INFO, format=f"%(levelname)s [rank {rank}] %(name)s: %(message)s")
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    ctx = init_from_env()
    try:
        summary = _collect(args, ctx)
    finally:
        shutdown()
    if ctx.rank == 0:
        if args.output_json:
            write_json_atomic(Path(args.output_json), summary)
        print(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
