"""CounterFact-schema records as plain dicts, and the checks that make them safe to edit with.

Records stay the dicts of ROME's ``counterfact.json`` so that code forked from ROME/MEMIT/WilKE
reads them unchanged. The checks exist because a bad record does not fail where it is loaded:
a prompt without ``{}`` or with stray braces breaks ``prompt.format(subject)`` deep inside key
extraction, and an empty target tokenizes to nothing in the middle of a lifelong run. Every
problem is reported as a ``RecordError`` naming the file, the case_id and the field.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Optional, Sequence

log = logging.getLogger(__name__)

RecordKind = Literal["counterfact", "zsre"]
OnBadRecord = Literal["raise", "skip"]
ON_BAD_RECORD_CHOICES: tuple[str, ...] = ("raise", "skip")

PROMPT_LISTS = ("paraphrase_prompts", "neighborhood_prompts", "attribute_prompts", "generation_prompts")
TOP_FIELDS: dict[str, tuple[str, ...]] = {
    "counterfact": ("case_id", "pararel_idx", "requested_rewrite", *PROMPT_LISTS),
    "zsre": ("case_id", "requested_rewrite", *PROMPT_LISTS),
}
REWRITE_FIELDS: dict[str, tuple[str, ...]] = {
    "counterfact": ("prompt", "relation_id", "subject", "target_new", "target_true"),
    "zsre": ("prompt", "subject", "target_new", "target_true"),
}
TARGET_FIELDS: dict[str, tuple[str, ...]] = {"counterfact": ("str", "id"), "zsre": ("str",)}


class DataFormatError(ValueError):
    """A data file that is not valid JSON or does not hold the expected top-level structure."""


class RecordError(ValueError):
    """One record that cannot be edited with; names the file, the case_id and the field."""

    def __init__(self, source: str | Path, case_id: Any, field: str, problem: str) -> None:
        self.source = str(source)
        self.case_id = case_id
        self.field = field
        self.problem = problem
        super().__init__(f"{source}: case_id {case_id!r}: field '{field}': {problem}")

    def __reduce__(self) -> tuple:
        return (type(self), (self.source, self.case_id, self.field, self.problem))


def require_fields(raw: Any, source: str | Path, index: int, fields: Sequence[str], id_field: Optional[str] = None) -> Any:
    """The id to name ``raw`` by in messages, after checking it is an object holding every field.

    The id is ``raw[id_field]`` when there is one, else ``<entry i>`` (its position in the file), so
    an error in a file without ids still points at the record.
    """
    fallback = f"<entry {index}>" if id_field else index
    record_id = raw.get(id_field, fallback) if id_field and isinstance(raw, dict) else fallback
    if not isinstance(raw, dict):
        raise RecordError(source, record_id, "<record>", f"expected an object, got {type(raw).__name__}")
    for name in fields:
        if name not in raw:
            raise RecordError(source, record_id, name, "missing")
    return record_id


@dataclasses.dataclass(frozen=True)
class LoadedRecords:
    """Records that passed validation, where they came from, and the case_ids that were skipped."""

    records: list[dict]
    sources: tuple[Path, ...]
    skipped_case_ids: tuple[Any, ...] = ()


def check_on_bad_record(on_bad_record: str) -> None:
    if on_bad_record not in ON_BAD_RECORD_CHOICES:
        raise ValueError(f"on_bad_record must be one of {ON_BAD_RECORD_CHOICES}, not {on_bad_record!r}")


def read_json(path: str | Path) -> Any:
    """Parse a JSON file; a syntax error names the file, line, column and character offset."""
    path = Path(path)
    try:
        with path.open("r", encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DataFormatError(
            f"{path}: malformed JSON at line {e.lineno} column {e.colno} (character {e.pos}): {e.msg}"
        ) from None
    except UnicodeDecodeError as e:
        raise DataFormatError(f"{path}: not UTF-8 text (byte {e.start}): {e.reason}") from None


def read_json_list(path: str | Path) -> list:
    """A JSON file whose top level must be a list of records (all ROME data files are)."""
    data = read_json(path)
    if not isinstance(data, list):
        raise DataFormatError(f"{path}: expected a JSON list of records at the top level, got {type(data).__name__}")
    return data


def _error_factory(source: str | Path, case_id: Any) -> Callable[[str, str], RecordError]:
    def make(field: str, problem: str) -> RecordError:
        return RecordError(source, case_id, field, problem)

    return make


def _require(mapping: dict, fields: Iterable[str], prefix: str, err: Callable[[str, str], RecordError]) -> None:
    for name in fields:
        if name not in mapping:
            raise err(prefix + name, "missing")


def _check_text(value: Any, field: str, err: Callable[[str, str], RecordError]) -> None:
    if not isinstance(value, str):
        raise err(field, f"expected a string, got {type(value).__name__}")
    if not value.strip():
        raise err(field, f"empty or whitespace-only ({value!r})")


def _check_prompt_template(prompt: Any, subject: Any, err: Callable[[str, str], RecordError]) -> None:
    """The subject must land exactly at the single ``{}``: key extraction locates it there."""
    _check_text(subject, "requested_rewrite.subject", err)
    if not isinstance(prompt, str):
        raise err("requested_rewrite.prompt", f"expected a string, got {type(prompt).__name__}")
    n = prompt.count("{}")
    if n != 1:
        raise err("requested_rewrite.prompt", f"must contain exactly one '{{}}' placeholder, found {n} in {prompt!r}")
    if "{" in prompt.replace("{}", "") or "}" in prompt.replace("{}", ""):
        raise err("requested_rewrite.prompt", f"has braces besides the '{{}}' placeholder: {prompt!r}")
    start = prompt.index("{}")
    filled = prompt.format(subject)
    if filled[start : start + len(subject)] != subject:
        raise err("requested_rewrite.subject", f"{subject!r} is not at the placeholder of {filled!r}")


def _check_target(target: Any, name: str, kind: RecordKind, err: Callable[[str, str], RecordError]) -> None:
    field = f"requested_rewrite.{name}"
    if not isinstance(target, dict):
        raise err(field, f"expected an object {{str, id}}, got {type(target).__name__}")
    _require(target, TARGET_FIELDS[kind], field + ".", err)
    _check_text(target["str"], field + ".str", err)


def _check_rewrite(rewrite: Any, kind: RecordKind, err: Callable[[str, str], RecordError]) -> None:
    if not isinstance(rewrite, dict):
        raise err("requested_rewrite", f"expected an object, got {type(rewrite).__name__}")
    _require(rewrite, REWRITE_FIELDS[kind], "requested_rewrite.", err)
    _check_prompt_template(rewrite["prompt"], rewrite["subject"], err)
    _check_target(rewrite["target_new"], "target_new", kind, err)
    _check_target(rewrite["target_true"], "target_true", kind, err)
    if rewrite["target_new"]["str"] == rewrite["target_true"]["str"]:
        raise err("requested_rewrite.target_new.str", "equals target_true: the edit would change nothing")


def _check_prompt_item(item: Any, field: str, kind: RecordKind, err: Callable[[str, str], RecordError]) -> None:
    """CounterFact prompt lists hold strings; zsRE neighborhood prompts are {prompt, target} pairs."""
    if kind == "zsre" and field.startswith("neighborhood_prompts"):
        if not isinstance(item, dict):
            raise err(field, f"expected an object {{prompt, target}}, got {type(item).__name__}")
        _require(item, ("prompt", "target"), field + ".", err)
        _check_text(item["prompt"], field + ".prompt", err)
        if not isinstance(item["target"], str):
            raise err(field + ".target", f"expected a string, got {type(item['target']).__name__}")
        return
    _check_text(item, field, err)


def _check_prompt_lists(record: dict, kind: RecordKind, err: Callable[[str, str], RecordError]) -> None:
    for name in PROMPT_LISTS:
        value = record[name]
        if not isinstance(value, list):
            raise err(name, f"expected a list, got {type(value).__name__}")
        for i, item in enumerate(value):
            _check_prompt_item(item, f"{name}[{i}]", kind, err)


def validate_record(record: Any, source: str | Path, kind: RecordKind = "counterfact") -> None:
    """Raise ``RecordError`` unless ``record`` is a usable edit request of the given schema.

    Checks: every schema field is present; case_id is an int; the prompt has exactly one ``{}``
    and no other braces, and the (non-empty) subject sits exactly at it once filled; target_new
    and target_true strings are non-empty and differ; prompt lists hold non-empty prompts.
    """
    if not isinstance(record, dict):
        raise RecordError(source, None, "<record>", f"expected an object, got {type(record).__name__}")
    case_id = record.get("case_id")
    err = _error_factory(source, case_id)
    _require(record, TOP_FIELDS[kind], "", err)
    if not isinstance(case_id, int) or isinstance(case_id, bool):
        raise err("case_id", f"expected an integer, got {case_id!r}")
    _check_rewrite(record["requested_rewrite"], kind, err)
    _check_prompt_lists(record, kind, err)


def collect_records(
    raws: Sequence[Any],
    source: Path,
    build: Callable[[Any, int], dict],
    on_bad_record: OnBadRecord = "raise",
    kind: Optional[RecordKind] = "counterfact",
    id_key: str = "case_id",
) -> LoadedRecords:
    """Convert (``build``) and validate every raw entry of one file; raise on or skip bad ones.

    ``kind=None`` leaves validation entirely to ``build``. A repeated id is a bad record too:
    run folders name their files by case_id, so a duplicate would silently overwrite results.
    """
    check_on_bad_record(on_bad_record)
    records: list[dict] = []
    skipped: list[Any] = []
    seen: set = set()
    for index, raw in enumerate(raws):
        try:
            record = build(raw, index)
            if kind is not None:
                validate_record(record, source, kind)
            if record[id_key] in seen:
                raise RecordError(source, record[id_key], id_key, "duplicate within the file")
            seen.add(record[id_key])
            records.append(record)
        except RecordError as e:
            if on_bad_record == "raise":
                raise
            log.warning("skipping bad record: %s", e)
            skipped.append(e.case_id)
    if skipped:
        log.warning("%s: skipped %d bad record(s): %s", source, len(skipped), skipped)
    return LoadedRecords(records=records, sources=(source,), skipped_case_ids=tuple(skipped))


def load_counterfact_file(path: str | Path, on_bad_record: OnBadRecord = "raise") -> LoadedRecords:
    """Any file of full-schema CounterFact records (counterfact.json, known subsets, toxicity-flash files)."""
    path = Path(path)
    return collect_records(read_json_list(path), path, lambda raw, _: raw, on_bad_record, "counterfact")


def merge_by_case_id(*record_lists: Iterable[dict]) -> list[dict]:
    """Union of record lists keyed by case_id; the earliest list wins (pass full-schema lists first)."""
    merged: dict[Any, dict] = {}
    for records in record_lists:
        for record in records:
            merged.setdefault(record["case_id"], record)
    return list(merged.values())
