"""Edit datasets as ROME-schema dicts: CounterFact (full and flat KnowEdit files), zsRE, known facts,
attribute snippets and tf-idf statistics, with validation that names file, case_id and field."""
from dsets.attr_snippets import AttributeSnippets
from dsets.counterfact import CounterFactDataset, MultiCounterFactDataset
from dsets.files import DataFileMissingError, as_paths, locate_or_download, official_url
from dsets.knowedit import find_knowedit_files, flat_to_record, load_knowedit_counterfact, load_knowedit_file
from dsets.knowns import KnownsDataset
from dsets.records import (
    DataFormatError,
    LoadedRecords,
    RecordError,
    load_counterfact_file,
    merge_by_case_id,
    read_json,
    validate_record,
)
from dsets.registry import DATASETS, EditDataset, known_subset_path, resolve_edit_dataset
from dsets.tfidf_stats import get_tfidf_vectorizer
from dsets.zsre import MENDQADataset, load_zsre_file

# dsets.make_known is a CLI module (python -m dsets.make_known); importing it here eagerly would make
# runpy warn that it was imported twice, so its functions are loaded on first access instead.
_MAKE_KNOWN = ("build_known_subset", "candidate_records", "filter_known")


def __getattr__(name: str):
    if name in _MAKE_KNOWN:
        from dsets import make_known

        return getattr(make_known, name)
    raise AttributeError(f"module 'dsets' has no attribute {name!r}")


__all__ = [
    "AttributeSnippets",
    "CounterFactDataset",
    "DATASETS",
    "DataFileMissingError",
    "DataFormatError",
    "EditDataset",
    "KnownsDataset",
    "LoadedRecords",
    "MENDQADataset",
    "MultiCounterFactDataset",
    "RecordError",
    "as_paths",
    "build_known_subset",
    "candidate_records",
    "filter_known",
    "find_knowedit_files",
    "flat_to_record",
    "get_tfidf_vectorizer",
    "known_subset_path",
    "load_counterfact_file",
    "load_knowedit_counterfact",
    "load_knowedit_file",
    "load_zsre_file",
    "locate_or_download",
    "merge_by_case_id",
    "official_url",
    "read_json",
    "resolve_edit_dataset",
    "validate_record",
]
