"""ROME's attribute snippets: Wikipedia texts about each (relation, target) pair.

They are the reference texts of the generation 'consistency' metric. The file is large and not
available offline here, so a missing file raises ``DataFileMissingError`` (a FileNotFoundError)
with the official URL, and callers skip consistency rather than the whole evaluation.
"""
from __future__ import annotations

import collections
import logging
from pathlib import Path
from typing import Any

from dsets.files import as_paths, locate_or_download
from dsets.records import DataFormatError, read_json_list
from util.globals import Paths

log = logging.getLogger(__name__)

ATTRIBUTE_SNIPPETS_FILE = "attribute_snippets.json"


def _index(snippets_list: list, source: Path) -> dict[str, dict[str, list[dict]]]:
    """relation_id -> target_id -> samples ({name, text}), as ROME indexes them."""
    snips: dict = collections.defaultdict(lambda: collections.defaultdict(list))
    for i, el in enumerate(snippets_list):
        if not isinstance(el, dict) or not {"relation_id", "target_id", "samples"} <= el.keys():
            raise DataFormatError(f"{source}: entry {i} lacks relation_id/target_id/samples")
        snips[el["relation_id"]][el["target_id"]].extend(el["samples"])
    return snips


class AttributeSnippets:
    """``snippets[relation_id][target_id]`` -> list of {name, text}; unknown keys give empty lists."""

    def __init__(self, data_dir: Paths | str | Path, allow_download: bool = True) -> None:
        self.source = locate_or_download(as_paths(data_dir), ATTRIBUTE_SNIPPETS_FILE, allow_download)
        self.snippets_list: list[dict[str, Any]] = read_json_list(self.source)
        self._data = _index(self.snippets_list, self.source)
        log.info("loaded attribute snippets for %d relations from %s", len(self._data), self.source)

    def __getitem__(self, relation_id: str) -> dict[str, list[dict]]:
        return self._data[relation_id]

    def texts(self) -> list[str]:
        """Every snippet text, in file order (the corpus the tf-idf statistics come from)."""
        return [s["text"] for el in self.snippets_list for s in el["samples"]]
