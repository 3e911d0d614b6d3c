"""zsRE as ROME/MEMIT edit it (the true answer), MEND's setting by name, the official file names,
and neighbourhood continuations scored as the tokens they are (issue 24, items 1, 3 and 6)."""
from __future__ import annotations

import json
import urllib.error
from pathlib import Path

import pytest

from dsets import files as files_mod
from dsets.files import DataFileMissingError, official_url
from dsets.registry import DATASETS, resolve_edit_dataset
from dsets.zsre import MENDQADataset, load_zsre_file, neighborhood_pairs
from experiments.py.eval_utils_zsre import compute_rewrite_quality_zsre
from tests.test_dataset_metrics import LookupLM
from tests.test_dsets import SHARED_DSETS, UNREACHABLE_URL, make_paths, need_shared
from util.scoring import Continuation, prompt_ids, target_ids
from util.tiny_models import make_tokenizer

# Two MEND-format entries (the first is record 1 of the shared eval copy, with its portability field).
ENTRIES = [
    {
        "subject": "Ramalinaceae", "src": "Which family does Ramalinaceae belong to?", "pred": "Ramalinales",
        "rephrase": "What family are Ramalinaceae?", "alt": "Lamiinae", "answers": ["Lecanorales"],
        "loc": "nq question: types of skiing in the winter olympics 2018", "loc_ans": "Downhill",
        "cond": "Ramalinales >> Lamiinae || Which family does Ramalinaceae belong to?",
        "portability": {"New Question": "Which family does Ramalinaceae now belong to?", "New Answer": "Cerambycidae"},
    },
    {
        "subject": "Paris", "src": "Which country is Paris in?", "pred": "France",
        "rephrase": "Paris lies in which country?",
        "alt": "Italy", "answers": ["France", "French Republic"], "loc": "nq question: who founded microsoft",
        "loc_ans": "Bill Gates", "cond": "France >> Italy || Which country is Paris in?",
    },
]


