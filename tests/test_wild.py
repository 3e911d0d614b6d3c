"""WILD evaluation: answer scores, stopping, batched generation, and teacher forcing vs WILD."""
from __future__ import annotations

import copy

import pytest
import torch

from dsets.zsre import neighborhood_pairs as zsre_neighborhood_pairs
from experiments.py.eval_utils_counterfact import compute_rewrite_quality_counterfact
from experiments.py.eval_utils_zsre import compute_rewrite_quality_zsre
from experiments.py.portability import compute_portability_quality, portability_pairs
from experiments.py.wild import (
    TEMPLATES,
    WildSettings,
    exact_match,
    neighborhood_questions,
    normalize_answer,
    starts_with,
    token_f1,
    unedited_wild_answers,
    wild_scores,
)
from tests.table_lm import TableLM, continuation_table
from util.generation import STOP_CAP, STOP_EOS, STOP_STRING, answer_text, greedy_generate, stop_rule
from util.tiny_models import EIFFEL_PROMPT, make_model, make_tokenizer

TOK = make_tokenizer()


def ids(text: str) -> list[int]:
    return TOK(text, add_special_tokens=False)["input_ids"]


# --- answer scores --------------------------------------------------------------------------------


@pytest.mark.parametrize("text,expected", [
    ("The Eiffel Tower!", "eiffel tower"),
    ("  An   apple. ", "apple"),
    ("Theater", "theater"),  # an article only as a whole word
    ("U.S.A.", "usa"),
    ("a\tb\n c", "b c"),
])
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_exact_lenient_and_f1_by_hand():
    assert exact_match(" Paris.", "paris") and exact_match("the Paris", "Paris")
    assert not exact_match("Paris, France", "Paris")
    assert starts_with("Paris, France", "Paris") and starts_with("The New York Times", "new york")
    assert not starts_with("Parisian food", "Paris")  # words, not characters
    assert not starts_with("France, Paris", "Paris")
    assert token_f1("Paris France", "Paris") == pytest.approx(2 * 0.5 * 1 / 1.5)
    assert token_f1("Rome Rome", "Rome") == pytest.approx(2 * 0.5 * 1 / 1.5)  # overlap counts once
    assert token_f1("Paris", "paris.") == 1.0 and token_f1("Rome", "Paris") == 0.0
    assert token_f1("", "") == 1.0 and token_f1("the", "Paris") == 0.0


# --- stopping -------------------------------------------------------------------------------------


def test_stop_rule_by_hand():
    rule = stop_rule(make_model("gpt2"), TOK, max_new_tokens=12)
    paris = ids(" Paris")
    assert rule.reason(TOK, paris) is None
    assert rule.reason(TOK, paris + ids(".")) == STOP_STRING
    assert rule.reason(TOK, paris + ids("\n")) == STOP_STRING
    assert rule.reason(TOK, paris + [TOK.eos_token_id]) == STOP_EOS
    assert rule.reason(TOK, ids("3.")) == STOP_STRING  # Mirage's "." also ends "3.5" at "3."
    long = ids(" Paris Rome Berlin Madrid London Tokyo Spain Italy")
    assert len(long) > 12 and rule.reason(TOK, long[:12]) == STOP_CAP and rule.reason(TOK, long[:11]) is None
    assert answer_text(TOK, paris + ids("."), rule) == " Paris"
    assert answer_text(TOK, paris + [TOK.eos_token_id], rule) == " Paris"
    assert answer_text(TOK, ids(" Paris.\n"), rule) == " Paris."  # one stop string is removed, as Mirage


def scripted_model(script: dict[str, str]) -> TableLM:
    """A model that continues each prompt with its scripted text, token by token, then says EOS."""
    table = {}
    for prompt, text in script.items():
        path = ids(text) + [TOK.eos_token_id]
        table.update(continuation_table(ids(prompt), [{t: 1.0} for t in path], path))
    return TableLM(len(TOK), table, TOK.eos_token_id)


