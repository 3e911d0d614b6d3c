"""Metrics chosen by dataset: zsRE's token-by-token accuracy (hand-checked), zsRE runs end to end,
and locality as unchanged prediction."""
from __future__ import annotations

import json

import pytest
import torch

from dsets.registry import resolve_edit_dataset
from editing.resources import EditResources
from experiments.evaluate import cli, main
from experiments.py.dataset_metrics import metrics_for
from experiments.py.eval_utils_zsre import compute_rewrite_quality_zsre
from experiments.py.locality import argmax_answers, unchanged
from rome import ROMEHyperParams, apply_rome_to_model
from util.globals import load_paths
from util.scoring import prompt_ids
from util.tiny_models import TinyWorld, make_model, make_tokenizer, rank_one_hparams, tiny_records


class LookupLM(torch.nn.Module):
    """A language model whose next token is a fixed function of the last token: hand-checkable.
    Unknown tokens predict token 0."""

    def __init__(self, vocab: int, next_token: dict[int, int]):
        super().__init__()
        self.vocab, self.next_token = vocab, next_token
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.config = type("Config", (), {})()

    @property
    def base_model(self):
        return self

    def get_output_embeddings(self):
        return torch.nn.Identity()

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        predicted = torch.tensor([[self.next_token.get(int(t), 0) for t in row] for row in input_ids])
        return (torch.nn.functional.one_hot(predicted, self.vocab).float(),)


def zsre_record() -> dict:
    return {
        "case_id": 0,
        "requested_rewrite": {"prompt": "{} is the capital of", "subject": "Berlin",
                              "target_new": {"str": "Japanese"}, "target_true": {"str": "Germany"}},
        "paraphrase_prompts": ["Berlin is a capital city in"],
        # the target is the exact text after the prompt (dsets/zsre.py writes " " + loc_ans)
        "neighborhood_prompts": [{"prompt": "nq question: who founded microsoft?", "target": " Paris France"}],
    }


def test_zsre_token_accuracy_on_a_hand_checked_example():
    tok = make_tokenizer()
    new = tok(" Japanese", add_special_tokens=False)["input_ids"]
    bill = tok(" Paris France", add_special_tokens=False)["input_ids"]
    assert len(new) >= 2 and len(bill) >= 2 and 0 not in new + bill and len(set(bill)) == len(bill)
    rewrite_last = prompt_ids(tok, "Berlin is the capital of")[-1]
    question_last = prompt_ids(tok, "nq question: who founded microsoft?")[-1]
    # rewrite: the first target token is predicted, the next ones are not;
    # paraphrase: nothing; neighbourhood: every token of the answer
    table = {rewrite_last: new[0], question_last: bill[0], **{a: b for a, b in zip(bill, bill[1:])}}
    model = LookupLM(len(tok), table)
    got = compute_rewrite_quality_zsre(model, tok, zsre_record())
    assert got == {
        "rewrite_prompts_correct": [True] + [False] * (len(new) - 1),
        "paraphrase_prompts_correct": [False] * len(new),
        "neighborhood_prompts_correct": [True] * len(bill),
    }


def test_zsre_runs_with_its_own_metrics(tmp_path):
    paths = load_paths()
    if paths.find_data_file("zsre_mem_eval.json") is None:
        pytest.skip("zsre_mem_eval.json is not in DATA_DIR or ../shared/data/dsets")
    ds = resolve_edit_dataset("zsre", paths, "tiny", allow_download=False)
    assert ds.kind == "zsre" and isinstance(ds.records[0]["neighborhood_prompts"][0], dict)
    world = TinyWorld(tmp_path, "gpt2")
    hp = world.write_hparams("MEMIT", rank_one_hparams("gpt2", 4, layers=[1, 2], mom2_update_weight=100.0,
                                                       context_template_length_params=[[10, 5]], v_num_grad_steps=5))
    args = world.cli_args("MEMIT", hp, ds_name="zsre", data_dir=str(tmp_path / "nothing"), protocol="sequential",
                          num_edits=2, edit_times=2, dataset_size_limit=8, num_threads=1)
    run_dir = main(args)
    meta = json.loads((run_dir / "run.json").read_text())
    assert meta["dataset_kind"] == "zsre"
    record = json.loads((run_dir / "evaluation_after_edit_2.json").read_text())["records"][0]
    post = record["post"]
    assert set(post) == {"rewrite_prompts_correct", "paraphrase_prompts_correct", "neighborhood_prompts_correct",
                         "neighborhood_prompts_unchanged", "neighborhood_prompts_unchanged_tokens"}
    assert all(isinstance(v, bool) for v in post["rewrite_prompts_correct"])
    # ROME's zsRE: the watched records' true answer is target_new (target_true is a placeholder) ...
    assert meta["watched_answer"] == "target_new"
    # ... and there is nothing to roll an edit back to: the roll-back protocol refuses it before any model work
    rollback = world.cli_args("MEMIT", hp, ds_name="zsre", data_dir=str(tmp_path / "nothing"), edit_times=2,
                              dataset_size_limit=8, dir_name="zsre_rollback")
    assert cli(rollback) == 2 and not (world.results_dir / "zsre_rollback").exists()


def test_locality_is_unchanged_after_a_no_op_and_drops_when_a_neighbour_is_flipped(tmp_path):
    world = TinyWorld(tmp_path, "llama")
    model, tok = make_model("llama"), make_tokenizer()
    record = tiny_records()[0]  # its neighbourhood prompt: "The mother tongue of Danielle Darrieux is"
    pairs = metrics_for("counterfact").neighborhood_pairs(record)
    before = argmax_answers(model, tok, pairs)
    same = unchanged(before, argmax_answers(model, tok, pairs))
    assert same == {"neighborhood_prompts_unchanged": [True], "neighborhood_prompts_unchanged_tokens": [1.0]}

    hp = ROMEHyperParams.from_json(world.write_hparams("ROME", rank_one_hparams("llama", 4)))
    resources = EditResources(load_paths(stats_dir=str(world.stats_dir)), "tiny-llama", progress=False)
    first = tok.decode(before[0][:1])
    target = "Rome" if first.strip() != "Rome" else "Tokyo"
    flip = {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux",
            "target_new": {"str": target}, "target_true": {"str": "French"}}
    apply_rome_to_model(model, tok, [flip], hp, resources=resources)
    after = unchanged(before, argmax_answers(model, tok, pairs))
    assert after["neighborhood_prompts_unchanged"] == [False] and after["neighborhood_prompts_unchanged_tokens"][0] < 1.0
