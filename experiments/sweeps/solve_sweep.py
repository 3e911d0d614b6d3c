"""Choose a batch editor's solve weight by measuring: one batch edited with each value of one field.

    python -m experiments.sweeps.solve_sweep --alg_name ENCORE --model_name gemma-3-270m \\
        --field update_norm_lambda --values 0,0.5,2,8,32,128 --n_records 10

The first ``--n_records`` records of counterfact.json, in file order, form one batch. For each value
the batch is edited from the unedited model with a fresh editor (the first batch of a run: no earlier
keys), scored with the harness's CounterFact metrics (greedy ES/GS/LS, ROME's probability efficacy)
and the update's norm relative to the edited weights, then the weights are restored. Only fields of
the closed-form solve can be swept (``SOLVE_FIELDS``): the values z do not depend on them, so they
are optimised once, for the first value, and read from MEMIT's z cache (a temporary folder) for the
others, as the measurement of ENCORE's SmolLM2 alpha did (docs/hparams.md). Writes the table as JSON.
"""
from __future__ import annotations

import argparse
import inspect
import logging
import tempfile
from pathlib import Path
from typing import Any, Optional, Sequence

from tqdm import tqdm

from editing.editor import update_norms
from editing.requests import record_request
from editing.resources import EditResources
from experiments.algorithms import Algorithm, get_algorithm
from experiments.py.dataset_metrics import evaluate_records, metrics_for
from experiments.sweeps.layer_sweep import mean, report, restore, score
from util.globals import load_paths

LOG = logging.getLogger("experiments.sweeps.solve_sweep")
# the weights of the solve in MEMIT, AlphaEdit, ENCORE, RECT and PRUNE: none enters the z optimisation
SOLVE_FIELDS = ("mom2_update_weight", "update_norm_lambda", "L2", "nullspace_threshold")


def check_sweepable(algorithm: Algorithm, hparams: Any, field: str) -> None:
    """A clear error, before the model loads, when the method or the field cannot be swept this way."""
    editor_class = algorithm.load_editor_class()
    if not editor_class.batch_edits or "cache_template" not in inspect.signature(editor_class.__init__).parameters:
        raise SystemExit(f"--alg_name {algorithm.name}: not a batch editor with values z (MEMIT, AlphaEdit, ENCORE, "
                         f"RECT, PRUNE can be swept)")
    if field not in SOLVE_FIELDS:
        raise SystemExit(f"--field {field!r}: only a weight of the solve can be swept on cached z's "
                         f"({', '.join(SOLVE_FIELDS)})")
    if field not in hparams.to_dict():
        raise SystemExit(f"--field {field!r}: {algorithm.name}'s hyperparameters have no such field")


def parse_values(text: str) -> list[float]:
    """Comma-separated values (every field of ``SOLVE_FIELDS`` is a float)."""
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise SystemExit(f"--values {text!r}: expected comma-separated numbers") from None


def edit_and_score(model, tok, records: Sequence[dict], editor) -> dict[str, float]:
    """Edit the batch with ``editor``, score it, restore the weights; the batch's mean scores."""
    outcome = editor.edit([record_request(r) for r in records])
    norms = update_norms(model, outcome.orig_weights)
    rows = [score(post) for post in evaluate_records(model, tok, metrics_for("counterfact"), records)]
    restore(model, outcome.orig_weights)
    table = {k: mean([r[k] for r in rows]) for k in rows[0]}
    table.update(relative_update_norm=norms["relative_update_norm"], update_norm=norms["update_norm"], n=len(records))
    return table


def sweep(model, tok, records: Sequence[dict], algorithm: Algorithm, hparams: Any, field: str, values: Sequence[Any],
          resources: EditResources, z_cache_dir: Path) -> dict[str, dict]:
    """``edit_and_score`` for every value of ``field``; the z's of the first value serve the others."""
    cache = str(z_cache_dir / "z_{layer}_{clamp_norm_factor}_{case_id}.npz")
    table = {}
    for value in tqdm(values, desc=f"{algorithm.name} {field}", unit="value"):
        hp = hparams.replace(**{field: value})
        editor = algorithm.load_editor_class()(model, tok, hp, resources, cache_template=cache)
        table[f"{value:g}"] = edit_and_score(model, tok, records, editor)
        LOG.info("%s %g: %s", field, value, ", ".join(f"{k} {v:.3f}" for k, v in table[f"{value:g}"].items()))
    return table


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments.sweeps.solve_sweep", description=__doc__.split("\n")[0])
    p.add_argument("--alg_name", required=True, help="MEMIT, AlphaEdit, ENCORE, RECT or PRUNE")
    p.add_argument("--model_name", default="smollm2-135m")
    p.add_argument("--hparams_fname", default=None, help="default hparams/<alg>/<model>.json")
    p.add_argument("--field", required=True, help=f"one of {', '.join(SOLVE_FIELDS)}")
    p.add_argument("--values", required=True, help="comma-separated values of the field")
    p.add_argument("--n_records", type=int, default=10, help="the batch: the first N records of counterfact.json")
    p.add_argument("--stats_dir", default=None)
    p.add_argument("--data_dir", default=None)
    p.add_argument("--out", default=None, help="default results/solve_sweep_<alg>_<field>_<model>.json")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    LOG.setLevel(logging.INFO)
    from dsets.counterfact import CounterFactDataset
    from util.models import load_model, model_slug

    if args.n_records < 1:
        raise SystemExit(f"--n_records {args.n_records}: expected at least 1")
    paths = load_paths(stats_dir=args.stats_dir, data_dir=args.data_dir)
    slug = model_slug(args.model_name)
    try:
        algorithm = get_algorithm(args.alg_name)
    except KeyError as err:
        raise SystemExit(err.args[0]) from None
    hp_path = Path(args.hparams_fname) if args.hparams_fname and Path(args.hparams_fname).is_file() else (
        paths.hparams_dir / args.alg_name / (args.hparams_fname or f"{slug}.json"))
    hp = algorithm.load_hparams_class().from_json(hp_path)
    check_sweepable(algorithm, hp, args.field)
    values = parse_values(args.values)
    records = CounterFactDataset(paths, size=args.n_records, allow_download=False).records
    model, tok = load_model(args.model_name, paths)
    with tempfile.TemporaryDirectory(prefix="solve_sweep_z_") as z_dir:
        table = sweep(model, tok, records, algorithm, hp, args.field, values, EditResources(paths, slug), Path(z_dir))
    out = Path(args.out or paths.results_dir / f"solve_sweep_{args.alg_name}_{args.field}_{slug}.json")
    report(out, {"model": args.model_name, "alg_name": args.alg_name, "hparams": str(hp_path), "field": args.field,
                 "records": [r["case_id"] for r in records], "values": table}, table, args.field)
    return table


if __name__ == "__main__":
    main()