def test_generation_stops_where_the_answer_ends():
    model = scripted_model({
        "A": " Paris. Then more",
        "B": " Paris and Rome\nnext line",
        "C": " Bill Gates",
        "D": " Rome" * 25,
    })
    gens = greedy_generate(model, TOK, ["A", "B", "C", "D"], max_new_tokens=20, batch_size=4)
    assert [g.text for g in gens[:3]] == [" Paris", " Paris and Rome", " Bill Gates"]
    assert [g.stopped_by for g in gens] == [STOP_STRING, STOP_STRING, STOP_EOS, STOP_CAP]
    assert gens[2].token_ids == tuple(ids(" Bill Gates") + [TOK.eos_token_id]) and len(gens[3].token_ids) == 20


# --- batched generation equals one prompt at a time ------------------------------------------------

PROMPTS = [EIFFEL_PROMPT, "Paris", "Toko Yasuda plays the", "The mother tongue of Danielle Darrieux is",
           "Berlin is the capital of Germany. Tokyo is", "Apple A5 was created by", "Rome",
           "The official language of France is French. Microsoft was founded by", "London is in", "Spain"]


def reference_generate(model, prompt: str, max_new_tokens: int, eos: set[int]) -> tuple[int, ...]:
    """Hugging Face generate, one prompt, no cache, greedy, stopped at any of ``eos``."""
    enc = TOK(prompt, return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, use_cache=False,
                         eos_token_id=sorted(eos), pad_token_id=TOK.pad_token_id)
    return tuple(out[0, enc["input_ids"].shape[1]:].tolist())


def chaotic_model(arch: str) -> torch.nn.Module:
    """A tiny model with large random weights: its greedy text varies (small ones repeat one token)."""
    model = make_model(arch, seed=3)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_batched_generation_equals_one_at_a_time(arch):
    model = chaotic_model(arch)
    free = greedy_generate(model, TOK, PROMPTS, max_new_tokens=12, stop_strings=(), batch_size=1)
    # end-of-sequence ids chosen from what the model says, so rows stop at different steps
    eos = {free[0].token_ids[5], free[2].token_ids[1], free[4].token_ids[8], TOK.eos_token_id}
    model.generation_config.eos_token_id = sorted(eos)
    batched = greedy_generate(model, TOK, PROMPTS, max_new_tokens=12, stop_strings=(), batch_size=len(PROMPTS))
    alone = [greedy_generate(model, TOK, [p], max_new_tokens=12, stop_strings=(), batch_size=1)[0] for p in PROMPTS]
    assert batched == alone
    assert len({len(g.token_ids) for g in batched}) >= 3 and {g.stopped_by for g in batched} == {STOP_EOS, STOP_CAP}
    assert [g.token_ids for g in batched] == [reference_generate(model, p, 12, eos) for p in PROMPTS]
    by_string = greedy_generate(model, TOK, PROMPTS, max_new_tokens=12, stop_strings=("e", "s"), batch_size=4)
    assert by_string == [greedy_generate(model, TOK, [p], 12, ("e", "s"), 1)[0] for p in PROMPTS]
    assert STOP_STRING in {g.stopped_by for g in by_string}


# --- teacher forcing versus WILD on a constructed model --------------------------------------------

NEIGHBOUR = "Berlin is the capital of"


def eiffel_record() -> dict:
    return {
        "case_id": 7,
        "requested_rewrite": {"prompt": "{} is located in the city of", "subject": "The Eiffel Tower",
                              "target_new": {"str": "Bill Gates"}, "target_true": {"str": "London"}},
        "paraphrase_prompts": [], "neighborhood_prompts": [NEIGHBOUR], "attribute_prompts": [], "generation_prompts": [],
    }


def content_leak_model() -> TableLM:
    """After the prompt the model prefers " the city." (p=0.5) to " Bill..." (0.3) and " London" (0.2);
    it completes " Bill Gates" only once its first token has been fed in."""
    p, the, bill, london = ids(EIFFEL_PROMPT), ids(" the city."), ids(" Bill Gates"), ids(" London")
    first = {the[0]: 0.5, bill[0]: 0.3, london[0]: 0.2}
    assert len(first) == 3 and len(bill) > 1
    table = {tuple(p): first}
    for path in (the, bill, london):
        table.update({k: v for k, v in continuation_table(p, [first] + [{t: 1.0} for t in path[1:]], path).items() if k != tuple(p)})
    table.update(continuation_table(ids(NEIGHBOUR), [{t: 1.0} for t in ids(" Germany.")], ids(" Germany.")))
    return TableLM(len(TOK), table, TOK.eos_token_id)


