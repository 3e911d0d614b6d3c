"""Choose a fixed editing layer by measuring: ROME at each layer on the same known facts.

    python -m experiments.sweeps.layer_sweep --model_name smollm2-135m --layers 2,4,6,9 --n_records 4

Each edit starts from the unedited weights (restored after every edit), so layers are compared on
equal terms. Prints, per layer, ES/GS/LS (greedy correctness of rewrite, paraphrase and
neighborhood prompts), ROME's probability-based efficacy, the mean LA and the seconds per edit,
and writes them as JSON. This is how the small models' hparams layers were chosen (README).
"""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
from tqdm import tqdm

from editing.requests import record_request
from editing.resources import EditResources
from experiments.py.eval_utils_counterfact import compute_rewrite_quality_counterfact
from experiments.store.files import write_json_atomic
from rome.editor import apply_rome_to_model
from rome.rome_hparams import ROMEHyperParams
from util.globals import load_paths

LOG = logging.getLogger("experiments.sweeps.layer_sweep")


def mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def score(post: dict) -> dict:
    rw = post["rewrite_prompts_probs"]
    return {
        "ES": mean(post["rewrite_prompts_correct"]),
        "GS": mean(post["paraphrase_prompts_correct"]),
        "LS": mean(post["neighborhood_prompts_correct"]),
        "efficacy": mean([p["target_new"] < p["target_true"] for p in rw]),
    }


@torch.no_grad()
def restore(model: torch.nn.Module, orig: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    for name, w in orig.items():
        params[name].copy_(w)


def report(out: Path, payload: dict, table: dict, label: str) -> None:
    """Write ``payload`` as JSON to ``out`` and print one line per row of ``table`` ("<label> <key>: ...")."""
    write_json_atomic(out, payload)
    for key, row in table.items():
        print(f"{label} {key}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items()))
    print(f"written {out}")


def sweep(model, tok, records, hparams: ROMEHyperParams, layers: Sequence[int], resources) -> dict[int, dict]:
    if hparams.mom2_adjustment:  # every swept layer's statistics in one corpus pass, not one pass each
        resources.covariances(model, tok, hparams, [hparams.rewrite_module_tmp.format(layer) for layer in layers])
    table = {}
    for layer in tqdm(layers, desc="layer sweep", unit="layer"):
        hp = hparams.replace(layers=[layer])
        rows, seconds, la = [], [], []
        for record in tqdm(records, desc=f"layer {layer}", unit="edit", leave=False):
            start = time.perf_counter()
            _, orig = apply_rome_to_model(model, tok, [record_request(record)], hp, return_orig_weights=True, resources=resources)
            seconds.append(time.perf_counter() - start)
            name = next(iter(orig))
            la.append(float((dict(model.named_parameters())[name] - orig[name]).norm() / orig[name].norm()))
            rows.append(score(compute_rewrite_quality_counterfact(model, tok, record)))
            restore(model, orig)
        table[layer] = {k: mean([r[k] for r in rows]) for k in rows[0]}
        table[layer].update({"LA": mean(la), "seconds_per_edit": mean(seconds), "n": len(records)})
        LOG.info("layer %d: %s", layer, ", ".join(f"{k} {v:.3f}" for k, v in table[layer].items()))
    return table


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments.sweeps.layer_sweep", description=__doc__.split("\n")[0])
    p.add_argument("--model_name", default="smollm2-135m")
    p.add_argument("--hparams_fname", default=None, help="ROME hparams (default hparams/ROME/<model>.json)")
    p.add_argument("--layers", required=True, help="comma-separated layer indices")
    p.add_argument("--n_records", type=int, default=4)
    p.add_argument("--seed", type=int, default=9)
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    LOG.setLevel(logging.INFO)  # this sweep's per-layer progress; other modules stay quiet
    from dsets.make_known import build_known_subset
    from dsets.registry import resolve_edit_dataset
    from experiments.protocols.split import split_records
    from util.models import load_model, model_slug

    paths = load_paths()
    slug = model_slug(args.model_name)
    hp = ROMEHyperParams.from_json(args.hparams_fname or paths.hparams_dir / "ROME" / f"{slug}.json")
    model, tok = load_model(args.model_name, paths)
    ds = resolve_edit_dataset("counterfact", paths, slug, on_bad_record="skip")
    if ds.missing:
        build_known_subset(model, tok, paths, slug, source="counterfact", out=ds.source_path, on_bad_record="skip")
        ds = resolve_edit_dataset("counterfact", paths, slug, on_bad_record="skip")
    records = split_records(ds.records, args.seed, None).edit_stream[: args.n_records]
    table = sweep(model, tok, records, hp, [int(x) for x in args.layers.split(",")], EditResources(paths, slug))
    out = Path(args.out or paths.results_dir / f"layer_sweep_{slug}.json")
    report(out, {"model": args.model_name, "records": [r["case_id"] for r in records], "layers": table}, table, "layer")
    return table


if __name__ == "__main__":
    main()
