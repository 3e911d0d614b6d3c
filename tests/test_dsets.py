"""Tests of dsets: the real files in ../shared (skipped when absent), bad inputs, and the known filter."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
import torch

from dsets import (
    AttributeSnippets,
    CounterFactDataset,
    DataFileMissingError,
    DataFormatError,
    KnownsDataset,
    MENDQADataset,
    RecordError,
    find_knowedit_files,
    get_tfidf_vectorizer,
    known_subset_path,
    load_counterfact_file,
    load_knowedit_counterfact,
    load_knowedit_file,
    resolve_edit_dataset,
    validate_record,
)
from dsets.make_known import build_known_subset, filter_known
from util.globals import REPO_ROOT, Paths
from util.scoring import prompt_ids, score_targets, target_ids
from util.tiny_models import make_model, make_tokenizer

SHARED = REPO_ROOT.parent / "shared" / "data"
SHARED_DSETS = SHARED / "dsets"
UNREACHABLE_URL = "http://127.0.0.1:9"  # connection refused at once: no network wait in tests
TOXICITY_FILES = {
    "counterfact_gpt2-xl_known_toxicity_flash.json": 11,
    "counterfact_EleutherAI_gpt-j-6B_known_toxicity_flash.json": 9,
}


def make_paths(data_dir: Path, fallbacks: tuple[Path, ...] = (), url: str = UNREACHABLE_URL) -> Paths:
    return Paths(
        data_dir=data_dir, data_dir_fallbacks=fallbacks, stats_dir=data_dir / "stats",
        results_dir=data_dir / "results", hparams_dir=data_dir / "hparams",
        model_cache_dir=data_dir / "models", remote_root_url=url,
    )


def need_shared(*names: str) -> None:
    for name in names:
        if not (SHARED / name).exists():
            pytest.skip(f"{SHARED / name} absent (the shared data folder of this environment)")


@pytest.fixture
def shared_paths(tmp_path: Path) -> Paths:
    """An empty DATA_DIR in tmp whose fallback is the shared data folder."""
    need_shared("dsets")
    return make_paths(tmp_path / "dsets", (SHARED_DSETS,))


def good_record(case_id: int = 7) -> dict:
    return {
        "case_id": case_id,
        "pararel_idx": None,
        "requested_rewrite": {
            "prompt": "{} is located in",
            "relation_id": "P17",
            "subject": "Eiffel Tower",
            "target_new": {"str": "Rome", "id": None},
            "target_true": {"str": "Paris", "id": None},
        },
        "paraphrase_prompts": ["The Eiffel Tower stands in"],
        "neighborhood_prompts": ["The Louvre is located in"],
        "attribute_prompts": [],
        "generation_prompts": ["The Eiffel Tower is"],
    }


def write_json(path: Path, obj: object) -> Path:
    path.write_text(json.dumps(obj))
    return path


# ---------------------------------------------------------------- real files


def test_counterfact_json_has_1013_valid_records(shared_paths: Paths) -> None:
    need_shared("dsets/counterfact.json")
    ds = CounterFactDataset(shared_paths)
    assert len(ds) == 1013 and ds.skipped_case_ids == ()
    assert len({r["case_id"] for r in ds.records}) == 1013
    for record in ds.records:
        validate_record(record, ds.source)
    assert len(CounterFactDataset(shared_paths, size=10)) == 10


def test_knowedit_flat_files_cover_21919_case_ids(shared_paths: Paths) -> None:
    need_shared("sources/knowedit_format/counterfact-train.json")
    files = find_knowedit_files(shared_paths)
    assert [f.name for f in files] == ["counterfact-train.json", "counterfact-edit.json", "counterfact-val.json"]
    loaded = load_knowedit_counterfact(shared_paths)
    ids = [r["case_id"] for r in loaded.records]
    assert len(ids) == len(set(ids)) == 21919 and loaded.skipped_case_ids == ()
    for record in loaded.records:
        validate_record(record, "knowedit")
        assert record["neighborhood_prompts"] and record["paraphrase_prompts"] == record["generation_prompts"]


def test_flat_conversion_reproduces_the_full_schema_rewrites(shared_paths: Paths) -> None:
    """The subject -> '{}' rule gives the same template and targets as counterfact.json."""
    need_shared("dsets/counterfact.json", "sources/knowedit_format/counterfact-train.json")
    flat = {r["case_id"]: r for r in load_knowedit_counterfact(shared_paths).records}
    for record in CounterFactDataset(shared_paths).records:
        got = dict(flat[record["case_id"]]["requested_rewrite"], relation_id=None)
        want = dict(record["requested_rewrite"], relation_id=None)
        for target in ("target_new", "target_true"):
            got[target] = got[target]["str"]
            want[target] = want[target]["str"]
        assert got == want
        assert flat[record["case_id"]]["neighborhood_prompts"][0] in record["neighborhood_prompts"]


def test_locality_ground_truth_equals_ground_truth_in_flat_files() -> None:
    """Why the conversion may score neighbourhood prompts against target_true, as ROME does."""
    need_shared("sources/knowedit_format/counterfact-train.json")
    for path in sorted((SHARED / "sources" / "knowedit_format").glob("counterfact-*.json")):
        for raw in json.loads(path.read_text()):
            assert raw["locality_ground_truth"] == raw["ground_truth"]


@pytest.mark.parametrize("name,count", sorted(TOXICITY_FILES.items()))
def test_toxicity_flash_files_load_by_bare_name(shared_paths: Paths, name: str, count: int) -> None:
    need_shared(f"dsets/{name}")
    records, source = resolve_edit_dataset(name, shared_paths, "gpt2-xl", None)
    assert len(records) == count and source == SHARED_DSETS / name
    records, _ = resolve_edit_dataset(name.removesuffix(".json"), shared_paths, "gpt2-xl", 3)
    assert len(records) == 3
    assert len(resolve_edit_dataset(str(SHARED_DSETS / name), shared_paths, "x").records) == count


def test_registry_named_datasets(shared_paths: Paths) -> None:
    need_shared("dsets/counterfact.json", "dsets/zsre_mem_eval.json")
    assert len(resolve_edit_dataset("counterfact_full", shared_paths, "m", 5).records) == 5
    assert len(resolve_edit_dataset("zsre", shared_paths, "m", None).records) == 1037
    with pytest.raises(ValueError, match="valid names are .*counterfact_full.*zsre"):
        resolve_edit_dataset("counterfactual", shared_paths, "m", None)


def test_registry_known_subset_missing_then_present(tmp_path: Path) -> None:
    shared_paths = make_paths(tmp_path / "dsets", (tmp_path / "elsewhere",))
    resolved = resolve_edit_dataset("cf", shared_paths, "org_model", None)
    assert resolved.missing and resolved.records is None
    assert resolved.source_path == known_subset_path(shared_paths, "org_model")
    assert resolved.source_path == shared_paths.data_dir / "counterfact_org_model_known.json"
    shared_paths.data_dir.mkdir(parents=True)
    write_json(resolved.source_path, [good_record(1), good_record(2)])
    records, source = resolve_edit_dataset("counterfact", shared_paths, "org_model", 1)
    assert [r["case_id"] for r in records] == [1] and source == resolved.source_path


def test_zsre_eval_loads_and_train_has_two_empty_alts(shared_paths: Paths) -> None:
    need_shared("dsets/zsre_mem_eval.json", "dsets/zsre_mem_train.json")
    ds = MENDQADataset(shared_paths)
    assert len(ds) == 1037
    raw = json.loads((SHARED_DSETS / "zsre_mem_eval.json").read_text())
    rw = ds[0]["requested_rewrite"]
    assert rw["prompt"].format(rw["subject"]) == raw[0]["src"]
    assert [r["requested_rewrite"]["target_new"]["str"] for r in ds] == [r["answers"][0] for r in raw]
    # ROME's target needs no alt: the two train entries with an empty alt are edited too
    assert len(MENDQADataset(shared_paths, split="train")) == 1000
    with pytest.raises(RecordError, match=r"zsre_mem_train\.json: case_id 534: field 'requested_rewrite\.target_new\.str'"):
        MENDQADataset(shared_paths, split="train", setting="mend")
    train = MENDQADataset(shared_paths, split="train", on_bad_record="skip", setting="mend")
    assert train.skipped_case_ids == (534, 723) and len(train) == 998


def test_zsre_token_by_token_neighborhood_with_tokenizer(shared_paths: Paths) -> None:
    need_shared("dsets/zsre_mem_eval.json")
    tok = make_tokenizer()
    record = MENDQADataset(shared_paths, tok=tok, size=3)[0]
    pairs = record["neighborhood_prompts"]
    assert "".join(p["target"] for p in pairs) == " The String"
    assert pairs[0]["prompt"].endswith("?") and pairs[-1]["prompt"].endswith("?" + "".join(p["target"] for p in pairs[:-1]))
    assert record["requested_rewrite"]["target_true"]["str"] == tok.eos_token


def test_knowns_load(shared_paths: Paths) -> None:
    need_shared("dsets/known_1000.json")
    assert len(KnownsDataset(shared_paths)) == 1209


# ---------------------------------------------------------------- missing files


def test_missing_counterfact_names_where_to_put_it(tmp_path: Path) -> None:
    paths = make_paths(tmp_path / "data")
    expected = r"(?s)counterfact\.json.*download from http://127\.0\.0\.1:9/data/dsets/counterfact\.json failed"
    with pytest.raises(DataFileMissingError, match=expected + r".*\.\./shared/data/dsets"):
        CounterFactDataset(paths)
    with pytest.raises(FileNotFoundError, match="multi_counterfact.json"):
        CounterFactDataset(paths, multi=True, allow_download=False)
    assert not (tmp_path / "data").exists()  # a failed download leaves nothing behind


def test_generation_test_files_missing_raise_with_official_url(tmp_path: Path) -> None:
    paths = make_paths(tmp_path, url="http://127.0.0.1:9")
    with pytest.raises(FileNotFoundError, match=r"http://127\.0\.0\.1:9/data/dsets/attribute_snippets\.json"):
        AttributeSnippets(paths)
    with pytest.raises(DataFileMissingError, match=r"(?s)idf\.npy.*attribute_snippets\.json"):
        get_tfidf_vectorizer(paths)


def test_tfidf_and_snippets_when_present(tmp_path: Path) -> None:
    snippets = [
        {"relation_id": "P17", "target_id": "Q38", "samples": [{"name": "Rome", "text": "Rome is the capital of Italy"}]},
        {"relation_id": "P17", "target_id": "Q142", "samples": [{"name": "Paris", "text": "Paris is the capital of France"}]},
    ]
    write_json(tmp_path / "attribute_snippets.json", snippets)
    paths = make_paths(tmp_path)
    snips = AttributeSnippets(paths)
    assert snips["P17"]["Q38"][0]["name"] == "Rome" and snips["P99"]["Q1"] == []
    vec = get_tfidf_vectorizer(paths, allow_download=False)  # fitted from the snippets, then saved
    assert (tmp_path / "idf.npy").exists() and (tmp_path / "tfidf_vocab.json").exists()
    again = get_tfidf_vectorizer(paths, allow_download=False)  # loaded from the saved files
    a, b = vec.transform(["the capital of Italy"]), again.transform(["the capital of Italy"])
    assert np.allclose(a.toarray(), b.toarray()) and a.nnz > 0


# ---------------------------------------------------------------- bad inputs


def test_malformed_json_names_file_and_position(tmp_path: Path) -> None:
    bad = tmp_path / "broken.json"
    bad.write_text('[{"case_id": 1,\n  "prompt": }]')
    with pytest.raises(DataFormatError, match=r"broken\.json: malformed JSON at line 2 column 13"):
        load_counterfact_file(bad)
    not_list = write_json(tmp_path / "obj.json", {"case_id": 1})
    with pytest.raises(DataFormatError, match=r"obj\.json: expected a JSON list"):
        load_counterfact_file(not_list)


def mutate(case_id: int, path: tuple[str, ...], value: object) -> dict:
    record = good_record(case_id)
    target = record
    for key in path[:-1]:
        target = target[key]
    if value is KeyError:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return record


BAD_RECORDS = [
    (("requested_rewrite", "subject"), "  ", "requested_rewrite.subject"),
    (("requested_rewrite", "prompt"), "The tower is located in", "requested_rewrite.prompt"),
    (("requested_rewrite", "prompt"), "{} and {} are in", "requested_rewrite.prompt"),
    (("requested_rewrite", "prompt"), "{} is {{really}} in", "requested_rewrite.prompt"),
    (("requested_rewrite", "target_new", "str"), "", "requested_rewrite.target_new.str"),
    (("requested_rewrite", "target_true", "str"), " \t", "requested_rewrite.target_true.str"),
    (("requested_rewrite", "target_new", "str"), "Paris", "requested_rewrite.target_new.str"),
    (("neighborhood_prompts",), "not a list", "neighborhood_prompts"),
    (("paraphrase_prompts",), KeyError, "paraphrase_prompts"),
    (("requested_rewrite", "target_true"), KeyError, "requested_rewrite.target_true"),
]


@pytest.mark.parametrize("path,value,field", BAD_RECORDS)
def test_validate_record_names_file_case_and_field(path: tuple, value: object, field: str) -> None:
    with pytest.raises(RecordError) as info:
        validate_record(mutate(42, path, value), "some/file.json")
    assert "some/file.json" in str(info.value) and "case_id 42" in str(info.value)
    assert info.value.field == field and info.value.case_id == 42


def test_subject_not_in_prompt_skip_mode_returns_ids(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    no_subject = mutate(5, ("requested_rewrite", "prompt"), "The tower is located in")
    empty_target = mutate(6, ("requested_rewrite", "target_new", "str"), "")
    duplicate = good_record(1)
    path = write_json(tmp_path / "cf.json", [good_record(1), no_subject, empty_target, duplicate, good_record(2)])
    with pytest.raises(RecordError, match=r"cf\.json: case_id 5: field 'requested_rewrite\.prompt'"):
        CounterFactDataset(None, path=path)
    with caplog.at_level(logging.WARNING, logger="dsets.records"):
        ds = CounterFactDataset(None, path=path, on_bad_record="skip")
    assert [r["case_id"] for r in ds.records] == [1, 2] and ds.skipped_case_ids == (5, 6, 1)
    assert "case_id 6" in caplog.text
    resolved = resolve_edit_dataset(str(path), make_paths(tmp_path), "m", None, on_bad_record="skip")
    assert resolved.skipped_case_ids == (5, 6, 1)


def test_flat_record_with_subject_missing_or_repeated(tmp_path: Path) -> None:
    base = {
        "case_id": 3, "prompt": "Toko Yasuda, the", "subject": "Toko Yasuda", "target_new": "piano",
        "ground_truth": "guitar", "rephrase_prompt": "Toko Yasuda is incredible at",
        "locality_prompt": "John Lennon performs on the", "locality_ground_truth": "guitar",
    }
    repeated = dict(base, case_id=4, prompt="Toko Yasuda and Toko Yasuda play the")
    absent = dict(base, case_id=5, subject="Yoko Ono")
    other_locality = dict(base, case_id=6, locality_ground_truth="drums")
    path = write_json(tmp_path / "counterfact-val.json", [base, repeated, absent, other_locality])
    with pytest.raises(RecordError, match="case_id 4: field 'subject': 'Toko Yasuda' occurs 2 times"):
        load_knowedit_file(path)
    loaded = load_knowedit_file(path, on_bad_record="skip")
    assert loaded.skipped_case_ids == (4, 5, 6)
    assert loaded.records[0]["requested_rewrite"]["prompt"] == "{}, the"
    assert find_knowedit_files(make_paths(tmp_path)) == [path]



def test_records_that_are_not_objects_or_lack_a_field_are_named_in_every_loader(tmp_path: Path) -> None:
    from dsets.knowns import check_known
    from dsets.records import require_fields

    src = tmp_path / "f.json"
    with pytest.raises(RecordError, match=r"f\.json: case_id '<entry 2>': field '<record>': expected an object, got list"):
        require_fields([1], src, 2, ("a",), id_field="case_id")
    with pytest.raises(RecordError, match=r"case_id 9: field 'b': missing"):
        require_fields({"case_id": 9, "a": 1}, src, 0, ("a", "b"), id_field="case_id")
    with pytest.raises(RecordError, match=r"case_id 3: field 'a': missing"):  # no id field: the position
        require_fields({}, src, 3, ("a",))
    assert require_fields({"known_id": 12, "a": 1}, src, 0, ("a",), id_field="known_id") == 12
    with pytest.raises(RecordError, match=r"case_id 5: field 'template': missing"):
        check_known({"known_id": 5, "subject": "s", "attribute": "a", "prompt": "s p", "relation_id": "P1"}, src, 0)
    path = write_json(tmp_path / "counterfact-val.json", [{"case_id": 8, "prompt": "x"}])
    with pytest.raises(RecordError, match=r"case_id 8: field 'subject': missing"):
        load_knowedit_file(path)


# ---------------------------------------------------------------- known filter


def greedy_one_token_target(model: torch.nn.Module, tok, prompt: str) -> Optional[str]:
    """A target string that tokenizes (with its leading space) to the model's greedy next token."""
    ids = torch.tensor([prompt_ids(tok, prompt)])
    best = int(model(ids).logits[0, -1].argmax())
    text = tok.decode([best])
    if text.startswith(" ") and text.strip() and target_ids(tok, text[1:]) == [best]:
        return text[1:]
    return None