def test_teacher_forcing_scores_one_and_wild_zero_on_a_content_leak():
    model, record = content_leak_model(), eiffel_record()
    tf = compute_rewrite_quality_counterfact(model, TOK, record)
    nll = tf["rewrite_prompts_probs"][0]
    assert nll["target_new"] < nll["target_true"]  # ROME's efficacy (teacher forced): 1.0
    assert nll["target_new"] == pytest.approx(-torch.log(torch.tensor(0.3)).item() / len(ids(" Bill Gates")), abs=1e-4)
    wild = wild_scores(model, TOK, record, "counterfact")
    assert wild["wild_answers"]["rewrite_prompts"] == [" the city"]
    assert (wild["wild_rewrite_prompts_exact"], wild["wild_rewrite_prompts_lenient"], wild["wild_rewrite_prompts_f1"]) == ([False], [False], [0.0])
    assert wild["wild_neighborhood_prompts_exact"] == [False]  # " Germany" is not target_true " London"


def test_teacher_forcing_scores_one_and_wild_exact_zero_on_a_length_leak():
    """Every target token is the argmax when the earlier ones are fed in (ES, zsRE accuracy 1.0), but
    the model does not stop after the target: WILD's exact match is 0, its lenient match 1."""
    record = eiffel_record()
    record["requested_rewrite"]["target_new"]["str"] = "Rome"
    model = scripted_model({EIFFEL_PROMPT: " Rome and Paris.", NEIGHBOUR: " London."})
    tf = compute_rewrite_quality_counterfact(model, TOK, record)
    assert tf["rewrite_prompts_correct"] == [True]
    zsre_record = {**record, "neighborhood_prompts": zsre_neighborhood_pairs(NEIGHBOUR, "London", TOK)}
    assert all(compute_rewrite_quality_zsre(model, TOK, zsre_record)["rewrite_prompts_correct"])
    wild = wild_scores(model, TOK, record, "counterfact")
    assert wild["wild_answers"]["rewrite_prompts"] == [" Rome and Paris"]
    assert wild["wild_rewrite_prompts_exact"] == [False] and wild["wild_rewrite_prompts_lenient"] == [True]
    assert wild["wild_rewrite_prompts_f1"] == [pytest.approx(2 * (1 / 3) / (1 / 3 + 1))]
    assert wild["wild_neighborhood_prompts_exact"] == [True]


def test_unchanged_neighbourhood_answers_against_the_unedited_model():
    record = eiffel_record()
    record["neighborhood_prompts"] = [NEIGHBOUR, "Rome"]
    before = scripted_model({NEIGHBOUR: " Germany.", "Rome": " Italy."})
    unedited = unedited_wild_answers(before, TOK, [record], "counterfact", WildSettings())
    assert unedited == {"7": [ids(" Germany.") , ids(" Italy.")]}
    after = scripted_model({NEIGHBOUR: " Germany.", "Rome": " Paris."})
    scores = wild_scores(after, TOK, record, "counterfact", unedited["7"])
    assert scores["wild_neighborhood_prompts_unchanged"] == [True, False]
    with pytest.raises(ValueError, match="2 neighbourhood prompts"):
        wild_scores(after, TOK, record, "counterfact", unedited["7"][:1])


def test_question_template_wraps_every_prompt():
    settings = WildSettings(template="qa_inst")
    wrapped = TEMPLATES["qa_inst"].format(prompt=EIFFEL_PROMPT)
    model = scripted_model({wrapped: " Rome.", TEMPLATES["qa_inst"].format(prompt=NEIGHBOUR): " Germany."})
    record = eiffel_record()
    record["requested_rewrite"]["target_new"]["str"] = "Rome"
    scores = wild_scores(model, TOK, record, "counterfact", settings=settings)
    assert scores["wild_rewrite_prompts_exact"] == [True] and scores["wild_answers"]["neighborhood_prompts"] == [" Germany"]
    assert wild_scores(model, TOK, record, "counterfact")["wild_rewrite_prompts_exact"] == [False]
    with pytest.raises(ValueError, match="template"):
        WildSettings(template="chat")


