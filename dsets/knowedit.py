"""EasyEdit/KnowEdit flat CounterFact files, converted into ROME's record schema.

The flat files (``counterfact-{train,edit,val}.json``) cover all 21,919 CounterFact case_ids but
keep one rephrase and one locality prompt per case and no relation ids. Converting them into the
same dicts as counterfact.json lets every consumer (known-subset filter, evaluation, retention)
treat both alike. The template is recovered by replacing the subject in the filled prompt with
``{}``; this is only unambiguous when the subject occurs exactly once, so anything else is a bad
record. ROME scores neighbourhood prompts against the edited record's target_true, so a
locality_ground_truth that differs from ground_truth cannot be represented and is a bad record too
(in the shared files it never differs).

The single rephrase prompt becomes both paraphrase_prompts and generation_prompts. Compared with
counterfact.json on the 1013 shared case_ids, it is one of ROME's generation prompts in 848 cases
and one of its paraphrase prompts (with their random prefix sentence) in 165: generalisation
measured on flat records is therefore not the same quantity as ROME's paraphrase score.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterable, Optional

from dsets.files import SHARED_HINT, DataFileMissingError
from dsets.records import (
    LoadedRecords,
    OnBadRecord,
    RecordError,
    check_on_bad_record,
    collect_records,
    read_json_list,
    require_fields,
)
from util.globals import Paths

log = logging.getLogger(__name__)

KNOWEDIT_FILES: tuple[str, ...] = ("counterfact-train.json", "counterfact-edit.json", "counterfact-val.json")
FLAT_FIELDS = (
    "case_id", "prompt", "subject", "target_new", "ground_truth",
    "rephrase_prompt", "locality_prompt", "locality_ground_truth",
)
FLAT_SOURCE_TAG = "knowedit_flat"


def knowedit_search_dirs(paths: Paths) -> list[Path]:
    """DATA_DIR and its fallbacks, then ``<fallback>/../sources/knowedit_format`` (the shared layout)."""
    bases = [paths.data_dir, *paths.data_dir_fallbacks]
    extra = [(fb / ".." / "sources" / "knowedit_format").resolve() for fb in paths.data_dir_fallbacks]
    return bases + extra


def find_knowedit_files(paths: Paths, names: Iterable[str] = KNOWEDIT_FILES) -> list[Path]:
    """Each flat file found first along ``knowedit_search_dirs``; absent names are left out."""
    found = []
    for name in names:
        for base in knowedit_search_dirs(paths):
            if (base / name).is_file():
                found.append(base / name)
                break
    return found


def _check_flat(raw: Any, source: Path, index: int) -> None:
    case_id = require_fields(raw, source, index, FLAT_FIELDS, id_field="case_id")
    for name in FLAT_FIELDS:
        if name != "case_id" and not isinstance(raw[name], str):
            raise RecordError(source, case_id, name, f"expected a string, got {type(raw[name]).__name__}")


def flat_to_record(raw: Any, source: Path, index: int = 0) -> dict:
    """One flat entry as a CounterFact record (relation/pararel/target ids are unknown: None)."""
    _check_flat(raw, source, index)
    case_id, prompt, subject = raw["case_id"], raw["prompt"], raw["subject"]
    occurrences = prompt.count(subject) if subject else 0
    if occurrences != 1:
        problem = f"{subject!r} occurs {occurrences} times in prompt {prompt!r}; need exactly 1"
        raise RecordError(source, case_id, "subject", problem)
    if raw["locality_ground_truth"] != raw["ground_truth"]:
        raise RecordError(
            source, case_id, "locality_ground_truth",
            f"{raw['locality_ground_truth']!r} differs from ground_truth {raw['ground_truth']!r}; "
            "ROME scores neighborhood prompts against target_true",
        )
    return {
        "case_id": case_id,
        "pararel_idx": None,
        "requested_rewrite": {
            "prompt": prompt.replace(subject, "{}"),
            "relation_id": None,
            "subject": subject,
            "target_new": {"str": raw["target_new"], "id": None},
            "target_true": {"str": raw["ground_truth"], "id": None},
        },
        "paraphrase_prompts": [raw["rephrase_prompt"]],
        "neighborhood_prompts": [raw["locality_prompt"]],
        "attribute_prompts": [],
        "generation_prompts": [raw["rephrase_prompt"]],
        "_source": FLAT_SOURCE_TAG,
    }


def load_knowedit_file(path: str | Path, on_bad_record: OnBadRecord = "raise") -> LoadedRecords:
    """One flat file, converted and validated."""
    path = Path(path)
    return collect_records(
        read_json_list(path), path, lambda raw, i: flat_to_record(raw, path, i), on_bad_record, "counterfact"
    )


def load_knowedit_counterfact(
    paths: Paths, on_bad_record: OnBadRecord = "raise", files: Optional[Iterable[Path]] = None
) -> LoadedRecords:
    """All flat files found (train, edit, val), converted; a case_id in two files keeps the first."""
    check_on_bad_record(on_bad_record)
    files = list(files) if files is not None else find_knowedit_files(paths)
    if not files:
        searched = ", ".join(str(d) for d in knowedit_search_dirs(paths))
        raise DataFileMissingError(
            f"none of {', '.join(KNOWEDIT_FILES)} found (searched {searched}); "
            f"{SHARED_HINT}, and the flat files are in ../shared/data/sources/knowedit_format"
        )
    records: dict[Any, dict] = {}
    skipped: list[Any] = []
    for path in files:
        loaded = load_knowedit_file(path, on_bad_record)
        skipped.extend(loaded.skipped_case_ids)
        for record in loaded.records:
            if record["case_id"] in records:
                log.warning("%s: case_id %r also in an earlier flat file; keeping the first", path, record["case_id"])
                continue
            records[record["case_id"]] = record
    return LoadedRecords(records=list(records.values()), sources=tuple(files), skipped_case_ids=tuple(skipped))