def known_and_unknown_records(model: torch.nn.Module, tok) -> list[dict]:
    records = []
    for i, subject in enumerate(["Paris", "Rome", "Berlin", "Tokyo", "Madrid", "London"]):
        record = mutate(100 + i, ("requested_rewrite", "subject"), subject)
        greedy = greedy_one_token_target(model, tok, f"{subject} is located in")
        if greedy is not None and not records:
            record["requested_rewrite"]["target_true"]["str"] = greedy
            record["requested_rewrite"]["target_new"]["str"] = greedy + "x"
        records.append(record)
    assert any(r["requested_rewrite"]["target_true"]["str"] != "Paris" for r in records), "no greedy target found"
    return records


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_filter_known_keeps_exactly_the_correct_records(arch: str) -> None:
    model, tok = make_model(arch), make_tokenizer()
    records = known_and_unknown_records(model, tok)
    prompts = [r["requested_rewrite"]["prompt"].format(r["requested_rewrite"]["subject"]) for r in records]
    truth = score_targets(model, tok, prompts, [r["requested_rewrite"]["target_true"]["str"] for r in records])
    kept = filter_known(model, tok, records, batch_size=4)
    assert kept == [r for r, s in zip(records, truth) if s.correct]
    assert records[0] in kept and len(kept) < len(records)


