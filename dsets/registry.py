"""Dataset names of the evaluation CLIs, mapped to validated records (exact keys, no substring matching).

- ``counterfact`` / ``cf``: the model's known subset ``counterfact_<model_slug>_known.json``
  (WilKE evaluates only facts the model already knows); with ``known_source`` "both" or "knowedit",
  the larger subset scanned from the flat KnowEdit records too (``..._known_both.json``). When it does not exist yet the result has
  ``records=None`` and ``source_path`` = where ``python -m dsets.make_known`` would write it.
- ``counterfact_full``: all of counterfact.json; ``mcf`` / ``multi_counterfact``: multi_counterfact.json.
- ``counterfact_knowedit``: the 21,919 flat KnowEdit records converted into the same schema.
- ``zsre``: zsRE (MEND eval split) as ROME/MEMIT edit it: to the true answer ``answers[0]``, with
  ROME's placeholder target_true (``target_true_is_answer`` is False: nothing to roll back to).
- ``zsre_mend``: the same questions in MEND's setting: edited to ``alt``, target_true ``pred``.
- anything else: a path, or a bare file name found in DATA_DIR or its fallbacks (e.g. the WilKE
  ``counterfact_gpt2-xl_known_toxicity_flash.json``), loaded as CounterFact format.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from dsets.counterfact import CounterFactDataset
from dsets.knowedit import load_knowedit_counterfact
from dsets.records import LoadedRecords, OnBadRecord, load_counterfact_file
from dsets.zsre import TARGET_TRUE_IS_ANSWER, MENDQADataset
from util.globals import Paths

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class EditDataset:
    """Records to edit with, where they came from, and what ``on_bad_record='skip'`` dropped.

    Unpacks as ``records, source_path = resolve_edit_dataset(...)``. ``records is None`` means
    the known subset is missing and should be built at ``source_path``.
    """

    records: Optional[list[dict]]
    source_path: Path
    skipped_case_ids: tuple[Any, ...] = ()
    kind: str = "counterfact"  # the record schema, which decides the metrics: "counterfact" or "zsre"
    # False when target_true is a placeholder (ROME's zsRE), not an answer the records had before
    # editing: a roll-back edit to it, or retention counted against it, would mean nothing.
    target_true_is_answer: bool = True

    def __iter__(self) -> Iterator[Any]:
        return iter((self.records, self.source_path))

    @property
    def missing(self) -> bool:
        return self.records is None


KNOWN_SOURCES = ("counterfact", "knowedit", "both")


def known_subset_name(model_slug: str, source: str = "counterfact") -> str:
    """``counterfact_<model>_known.json`` (scanned from counterfact.json, the WilKE name), or with
    ``_knowedit`` / ``_both`` for the subsets scanned from the flat KnowEdit records too."""
    if source not in KNOWN_SOURCES:
        raise ValueError(f"known-subset source must be one of {KNOWN_SOURCES}, not {source!r}")
    return f"counterfact_{model_slug}_known.json" if source == "counterfact" else f"counterfact_{model_slug}_known_{source}.json"


def known_subset_path(paths: Paths, model_slug: str, source: str = "counterfact") -> Path:
    """Where make_known writes (and the registry first looks for) a model's known subset: DATA_DIR."""
    return paths.data_dir / known_subset_name(model_slug, source)


def _from_loaded(loaded: LoadedRecords, size: Optional[int]) -> EditDataset:
    """Several source files (the flat KnowEdit split) are reported as their common folder."""
    source = loaded.sources[0] if len(loaded.sources) == 1 else Path(os.path.commonpath(loaded.sources))
    return EditDataset(loaded.records[:size], source, loaded.skipped_case_ids)


def _known(paths: Paths, model_slug: str, size: Optional[int], on_bad: OnBadRecord, dl: bool,
           source: str = "counterfact") -> EditDataset:
    found = paths.find_data_file(known_subset_name(model_slug, source))
    if found is None:
        log.info("no known subset of %s records for %s; build it with python -m dsets.make_known --source %s",
                 source, model_slug, source)
        return EditDataset(None, known_subset_path(paths, model_slug, source))
    return _from_loaded(load_counterfact_file(found, on_bad), size)


def _full(
    paths: Paths, model_slug: str, size: Optional[int], on_bad: OnBadRecord, dl: bool, multi: bool = False
) -> EditDataset:
    ds = CounterFactDataset(paths, size=size, multi=multi, on_bad_record=on_bad, allow_download=dl)
    return EditDataset(ds.records, ds.source, ds.skipped_case_ids)


def _multi(paths: Paths, model_slug: str, size: Optional[int], on_bad: OnBadRecord, dl: bool) -> EditDataset:
    return _full(paths, model_slug, size, on_bad, dl, multi=True)


def _knowedit(paths: Paths, model_slug: str, size: Optional[int], on_bad: OnBadRecord, dl: bool) -> EditDataset:
    return _from_loaded(load_knowedit_counterfact(paths, on_bad), size)


def _zsre(paths: Paths, model_slug: str, size: Optional[int], on_bad: OnBadRecord, dl: bool,
          setting: str = "rome") -> EditDataset:
    ds = MENDQADataset(paths, size=size, split="eval", on_bad_record=on_bad, setting=setting, allow_download=dl)
    return EditDataset(ds.records, ds.source, ds.skipped_case_ids, "zsre", TARGET_TRUE_IS_ANSWER[setting])


def _zsre_mend(paths: Paths, model_slug: str, size: int | None, on_bad: OnBadRecord, dl: bool) -> EditDataset:
    return _zsre(paths, model_slug, size, on_bad, dl, setting="mend")


DATASETS: dict[str, Callable[..., EditDataset]] = {
    "counterfact": _known,
    "cf": _known,
    "counterfact_full": _full,
    "mcf": _multi,
    "multi_counterfact": _multi,
    "counterfact_knowedit": _knowedit,
    "zsre": _zsre,
    "zsre_mend": _zsre_mend,
}


def _find_file(ds_name: str, paths: Paths) -> Optional[Path]:
    """A path as given, else a bare file name (with or without .json) in DATA_DIR or its fallbacks."""
    given = Path(ds_name).expanduser()
    if given.is_file():
        return given
    if given.name != ds_name:  # a path with folders that does not exist: no fallback search
        return None
    for name in (ds_name, ds_name + ".json"):
        found = paths.find_data_file(name)
        if found is not None and found.is_file():
            return found
    return None


def resolve_edit_dataset(
    ds_name: str,
    paths: Paths,
    model_slug: str,
    size: Optional[int] = None,
    on_bad_record: OnBadRecord = "raise",
    allow_download: bool = True,
    known_source: str = "counterfact",
) -> EditDataset:
    """Records for ``ds_name`` (first ``size`` of them); see the module docstring for the names.
    ``known_source`` picks which known subset ``counterfact`` means (see ``known_subset_name``)."""
    if ds_name in ("counterfact", "cf"):
        return _known(paths, model_slug, size, on_bad_record, allow_download, known_source)
    if ds_name in DATASETS:
        return DATASETS[ds_name](paths, model_slug, size, on_bad_record, allow_download)
    path = _find_file(ds_name, paths)
    if path is not None:
        return _from_loaded(load_counterfact_file(path, on_bad_record), size)
    searched = ", ".join(str(p) for p in (paths.data_dir, *paths.data_dir_fallbacks))
    raise ValueError(
        f"unknown dataset {ds_name!r}: valid names are {', '.join(sorted(DATASETS))}, or the path or "
        f"bare file name of a CounterFact-format JSON file (searched {searched})"
    )
