"""zsRE in MEND's question-answering format, converted to ROME's zsRE records.

Two settings of the targets (``setting``):
- ``"rome"`` (default; ROME's and MEMIT's ``dsets/zsre.py``, which AlphaEdit uses): target_new is
  ``answers[0]``, the TRUE answer: a zsRE edit teaches the model the right answer. target_true is
  ROME's placeholder ``"<|endoftext|>"`` (the tokenizer's own EOS text when ``tok`` is given): the
  dataset has no answer the edited model gave before, and ROME's zsRE code never reads it. So a
  roll-back to target_true, or retention counted against it, means nothing for these records
  (``TARGET_TRUE_IS_ANSWER``; the registry says so in ``EditDataset.target_true_is_answer``).
- ``"mend"`` (MEND's setting; the registry's ``zsre_mend``): target_new is ``alt``, the
  counterfactual answer MEND's editors are trained and evaluated with, and target_true is ``pred``,
  the prediction of MEND's base model (not of the model edited here).
An older version of this module edited to ``alt`` by default, arguing that ``answers[0]`` equals
``pred`` in 188 of the 1,037 eval records; ``pred`` is MEND's base model's answer, and the unedited
SmolLM2 answers none of the 1,037 questions with ``answers[0]`` (greedy, every token), so ROME's
target is no no-op here.

Other differences from ROME's code:
- The file is ROME's ``zsre_mend_eval.json`` (also found under this environment's copy name
  ``zsre_mem_eval.json``); a record's ``portability`` field (the eval copy in ../shared has one,
  written for MEND's ``alt`` edit: its questions hold ``alt`` as the new fact) is kept on the record in
  MEND's setting only, where it is the edit it was written for.
- Neighbourhood targets are the exact text that follows the prompt (ROME's pairs hold the decoded
  next token, which may continue a word: " L" then "ec" of " Lecanorales"); the metrics score them
  as written (``util.scoring.Continuation``). With ``tok``, the pairs are ROME's token-by-token
  ones (answer tokenized without special tokens, so no BOS lands inside an answer); without it,
  one pair per record holds the whole answer " <loc_ans>", which ``util.scoring.score_targets``
  checks token by token in one teacher-forced pass.
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

# ROME's file names (rome.baulab.info/data/dsets/), then the names of this environment's copies.
ZSRE_FILES = {"eval": "zsre_mend_eval.json", "train": "zsre_mend_train.json"}
ZSRE_ALIASES = {"eval": ("zsre_mem_eval.json",), "train": ("zsre_mem_train.json",)}
MEND_FIELDS = ("subject", "src", "pred", "rephrase", "alt", "answers", "loc", "loc_ans")
KEPT_FIELDS = ("portability",)  # extra fields of a MEND-format entry carried over to the record
ROME_EOS_PLACEHOLDER = "<|endoftext|>"
NQ_MARKER = "nq question: "
Setting = Literal["rome", "mend"]
SETTINGS: tuple[str, ...] = ("rome", "mend")
# Whether a setting's target_true is an answer (to roll back to, to count retention against).
TARGET_TRUE_IS_ANSWER = {"rome": False, "mend": True}


def _check_mend(raw: Any, source: Path, index: int) -> None:
    require_fields(raw, source, index, MEND_FIELDS)
    subject, src = raw["subject"], raw["src"]
    if not isinstance(src, str) or not isinstance(subject, str) or not subject or src.count(subject) != 1:
        raise RecordError(source, index, "subject", f"{subject!r} must occur exactly once in src {src!r}")
    if not isinstance(raw["loc"], str) or NQ_MARKER not in raw["loc"]:
        raise RecordError(source, index, "loc", f"neighborhood prompt lacks {NQ_MARKER!r}: {raw['loc']!r}")


def neighborhood_pairs(loc: str, loc_ans: str, tok: Optional[PreTrainedTokenizerBase]) -> list[dict]:
    """(prompt, exact continuation) pairs: ROME's token-by-token ones with ``tok``, else one whole-answer pair."""
    prompt = loc + "?"
    answer = " " + loc_ans
    if tok is None:
        return [{"prompt": prompt, "target": answer}]
    ans = tok(answer, add_special_tokens=False)["input_ids"]
    return [{"prompt": prompt + tok.decode(ans[:i]), "target": tok.decode(ans[i])} for i in range(len(ans))]