# --- zsRE and portability --------------------------------------------------------------------------

MEND_PORTABILITY = {"Recalled Relation": "(x, y, z)", "New Question": "Where is Rome?", "New Answer": "Italy"}
KNOWEDIT_PORTABILITY = {"Reasoning": [{"prompt": "Where is Rome?", "ground_truth": "Italy"}],
                        "Subject_Aliasing": [{"prompt": "Where is Roma?", "ground_truth": [["Italy", "IT"]]}]}


def test_portability_pairs_read_both_shapes():
    assert portability_pairs({"portability": MEND_PORTABILITY}) == [("Where is Rome?", "Italy")]
    assert portability_pairs({"portability": KNOWEDIT_PORTABILITY}) == [("Where is Rome?", "Italy"), ("Where is Roma?", "Italy")]
    assert portability_pairs({}) == [] and portability_pairs({"portability": {}}) == []
    with pytest.raises(TypeError, match="case 3: portability.Reasoning"):
        portability_pairs({"case_id": 3, "portability": {"Reasoning": "Italy"}})


def test_zsre_neighbourhood_question_is_whole_again():
    loc = "nq question: who founded microsoft"
    for tok in (TOK, None):
        record = {"neighborhood_prompts": zsre_neighborhood_pairs(loc, "Bill Gates", tok)}
        assert neighborhood_questions(record, "zsre") == [(loc + "?", "Bill Gates")]
    with pytest.raises(KeyError, match="known: counterfact, zsre"):
        neighborhood_questions({}, "mquake")


def test_zsre_record_with_portability_teacher_forced_and_wild():
    loc = "nq question: who founded microsoft"
    record = copy.deepcopy(eiffel_record())
    record["requested_rewrite"]["target_new"]["str"] = "Rome"
    record["neighborhood_prompts"] = zsre_neighborhood_pairs(loc, "Bill Gates", TOK)
    record["portability"] = KNOWEDIT_PORTABILITY
    model = scripted_model({EIFFEL_PROMPT: " Rome.", loc + "?": " Bill Gates.", "Where is Rome?": " Italy.",
                            "Where is Roma?": " Spain."})
    tf = compute_portability_quality(model, TOK, record)
    n_italy = len(ids(" Italy"))
    assert tf["portability_prompts_correct"][:n_italy] == [True] * n_italy
    assert not all(tf["portability_prompts_correct"][n_italy:])
    wild = wild_scores(model, TOK, record, "zsre")
    assert wild["wild_portability_prompts_exact"] == [True, False]
    assert wild["wild_neighborhood_prompts_exact"] == [True] and wild["wild_rewrite_prompts_exact"] == [True]
    assert compute_portability_quality(model, TOK, eiffel_record()) == {}
    assert "wild_portability_prompts_exact" not in wild_scores(model, TOK, eiffel_record(), "counterfact")


def test_bench_counts_what_the_cap_cuts_and_compares_batching():
    from experiments.bench.wild import cut_share, time_batch_sizes, time_wild
    from util.tiny_models import tiny_records

    lengths = [(3, STOP_EOS), (64, STOP_CAP), (10, STOP_STRING), (64, STOP_STRING)]
    assert [cut_share(lengths, c) for c in (64, 10, 3)] == [0.25, 0.5, 0.75]
    timing = time_wild(chaotic_model("llama"), TOK, tiny_records()[:3], WildSettings(max_new_tokens=8))
    assert timing["prompts"] == 9 and timing["same_answers"] == 9 and timing["speedup"] > 0
    sizes = time_batch_sizes(chaotic_model("llama"), TOK, tiny_records()[:3], [1, 4, 9], WildSettings(max_new_tokens=8))
    assert [r["batch_size"] for r in sizes["sizes"]] == [1, 4, 9] and sizes["sizes"][0]["speedup_over_first"] == 1.0
    assert all(r["prompts"] == 9 and r["same_answers_as_first"] == 9 for r in sizes["sizes"])