def _write(folder: Path, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(json.dumps(ENTRIES), encoding="utf-8")
    return path


def _targets(records: list[dict]) -> list[tuple[str, str]]:
    rewrites = [r["requested_rewrite"] for r in records]
    return [(rw["target_new"]["str"], rw["target_true"]["str"]) for rw in rewrites]


def test_default_is_romes_setting_true_answer_and_eos_placeholder(tmp_path):
    """ROME's and MEMIT's dsets/zsre.py: target_new = answers[0], target_true = "<|endoftext|>"."""
    path = _write(tmp_path, "zsre_mend_eval.json")
    records = load_zsre_file(path).records
    assert _targets(records) == [("Lecanorales", "<|endoftext|>"), ("France", "<|endoftext|>")]
    assert "portability" not in records[0]  # written for MEND's edit to alt: kept in that setting only
    assert load_zsre_file(path, setting="mend").records[0]["portability"] == ENTRIES[0]["portability"]
    tok = make_tokenizer()
    assert _targets(load_zsre_file(path, tok=tok).records)[0] == ("Lecanorales", tok.eos_token)


def test_mend_setting_is_alt_and_pred_by_name(tmp_path):
    path = _write(tmp_path, "zsre_mend_eval.json")
    assert _targets(load_zsre_file(path, setting="mend").records) == [("Lamiinae", "Ramalinales"), ("Italy", "France")]
    with pytest.raises(ValueError, match=r"setting must be one of \('rome', 'mend'\)"):
        load_zsre_file(path, setting="alt")


def test_registry_zsre_is_romes_and_zsre_mend_is_mends(tmp_path):
    paths = make_paths(tmp_path / "data")
    _write(paths.data_dir, "zsre_mend_eval.json")
    rome = resolve_edit_dataset("zsre", paths, "m", allow_download=False)
    mend = resolve_edit_dataset("zsre_mend", paths, "m", allow_download=False)
    assert (rome.kind, mend.kind) == ("zsre", "zsre")
    assert [t for t, _ in _targets(rome.records)] == ["Lecanorales", "France"]
    assert [t for t, _ in _targets(mend.records)] == ["Lamiinae", "Italy"]
    # ROME's target_true is a placeholder: there is nothing to roll back to or retain
    assert rome.target_true_is_answer is False and mend.target_true_is_answer is True
    assert "zsre_mend" in DATASETS and "zsre-mend" not in DATASETS


def test_environment_copy_name_is_found_and_a_missing_file_names_romes(tmp_path):
    """ROME serves zsre_mend_eval.json; this environment's copy is zsre_mem_eval.json."""
    paths = make_paths(tmp_path / "data")
    copy = _write(paths.data_dir, "zsre_mem_eval.json")
    assert MENDQADataset(paths, allow_download=False).source == copy
    empty = make_paths(tmp_path / "empty")
    expected = (r"(?s)zsre_mend_eval\.json \(or under the name zsre_mem_eval\.json\) not found.*"
                r"download from http://127\.0\.0\.1:9/data/dsets/zsre_mend_eval\.json failed")
    with pytest.raises(DataFileMissingError, match=expected):
        MENDQADataset(empty)


def test_missing_multi_counterfact_is_one_clear_error_with_memits_url(tmp_path, monkeypatch):
    """MEMIT and AlphaEdit fetch multi_counterfact.json from memit.baulab.info (ROME's site has
    none). Offline, one error names the file, the folders searched, the URL and how to provide it."""
    tried = []

    def refuse(url, dest, timeout=0.0):
        tried.append(url)
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(files_mod, "download", refuse)
    paths = make_paths(tmp_path / "data", url="https://rome.baulab.info")
    url = "https://memit.baulab.info/data/dsets/multi_counterfact.json"
    assert official_url(paths, "multi_counterfact.json") == url
    assert official_url(paths, "counterfact.json") == "https://rome.baulab.info/data/dsets/counterfact.json"
    for name in ("mcf", "multi_counterfact"):
        with pytest.raises(DataFileMissingError) as info:
            resolve_edit_dataset(name, paths, "m")
        message = str(info.value)
        assert message.startswith(f"multi_counterfact.json not found (searched {paths.data_dir})")
        assert f"the download from {url} failed" in message and message.endswith(f"Official copy: {url}")
        assert f"Put multi_counterfact.json in {paths.data_dir}" in message and "DATA_DIR_FALLBACKS" in message
        assert info.value.__cause__ is None and info.value.__suppress_context__
    assert tried == [url, url]
    # a mirror (any other REMOTE_ROOT_URL) serves every file
    assert official_url(make_paths(tmp_path, url=UNREACHABLE_URL), "multi_counterfact.json").startswith(UNREACHABLE_URL)


# ------------------------------------------------------------------ neighbourhood continuations


def test_mid_word_continuations_score_their_own_tokens_tiny_tokenizer():
    """ROME's token-by-token pairs hold the decoded next token, often the middle of a word; it is
    scored as written (a space before "an" of " Lecanorales" would make it other tokens)."""
    tok = make_tokenizer()
    answer = tok(" Lecanorales", add_special_tokens=False)["input_ids"]
    pairs = neighborhood_pairs("nq question: which order", "Lecanorales", tok)
    assert len(pairs) == len(answer) >= 4
    mid_word = [i for i, p in enumerate(pairs) if not p["target"].startswith(" ")]
    assert mid_word and all(target_ids(tok, p["target"]) != [answer[i]] for i, p in enumerate(pairs) if i in mid_word)
    assert [target_ids(tok, Continuation(p["target"])) for p in pairs] == [[a] for a in answer]

    table = {prompt_ids(tok, p["prompt"])[-1]: a for p, a in zip(pairs, answer)}
    assert len(table) == len(pairs)  # every prompt ends in its own token: the lookup model is unambiguous
    record = {
        "case_id": 0,
        "requested_rewrite": {"prompt": "{} belongs to", "subject": "Ramalinaceae",
                              "target_new": {"str": "Lecanorales"}, "target_true": {"str": tok.eos_token}},
        "paraphrase_prompts": [],
        "neighborhood_prompts": pairs,
    }
    got = compute_rewrite_quality_zsre(LookupLM(len(tok), table), tok, record)
    assert got["neighborhood_prompts_correct"] == [True] * len(answer)


N_SHARED = 20  # records of the shared eval copy checked on SmolLM2


@pytest.mark.slow
def test_smollm2_neighbourhood_tokens_are_the_answers(smollm2):
    """With SmolLM2's tokenizer "ec" of " Lecanorales" is token 1159; " ec" (2948) was scored."""
    model, tok = smollm2
    assert tok(" Lecanorales", add_special_tokens=False)["input_ids"][:2] == [450, 1159]
    assert target_ids(tok, "ec") == [2948] and target_ids(tok, Continuation("ec")) == [1159]
    need_shared("dsets/zsre_mem_eval.json")
    path = SHARED_DSETS / "zsre_mem_eval.json"
    by_token = load_zsre_file(path, tok=tok).records[:N_SHARED]
    whole = load_zsre_file(path).records[:N_SHARED]
    record = by_token[1]  # its NQ answer " Downhill" is " Down" + "hill"
    assert [p["target"] for p in record["neighborhood_prompts"]] == [" Down", "hill"]
    assert target_ids(tok, Continuation("hill")) == tok(" Downhill", add_special_tokens=False)["input_ids"][1:]
    # ROME's per-token pairs and the one-pass whole answer give the same verdicts
    for a, b in zip(by_token, whole):
        assert compute_rewrite_quality_zsre(model, tok, a)["neighborhood_prompts_correct"] == \
            compute_rewrite_quality_zsre(model, tok, b)["neighborhood_prompts_correct"], a["case_id"]
