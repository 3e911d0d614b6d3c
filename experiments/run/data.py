"""The records of a run: the dataset the command names, the known facts, and the bad records skipped.

A dataset is resolved before the model loads; a known subset (facts the model already answers,
CounterFact's ``counterfact_<model>_known.json``) that does not exist yet is built once the model is
there. The file-order stream of AlphaEdit (``--stream_order file``) also needs the known subset, for
its preservation set of facts the model knows.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
from typing import Iterator, Sequence

from dsets.records import RecordError
from dsets.registry import EditDataset
from util.globals import Paths

LOG = logging.getLogger("experiments.evaluate")
KNOWN = "counterfact"  # the registry name of the model's known subset


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
        ds = resolve_edit_dataset(args.ds_name, paths, slug, on_bad_record="skip", known_source=args.known_source)
    return ds, skipped_entries(ds, log.errors)


def build_known_dataset(args, paths: Paths, slug: str, model, tok, ds: EditDataset) -> tuple[EditDataset, list[dict]]:
    from dsets.make_known import build_known_subset

    LOG.info("building the known subset of %s at %s", slug, ds.source_path)
    with collecting_record_errors() as log:
        build_known_subset(model, tok, paths, slug, source=args.known_source, out=ds.source_path, on_bad_record="skip")
    built, skipped = resolve_dataset(args, paths, slug)
    extra = [{"case_id": e.case_id, "stage": "known-subset", "field": e.field, "problem": e.problem} for e in log.errors]
    return built, skipped + extra


def resolve_known(args: argparse.Namespace, paths: Paths, slug: str) -> EditDataset:
    """The model's known subset (``records`` None when it is still to be built)."""
    from dsets.registry import resolve_edit_dataset

    return resolve_edit_dataset(KNOWN, paths, slug, on_bad_record="skip", known_source=args.known_source)


def build_known(args: argparse.Namespace, paths: Paths, slug: str, model, tok, known: EditDataset) -> EditDataset:
    from dsets.make_known import build_known_subset

    LOG.info("building the known subset of %s at %s", slug, known.source_path)
    build_known_subset(model, tok, paths, slug, source=args.known_source, out=known.source_path, on_bad_record="skip")
    return resolve_known(args, paths, slug)