def test_build_known_subset_writes_one_file_atomically(tmp_path: Path) -> None:
    model, tok = make_model("gpt2"), make_tokenizer()
    records = known_and_unknown_records(model, tok)
    source = write_json(tmp_path / "counterfact.json", records)
    data_dir = tmp_path / "out"
    paths = make_paths(data_dir, (tmp_path,))
    out = build_known_subset(model, tok, paths, "tiny_gpt2", source="counterfact", batch_size=4)
    assert out == known_subset_path(paths, "tiny_gpt2") and sorted(p.name for p in data_dir.iterdir()) == [out.name]
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # readable by others, unlike a bare mkstemp file
    known, path = resolve_edit_dataset("counterfact", paths, "tiny_gpt2", None)
    assert path == out and [r["case_id"] for r in known] == [r["case_id"] for r in filter_known(model, tok, records)]
    assert source.exists()


def test_build_known_subset_both_sources_prefers_full_records(tmp_path: Path) -> None:
    need_shared("dsets/counterfact.json", "sources/knowedit_format/counterfact-train.json")
    model, tok = make_model("gpt2"), make_tokenizer()
    paths = make_paths(tmp_path / "dsets", (SHARED_DSETS,))
    from dsets.make_known import candidate_records

    candidates = candidate_records(paths, "both")
    assert len(candidates) == 21919 and [r["case_id"] for r in candidates] == list(range(21919))
    full_ids = {r["case_id"] for r in CounterFactDataset(paths).records}
    assert all((r.get("_source") != "knowedit_flat") == (r["case_id"] in full_ids) for r in candidates)
    out = build_known_subset(model, tok, paths, "tiny", source="both", limit=40, batch_size=16)
    assert isinstance(json.loads(out.read_text()), list)
