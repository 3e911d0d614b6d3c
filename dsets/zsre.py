"""zsRE in MEND's question-answering format, converted to ROME's zsRE records.

Differences from ROME's ``dsets/zsre.py``, each deliberate:
- target_new is ``alt`` (the counterfactual answer MEND pairs with each question). ROME reads
  ``answers[0]``, but in the MEND-format copies in ../shared ``answers[0]`` equals ``alt`` in only
  28/1037 (eval) and 17/1000 (train) records and equals ``pred`` in 188 and 571: editing to it
  would often be a no-op.
- target_true is ``pred`` (the answer the question originally has) by default, so that WilKE's
  roll-back edit (targets swapped) has something to return to. ``target_true='eos'`` gives ROME's
  placeholder, taken from the tokenizer when one is given (``<|endoftext|>`` otherwise).
- With ``tok``, neighbourhood prompts are ROME's token-by-token pairs (answer tokenized without
  special tokens, so no BOS lands inside an answer). Without ``tok`` there is one pair per record
  holding the whole answer, which ``util.scoring.score_targets`` checks in one teacher-forced pass.
- A bad record (subject not once in the question, empty answer, neighbourhood prompt that is not
  an NQ question) raises ``RecordError`` or is skipped, instead of an assert.
case_id is the index of the entry in the file, as in ROME, also when earlier entries are skipped.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal, Optional

from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from dsets.files import as_paths, locate_or_download
from dsets.records import LoadedRecords, OnBadRecord, RecordError, collect_records, read_json_list, require_fields
from util.globals import Paths

log = logging.getLogger(__name__)

ZSRE_FILES = {"eval": "zsre_mem_eval.json", "train": "zsre_mem_train.json"}
MEND_FIELDS = ("subject", "src", "pred", "rephrase", "alt", "answers", "loc", "loc_ans")
ROME_EOS_PLACEHOLDER = "<|endoftext|>"
NQ_MARKER = "nq question: "
TargetTrue = Literal["pred", "eos"]


def _check_mend(raw: Any, source: Path, index: int) -> None:
    require_fields(raw, source, index, MEND_FIELDS)
    subject, src = raw["subject"], raw["src"]
    if not isinstance(src, str) or not isinstance(subject, str) or not subject or src.count(subject) != 1:
        raise RecordError(source, index, "subject", f"{subject!r} must occur exactly once in src {src!r}")
    if not isinstance(raw["loc"], str) or NQ_MARKER not in raw["loc"]:
        raise RecordError(source, index, "loc", f"neighborhood prompt lacks {NQ_MARKER!r}: {raw['loc']!r}")


def neighborhood_pairs(loc: str, loc_ans: str, tok: Optional[PreTrainedTokenizerBase]) -> list[dict]:
    """ROME's token-by-token (prompt, next token) pairs with ``tok``; one whole-answer pair without."""
    prompt = loc + "?"
    if tok is None:
        return [{"prompt": prompt, "target": loc_ans}]
    ans = tok(" " + loc_ans, add_special_tokens=False)["input_ids"]
    return [{"prompt": prompt + tok.decode(ans[:i]), "target": tok.decode(ans[i])} for i in range(len(ans))]


def _target_true(raw: dict, mode: TargetTrue, tok: Optional[PreTrainedTokenizerBase]) -> str:
    if mode == "pred":
        return raw["pred"]
    return (tok.eos_token if tok is not None and tok.eos_token else None) or ROME_EOS_PLACEHOLDER


def mend_to_record(
    raw: Any, index: int, source: Path, tok: Optional[PreTrainedTokenizerBase] = None, target_true: TargetTrue = "pred"
) -> dict:
    """One MEND-format entry as a ROME zsRE record (validated afterwards with kind='zsre')."""
    _check_mend(raw, source, index)
    return {
        "case_id": index,
        "requested_rewrite": {
            "prompt": raw["src"].replace(raw["subject"], "{}"),
            "subject": raw["subject"],
            "target_new": {"str": raw["alt"]},
            "target_true": {"str": _target_true(raw, target_true, tok)},
        },
        "paraphrase_prompts": [raw["rephrase"]],
        "neighborhood_prompts": neighborhood_pairs(raw["loc"], raw["loc_ans"], tok),
        "attribute_prompts": [],
        "generation_prompts": [],
    }


def load_zsre_file(
    path: str | Path,
    tok: Optional[PreTrainedTokenizerBase] = None,
    on_bad_record: OnBadRecord = "raise",
    target_true: TargetTrue = "pred",
) -> LoadedRecords:
    path = Path(path)
    if target_true not in ("pred", "eos"):
        raise ValueError(f"target_true must be 'pred' or 'eos', not {target_true!r}")
    return collect_records(
        read_json_list(path), path, lambda raw, i: mend_to_record(raw, i, path, tok, target_true), on_bad_record, "zsre"
    )


class MENDQADataset(Dataset):
    """zsRE records from zsre_mem_eval.json (``split='eval'``) or zsre_mem_train.json."""

    def __init__(
        self,
        data_dir: Paths | str | Path,
        tok: Optional[PreTrainedTokenizerBase] = None,
        size: Optional[int] = None,
        split: Literal["eval", "train"] = "eval",
        on_bad_record: OnBadRecord = "raise",
        target_true: TargetTrue = "pred",
        allow_download: bool = True,
    ) -> None:
        if split not in ZSRE_FILES:
            raise ValueError(f"split must be one of {sorted(ZSRE_FILES)}, not {split!r}")
        self.source = locate_or_download(as_paths(data_dir), ZSRE_FILES[split], allow_download)
        loaded = load_zsre_file(self.source, tok, on_bad_record, target_true)
        self.records: list[dict] = loaded.records[:size]
        self.skipped_case_ids: tuple = loaded.skipped_case_ids
        log.info("loaded %d zsRE records from %s", len(self.records), self.source)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, item: int) -> dict:
        return self.records[item]
