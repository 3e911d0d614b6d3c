"""Edits on the real embedded default model (SmolLM2-135M); marked slow.

The statistics for the edited layer are collected on first use into the configured STATS_DIR
(about a minute on 2 CPU cores) and reused afterwards. The shared session model is restored
after every edit so other slow tests see the original weights.
"""
import contextlib

import pytest
import torch

from editing.resources import EditResources
from rome import ROMEHyperParams, apply_rome_to_model
from util.globals import REPO_ROOT, load_paths
from util.scoring import score_targets

pytestmark = pytest.mark.slow

EIFFEL = {
    "case_id": -1,
    "prompt": "{} is located in the city of",
    "subject": "The Eiffel Tower",
    "target_new": {"str": "Rome"},
    "target_true": {"str": "Paris"},
}
EIFFEL_PROMPT = "The Eiffel Tower is located in the city of"


@contextlib.contextmanager
def restored(model, weights):
    try:
        yield
    finally:
        with torch.no_grad():
            params = dict(model.named_parameters())
            for name, w in weights.items():
                params[name].copy_(w)


def unrelated_known_facts(model, tok, n=10):
    from dsets.counterfact import CounterFactDataset
    from dsets.make_known import filter_known

    try:
        records = CounterFactDataset(load_paths(), allow_download=False).records[:300]
    except FileNotFoundError as e:
        pytest.skip(f"CounterFact data not available ({e}); ../shared/data/dsets provides it")
    known = filter_known(model, tok, records)
    unrelated = [
        r for r in known
        if r["requested_rewrite"]["target_true"]["str"].strip() not in ("Paris", "Rome", "France", "Italy")
        and "Eiffel" not in r["requested_rewrite"]["subject"]
    ]
    assert len(unrelated) >= n, f"only {len(unrelated)} known unrelated facts among 300 records"
    return unrelated[:n]


def greedy_ok(model, tok, records):
    prompts = [r["requested_rewrite"]["prompt"].format(r["requested_rewrite"]["subject"]) for r in records]
    return [s.correct for s in score_targets(model, tok, prompts, [r["requested_rewrite"]["target_true"]["str"] for r in records])]


def test_rome_edit_moves_the_eiffel_tower_and_keeps_unrelated_facts(smollm2):
    model, tok = smollm2
    hp = ROMEHyperParams.from_json(REPO_ROOT / "hparams" / "ROME" / "smollm2-135m.json")
    facts = unrelated_known_facts(model, tok)
    assert score_targets(model, tok, [EIFFEL_PROMPT], ["Paris"])[0].correct
    resources = EditResources(load_paths(), "smollm2-135m")
    _, orig = apply_rome_to_model(model, tok, [EIFFEL], hp, return_orig_weights=True, resources=resources)
    with restored(model, orig):
        new_answer = score_targets(model, tok, [EIFFEL_PROMPT], ["Rome"])[0]
        kept = sum(greedy_ok(model, tok, facts))
        print(f"SmolLM2 ROME edit: Rome greedy={new_answer.correct} nll={new_answer.nll:.3f}; unrelated kept {kept}/10")
        assert new_answer.correct
        assert kept >= 8
    assert score_targets(model, tok, [EIFFEL_PROMPT], ["Paris"])[0].correct


ISRAEL = {  # edit 18 of the seed-9 known-both stream: ROME's toxicity flash in both protocols (README)
    "case_id": 17674,
    "prompt": "{}'s capital city is",
    "subject": "Israel",
    "target_new": {"str": "Damascus"},
    "target_true": {"str": "Jerusalem"},
}


def test_r_rome_consistent_keys_remove_the_update_blow_up_rome_makes(smollm2):
    """The subject opens the prompt (no BOS token with SmolLM2), so the bare prompt's key is far from
    the context templates' mean. ROME's update blows up there (norm 446 against 10-40 for ordinary
    edits; the toxicity flash at edit 18 of both protocols in the README) and breaks the subject's
    other prompts; r-ROME's consistent keys give an ordinary update. Neither makes this edit on the
    bare prompt (measured: Damascus's NLL 4.53 unedited, 9.73 ROME, 4.46 r-ROME)."""
    model, tok = smollm2
    resources = EditResources(load_paths(), "smollm2-135m")
    other_prompt = "The capital of Israel is"
    assert score_targets(model, tok, [other_prompt], ["Jerusalem"])[0].correct
    outcome = {}
    for name in ("smollm2-135m.json", "smollm2-135m_rrome.json"):
        hp = ROMEHyperParams.from_json(REPO_ROOT / "hparams" / "ROME" / name)
        _, orig = apply_rome_to_model(model, tok, [ISRAEL], hp, return_orig_weights=True, resources=resources)
        with restored(model, orig):
            (weight_name, w0), = orig.items()
            norm = float((dict(model.named_parameters())[weight_name] - w0).norm())
            outcome[name] = norm, score_targets(model, tok, [other_prompt], ["Jerusalem"])[0].correct
        print(f"SmolLM2 {name} on case 17674: update norm {norm:.1f}, '{other_prompt}' still Jerusalem: {outcome[name][1]}")
    assert outcome["smollm2-135m.json"][0] > 200 and not outcome["smollm2-135m.json"][1]
    assert outcome["smollm2-135m_rrome.json"][0] < 40 and outcome["smollm2-135m_rrome.json"][1]
