"""Train a MEND or KE editor for any supported model.

    nice -n 10 python -m baselines.mend.train --editor MEND --model_name smollm2-135m --ds_name zsre

Reads hparams/<editor>/<model>.json (or --hparams_fname), trains on the dataset's train split with
periodic validation on held-out records, and writes the checkpoint to the hparams' ``archive`` path
(or --out), atomically at every validation; ``--resume`` continues a saved run. The evaluate CLI
(``--alg_name MEND`` / ``KE``) then loads the checkpoint the same hparams file names.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

from baselines.mend.checkpoints import EditorCheckpointMismatchError
from baselines.mend.data import training_examples
from baselines.mend.editors import EDITORS, get_editor_kind
from baselines.mend.trainer import EditorTrainer
from util.globals import load_paths
from util.hparams import HParamsError, resolve_hparams_file

LOG = logging.getLogger("baselines.mend.train")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m baselines.mend.train", description=__doc__.split("\n")[0])
    p.add_argument("--editor", required=True, choices=list(EDITORS))
    p.add_argument("--model_name", default="smollm2-135m")
    p.add_argument("--hparams_fname", default=None, help="file in hparams/<editor>/ (default: <model>.json) or a path")
    p.add_argument("--ds_name", default=None, choices=("zsre", "counterfact"), help="default: the hparams' train_ds")
    p.add_argument("--out", default=None, help="checkpoint path (default: the hparams' archive)")
    p.add_argument("--train_steps", type=int, default=None, help="override hparams.train_steps")
    p.add_argument("--val_interval", type=int, default=None, help="override hparams.val_interval")
    p.add_argument("--val_records", type=int, default=None, help="override hparams.val_records")
    p.add_argument("--final_val_records", type=int, default=None, help="held-out records of the final report")
    p.add_argument("--resume", action="store_true", help="continue the run saved at the checkpoint path")
    p.add_argument("--overwrite", action="store_true", help="start afresh even if the checkpoint exists")
    p.add_argument("--device", default=None)
    p.add_argument("--data_dir", default=None)
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from util.models import load_model, model_slug, pick_device

    kind = get_editor_kind(args.editor)
    paths = load_paths(data_dir=args.data_dir)
    slug = model_slug(args.model_name)
    hparams_path = resolve_hparams_file(paths.hparams_dir, kind.name, args.hparams_fname, slug)
    hparams = kind.load_hparams_class().from_json(hparams_path)
    overrides = {k: getattr(args, k) for k in ("train_steps", "val_interval", "val_records") if getattr(args, k) is not None}
    if args.ds_name:
        overrides["train_ds"] = args.ds_name
    if overrides:
        hparams = hparams.replace(**overrides)
        hparams.validate()
    out = Path(args.out) if args.out else hparams.archive_path()
    if out is None:
        raise HParamsError(f"{hparams_path}: 'archive' is null; give --out")
    if out.exists() and not (args.resume or args.overwrite):
        raise FileExistsError(f"{out} exists: pass --resume to continue it or --overwrite to start afresh")
    model, tok = load_model(args.model_name, paths, device=pick_device(args.device))
    train, val = training_examples(hparams.train_ds, paths)
    LOG.info("%s on %s: %d training / %d held-out examples; checkpoint %s", kind.name, hparams.train_ds, len(train), len(val), out)
    trainer = EditorTrainer(kind.name, model, tok, hparams, train, val, out, resume=args.resume)
    trainer.train()
    final_n = args.final_val_records or hparams.val_records
    final = trainer.validate(val[:final_n])
    report = {"checkpoint": str(out), "steps": trainer.step, "held_out": final}
    LOG.info("final held-out validation on %d records: %s", final["n_records"], final)
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    try:
        main()
    except (HParamsError, KeyError, ValueError, FileNotFoundError, FileExistsError, EditorCheckpointMismatchError) as e:
        LOG.error("%s", e.args[0] if isinstance(e, KeyError) and e.args else e)
        sys.exit(2)
