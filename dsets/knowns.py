"""ROME's known-facts set (known_1000.json), used by causal tracing.

Kept in its own schema (known_id, subject, attribute, template, prediction, prompt, relation_id)
as ROME does; the checks are those causal tracing relies on: the subject occurs in the prompt
(it is located there to be corrupted) and the template has one ``{}``.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from dsets.files import as_paths, locate_or_download
from dsets.records import OnBadRecord, RecordError, collect_records, read_json_list, require_fields
from util.globals import Paths

log = logging.getLogger(__name__)

KNOWNS_FILE = "known_1000.json"
KNOWN_FIELDS = ("known_id", "subject", "attribute", "template", "prompt", "relation_id")


def check_known(raw: Any, source: Path, index: int) -> dict:
    """Return ``raw`` unchanged if causal tracing can use it; RecordError (named by known_id) otherwise."""
    known_id = require_fields(raw, source, index, KNOWN_FIELDS, id_field="known_id")
    subject, prompt, template = raw["subject"], raw["prompt"], raw["template"]
    if not isinstance(subject, str) or not subject.strip() or not isinstance(prompt, str) or subject not in prompt:
        raise RecordError(source, known_id, "subject", f"{subject!r} does not occur in prompt {prompt!r}")
    if not isinstance(template, str) or template.count("{}") != 1:
        raise RecordError(source, known_id, "template", f"needs exactly one '{{}}': {template!r}")
    if not isinstance(raw["attribute"], str) or not raw["attribute"].strip():
        raise RecordError(source, known_id, "attribute", f"empty or not a string: {raw['attribute']!r}")
    return raw


class KnownsDataset(Dataset):
    """The records of known_1000.json (1209 facts in ROME's release), checked."""

    def __init__(
        self, data_dir: Paths | str | Path, on_bad_record: OnBadRecord = "raise", allow_download: bool = True
    ) -> None:
        self.source = locate_or_download(as_paths(data_dir), KNOWNS_FILE, allow_download)
        loaded = collect_records(
            read_json_list(self.source), self.source, lambda raw, i: check_known(raw, self.source, i),
            on_bad_record, kind=None, id_key="known_id",
        )
        self.records: list[dict] = loaded.records
        self.skipped_case_ids: tuple = loaded.skipped_case_ids
        log.info("loaded %d known facts from %s", len(self.records), self.source)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, item: int) -> dict:
        return self.records[item]
