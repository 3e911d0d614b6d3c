"""Training and held-out edit examples for the editor trainer.

- ``zsre``: MEND's zsRE splits (zsre_mem_train.json to train, zsre_mem_eval.json held out); the
  new target is ``alt``, x_e' the rephrased question and x_loc an NQ question with its answer.
- ``counterfact``: the flat KnowEdit CounterFact files (counterfact-train.json to train,
  counterfact-val.json held out), minus every case_id of counterfact.json, the file the evaluate
  protocol's known subsets are drawn from, so an editor trained here never saw an evaluated fact.
"""
from __future__ import annotations

import logging

from baselines.mend.batches import EditExample, record_example
from dsets.counterfact import CounterFactDataset
from dsets.files import DataFileMissingError
from dsets.knowedit import find_knowedit_files, load_knowedit_file
from dsets.zsre import MENDQADataset
from util.globals import Paths

LOG = logging.getLogger(__name__)


def zsre_examples(paths: Paths) -> tuple[list[EditExample], list[EditExample]]:
    train = MENDQADataset(paths, split="train", on_bad_record="skip", setting="mend")
    val = MENDQADataset(paths, split="eval", on_bad_record="skip", setting="mend")
    return [record_example(r) for r in train.records], [record_example(r) for r in val.records]


def counterfact_examples(paths: Paths) -> tuple[list[EditExample], list[EditExample]]:
    files = {p.name: p for p in find_knowedit_files(paths, ("counterfact-train.json", "counterfact-val.json"))}
    if len(files) != 2:
        raise DataFileMissingError(
            "training on counterfact needs the flat files counterfact-train.json and counterfact-val.json "
            "(../shared/data/sources/knowedit_format)"
        )
    try:
        evaluated = {r["case_id"] for r in CounterFactDataset(paths, on_bad_record="skip", allow_download=False).records}
    except FileNotFoundError:
        evaluated = set()
    split = []
    for name in ("counterfact-train.json", "counterfact-val.json"):
        records = load_knowedit_file(files[name], on_bad_record="skip").records
        kept = [record_example(r) for r in records if r["case_id"] not in evaluated]
        LOG.info("%s: %d records, %d after removing evaluated case_ids", name, len(records), len(kept))
        split.append(kept)
    return split[0], split[1]


def training_examples(ds_name: str, paths: Paths) -> tuple[list[EditExample], list[EditExample]]:
    """(train, held-out) examples of ``ds_name``."""
    if ds_name == "zsre":
        return zsre_examples(paths)
    if ds_name == "counterfact":
        return counterfact_examples(paths)
    raise ValueError(f"unknown training dataset {ds_name!r}; choose zsre or counterfact")