def _placeholder(tok: PreTrainedTokenizerBase | None) -> str:
    return (tok.eos_token if tok is not None and tok.eos_token else None) or ROME_EOS_PLACEHOLDER


def _targets(
    raw: dict, setting: Setting, tok: PreTrainedTokenizerBase | None, source: Path, index: int
) -> tuple[str, str]:
    """(target_new, target_true) of an entry under ``setting``."""
    if setting == "mend":
        return raw["alt"], raw["pred"]
    if not isinstance(raw["answers"], list) or not raw["answers"]:
        raise RecordError(source, index, "answers", f"expected a non-empty list, got {raw['answers']!r}")
    return raw["answers"][0], _placeholder(tok)


def mend_to_record(
    raw: Any, index: int, source: Path, tok: Optional[PreTrainedTokenizerBase] = None, setting: Setting = "rome"
) -> dict:
    """One MEND-format entry as a ROME zsRE record (validated afterwards with kind='zsre')."""
    _check_mend(raw, source, index)
    new, true = _targets(raw, setting, tok, source, index)
    record = {
        "case_id": index,
        "requested_rewrite": {
            "prompt": raw["src"].replace(raw["subject"], "{}"),
            "subject": raw["subject"],
            "target_new": {"str": new},
            "target_true": {"str": true},
        },
        "paraphrase_prompts": [raw["rephrase"]],
        "neighborhood_prompts": neighborhood_pairs(raw["loc"], raw["loc_ans"], tok),
        "attribute_prompts": [],
        "generation_prompts": [],
    }
    if setting == "mend":  # the portability questions were written for MEND's edit (to alt)
        record.update({k: raw[k] for k in KEPT_FIELDS if k in raw})
    return record


def check_setting(setting: str) -> None:
    if setting not in SETTINGS:
        raise ValueError(f"zsRE setting must be one of {SETTINGS} (rome: edit to answers[0]; mend: edit to alt), "
                         f"not {setting!r}")


def load_zsre_file(
    path: str | Path,
    tok: Optional[PreTrainedTokenizerBase] = None,
    on_bad_record: OnBadRecord = "raise",
    setting: Setting = "rome",
) -> LoadedRecords:
    path = Path(path)
    check_setting(setting)
    return collect_records(
        read_json_list(path), path, lambda raw, i: mend_to_record(raw, i, path, tok, setting), on_bad_record, "zsre"
    )


class MENDQADataset(Dataset):
    """zsRE records from the MEND eval split (``split='eval'``) or train split, ROME's class name."""

    def __init__(
        self,
        data_dir: Paths | str | Path,
        tok: Optional[PreTrainedTokenizerBase] = None,
        size: Optional[int] = None,
        split: Literal["eval", "train"] = "eval",
        on_bad_record: OnBadRecord = "raise",
        setting: Setting = "rome",
        allow_download: bool = True,
    ) -> None:
        if split not in ZSRE_FILES:
            raise ValueError(f"split must be one of {sorted(ZSRE_FILES)}, not {split!r}")
        check_setting(setting)
        self.setting = setting
        self.source = locate_or_download(as_paths(data_dir), ZSRE_FILES[split], allow_download, ZSRE_ALIASES[split])
        loaded = load_zsre_file(self.source, tok, on_bad_record, setting)
        self.records: list[dict] = loaded.records[:size]
        self.skipped_case_ids: tuple = loaded.skipped_case_ids
        log.info("loaded %d zsRE records (%s setting) from %s", len(self.records), setting, self.source)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, item: int) -> dict:
        return self.records[item]
