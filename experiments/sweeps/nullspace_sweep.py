"""Choose AlphaEdit's ``nullspace_threshold`` for a model by measuring its key spectra.

    python -m experiments.sweeps.nullspace_sweep --model_name smollm2-135m --thresholds 1e-2,2e-2,5e-2,1e-1

The threshold is an absolute bound on the eigenvalues of each edited layer's key second moment
C0 = E[k kᵀ], so the paper's 2e-2 (set for GPT-2 XL, GPT-J and Llama-3-8B) means something else on
another model. Per layer of the AlphaEdit hparams and per threshold this prints how many
eigen-directions the null space keeps (the AlphaEdit authors report about 70% for Llama-3), how
much of C0's energy lies in it (tr(P C0) / tr(C0): what the projection leaves unprotected), and how
much of real edit keys lies in it (median ‖P k‖² and ‖P k‖² / ‖k‖² over the first ``--n_keys``
records of the seeded edit stream: the part of a key an edit can still use). It writes the table as
JSON. The statistics are the run's (cached, collected in one pass when missing); nothing is edited.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from tqdm import tqdm

from alphaedit import AlphaEditHyperParams
from alphaedit.projection import spectrum
from editing.requests import normalise_request, record_request
from editing.resources import EditResources
from experiments.store.files import write_json_atomic
from memit.compute_ks import compute_keys, template_groups
from util.globals import load_paths

LOG = logging.getLogger("experiments.sweeps.nullspace_sweep")
QUANTILES = (0.0, 0.1, 0.5, 0.9, 1.0)


def layer_row(c0: torch.Tensor, keys: torch.Tensor, thresholds: Sequence[float]) -> dict[str, Any]:
    """One layer: C0's eigenvalue quantiles, and per threshold the null space's size, energy and key share.

    ``keys`` is in_features x n (one edit key per column)."""
    c0, keys = c0.to(torch.float64), keys.to(torch.float64)
    eigenvalues, vectors = spectrum(c0)  # once per layer: the thresholds only cut it differently
    key_norm2 = keys.norm(dim=0) ** 2
    row: dict[str, Any] = {
        "dim": eigenvalues.numel(),
        "eigenvalue_quantiles": {str(q): float(torch.quantile(eigenvalues, q)) for q in QUANTILES},
        "key_norm2_median": float(key_norm2.median()),
        "by_threshold": {},
    }
    for threshold in thresholds:
        basis = vectors[:, eigenvalues < threshold]  # U0, as alphaedit.projection cuts it
        pk2 = (basis.T @ keys).norm(dim=0) ** 2
        row["by_threshold"][f"{threshold:g}"] = {
            "kept": basis.shape[1],
            "share_kept": basis.shape[1] / eigenvalues.numel(),
            "energy_in_null_space": float(torch.trace(basis.T @ c0 @ basis) / torch.trace(c0)),
            "pk2_median": float(pk2.median()),
            "pk_share_median": float((pk2 / key_norm2).median()),
        }
    return row


def sweep(model, tok, requests: Sequence[dict], hparams: AlphaEditHyperParams, thresholds: Sequence[float],
          resources: EditResources) -> dict[int, dict]:
    """``layer_row`` for every layer of ``hparams`` (statistics of all layers in one corpus pass)."""
    names = [hparams.rewrite_module_tmp.format(layer) for layer in hparams.layers]
    covariances = resources.covariances(model, tok, hparams, names, keep_matrix=True)
    groups = template_groups(resources.context_templates(model, tok, hparams.template_spec), hparams.context_template_length_params,
                             hparams.context_template_prompts)
    edits = [normalise_request(r) for r in requests]
    table = {}
    for layer, name in tqdm(list(zip(hparams.layers, names)), desc="null-space sweep", unit="layer"):
        keys = compute_keys(model, tok, edits, groups, name, hparams.fact_token)
        table[layer] = layer_row(covariances[name].matrix, keys, thresholds)
        shares = ", ".join(f"{t} {v['share_kept']:.2f}" for t, v in table[layer]["by_threshold"].items())
        LOG.info("layer %d: share of directions kept by threshold: %s", layer, shares)
    return table


def format_table(table: dict[int, dict]) -> list[str]:
    """One line per layer: eigenvalue min/median/max, then per threshold 'kept share (median ‖Pk‖² / share)'."""
    lines = []
    for layer, row in table.items():
        q = row["eigenvalue_quantiles"]
        cells = [f"{t}: {v['share_kept']:.2f} ({v['pk2_median']:.3g} / {v['pk_share_median']:.2f}; energy {v['energy_in_null_space']:.2f})"
                 for t, v in row["by_threshold"].items()]
        lines.append(f"layer {layer}: eigenvalues {q['0.0']:.2g} / {q['0.5']:.3g} / {q['1.0']:.3g} | " + " | ".join(cells))
    return lines


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments.sweeps.nullspace_sweep", description=__doc__.split("\n")[0])
    p.add_argument("--model_name", default="smollm2-135m")
    p.add_argument("--hparams_fname", default=None, help="AlphaEdit hparams (default hparams/AlphaEdit/<model>.json)")
    p.add_argument("--thresholds", default="1e-2,2e-2,5e-2,1e-1", help="comma-separated eigenvalue bounds")
    p.add_argument("--ds_name", default="counterfact", help="where the edit keys come from (default: the known subset)")
    p.add_argument("--known_source", choices=("counterfact", "knowedit", "both"), default="both")
    p.add_argument("--n_keys", type=int, default=8, help="edit keys: the first N records of the seeded edit stream")
    p.add_argument("--seed", type=int, default=9)
    p.add_argument("--dataset_size_limit", type=int, default=None, help="as evaluate's: the known records split")
    p.add_argument("--stats_dir", default=None)
    p.add_argument("--data_dir", default=None)
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    LOG.setLevel(logging.INFO)
    from dsets.registry import resolve_edit_dataset
    from experiments.protocols.split import split_records
    from util.models import load_model, model_slug

    paths = load_paths(stats_dir=args.stats_dir, data_dir=args.data_dir)
    slug = model_slug(args.model_name)
    hp = AlphaEditHyperParams.from_json(args.hparams_fname or paths.hparams_dir / "AlphaEdit" / f"{slug}.json")
    thresholds = [float(t) for t in args.thresholds.split(",")]
    model, tok = load_model(args.model_name, paths)
    ds = resolve_edit_dataset(args.ds_name, paths, slug, on_bad_record="skip", known_source=args.known_source)
    if ds.missing:
        raise SystemExit(f"{ds.source_path} is missing: build it first with python -m dsets.make_known "
                         f"--model_name {args.model_name} --source {args.known_source}")
    records = split_records(ds.records, args.seed, args.dataset_size_limit).edit_stream[: args.n_keys]
    with torch.no_grad():
        table = sweep(model, tok, [record_request(r) for r in records], hp, thresholds, EditResources(paths, slug))
    out = Path(args.out or paths.results_dir / f"nullspace_sweep_{slug}.json")
    write_json_atomic(out, {"model": args.model_name, "hparams": hp.to_dict(), "thresholds": thresholds,
                            "records": [r["case_id"] for r in records], "layers": table})
    for line in format_table(table):
        print(line)
    print(f"written {out}")
    return table


if __name__ == "__main__":
    main()
