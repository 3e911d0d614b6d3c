"""CounterFact (ROME's counterfact.json / multi_counterfact.json, or any file in that schema)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

from torch.utils.data import Dataset

from dsets.files import DataFileMissingError, as_paths, locate_or_download
from dsets.records import OnBadRecord, load_counterfact_file
from util.globals import Paths

log = logging.getLogger(__name__)

COUNTERFACT_FILE = "counterfact.json"
MULTI_COUNTERFACT_FILE = "multi_counterfact.json"


class CounterFactDataset(Dataset):
    """Validated CounterFact records, as ROME's dataset class but with explicit errors.

    ``path`` loads any CounterFact-format file directly (known subsets, toxicity-flash cases);
    otherwise counterfact.json (or multi_counterfact.json) is found through ``data_dir`` and
    its fallbacks, or downloaded. ``size`` keeps the first records, after bad ones are skipped.
    ``skipped_case_ids`` lists what ``on_bad_record='skip'`` dropped, for the run folder.
    """

    def __init__(
        self,
        data_dir: Paths | str | Path | None,
        size: Optional[int] = None,
        multi: bool = False,
        path: str | Path | None = None,
        on_bad_record: OnBadRecord = "raise",
        allow_download: bool = True,
    ) -> None:
        self.source = self._source(data_dir, multi, path, allow_download)
        loaded = load_counterfact_file(self.source, on_bad_record)
        self.records: list[dict] = loaded.records[:size]
        self.skipped_case_ids: tuple = loaded.skipped_case_ids
        log.info("loaded %d CounterFact records from %s", len(self.records), self.source)

    @staticmethod
    def _source(data_dir: Paths | str | Path | None, multi: bool, path: str | Path | None, allow_download: bool) -> Path:
        if path is not None:
            path = Path(path)
            if not path.is_file():
                raise DataFileMissingError(f"CounterFact file {path} does not exist")
            return path
        if data_dir is None:
            raise ValueError("CounterFactDataset needs data_dir or path")
        name = MULTI_COUNTERFACT_FILE if multi else COUNTERFACT_FILE
        return locate_or_download(as_paths(data_dir), name, allow_download)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, item: int) -> dict:
        return self.records[item]


class MultiCounterFactDataset(CounterFactDataset):
    """MEMIT's name for the multi_counterfact.json variant, kept so forked MEMIT code runs unchanged."""

    def __init__(self, data_dir: Paths | str | Path, size: Optional[int] = None, **kwargs) -> None:
        super().__init__(data_dir, size=size, multi=True, **kwargs)
