"""MEMIT on tiny random GPT-2 (Conv1D), GPT-J and Llama models: batch edits, the least-squares
update at each layer, purity of execute_memit, the z cache and the evaluate CLI."""
import json

import pytest
import torch

from editing.requests import normalise_request
from editing.resources import EditResources
from memit import MEMITHyperParams, apply_memit_to_model, execute_memit
from memit.compute_ks import template_groups
from memit.memit_main import add_delta, current_zs
from util import nethook
from util.architectures import update_to_weight_shape
from util.globals import load_paths
from util.hparams import HParamsError
from util.scoring import score_targets
from util.tiny_models import TinyWorld, make_model, make_tokenizer, rank_one_hparams, tiny_records

# Records whose target_new is a single token of the tiny tokenizer: with fact_token 'last' the
# delta sits where the first target token is predicted (two of them share one prompt).
SINGLE_TOKEN_RECORDS = (0, 1, 6, 7)



def memit_dict(arch: str, **kw) -> dict:
    base = dict(layers=[1, 2], mom2_update_weight=100.0, context_template_length_params=[[10, 5]])
    return rank_one_hparams(arch, 4, **{**base, **kw})


def setup(tmp_path, arch: str, **kw):
    world = TinyWorld(tmp_path, arch)
    hp = MEMITHyperParams.from_json(world.write_hparams("MEMIT", memit_dict(arch, **kw)))
    res = EditResources(load_paths(stats_dir=str(world.stats_dir)), f"tiny-{arch}", progress=False)
    return hp, res


def requests() -> list[dict]:
    records = tiny_records()
    return [dict(records[i]["requested_rewrite"], case_id=records[i]["case_id"]) for i in SINGLE_TOKEN_RECORDS]


def greedy_new(model, tok, reqs) -> list[bool]:
    prompts = [r["prompt"].format(r["subject"]) for r in reqs]
    return [s.correct for s in score_targets(model, tok, prompts, [r["target_new"]["str"] for r in reqs])]


@pytest.mark.parametrize("arch", ["gpt2", "gptj", "llama"])
def test_batch_of_four_edits_makes_every_target_the_greedy_answer(tmp_path, arch):
    hp, res = setup(tmp_path, arch)
    model, tok = make_model(arch), make_tokenizer()
    reqs = requests()
    assert not any(greedy_new(model, tok, reqs))
    _, orig = apply_memit_to_model(model, tok, reqs, hp, return_orig_weights=True, resources=res)
    assert all(greedy_new(model, tok, reqs))
    assert sorted(orig) == sorted(f"{hp.rewrite_module_tmp.format(l)}.weight" for l in hp.layers)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_each_layer_solves_its_regularised_least_squares_problem(tmp_path, arch):
    """Delta (lambda C + K K^T) = R K^T at every layer, and execute_memit leaves the model unchanged."""
    hp, res = setup(tmp_path, arch, mom2_update_weight=3.0)
    model, tok = make_model(arch), make_tokenizer()
    before = {n: p.clone() for n, p in model.named_parameters()}
    update = execute_memit(model, tok, requests(), hp, res)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert [d.layer for d in update.deltas.values()] == list(hp.layers)
    names = [d.module_name for d in update.deltas.values()]
    covs = res.covariances(model, tok, hp, names, keep_matrix=True)
    for delta in update.deltas.values():
        k, r, c = delta.keys, delta.resid, covs[delta.module_name].matrix
        assert k.dtype == r.dtype == torch.float64 and k.shape[1] == r.shape[1] == 4
        lhs = delta.delta_out_in() @ (hp.mom2_update_weight * c + k @ k.T)
        rhs = r @ k.T
        assert float((lhs - rhs).norm() / rhs.norm()) < 1e-9


def test_later_layers_see_earlier_updates(tmp_path):
    """Layer 2's residual is (z - block output after layer 1's update), undivided as the last layer."""
    hp, res = setup(tmp_path, "llama")
    model, tok = make_model("llama"), make_tokenizer()
    reqs = requests()
    update = execute_memit(model, tok, reqs, hp, res)
    first, last = update.deltas.values()
    assert torch.allclose(first.resid * 2, (update.zs - current_zs(model, tok, [normalise_request(r) for r in reqs], "model.layers.2", "last")).double(), atol=1e-4)
    add_delta(model, first)
    gap = update.zs - current_zs(model, tok, [normalise_request(r) for r in reqs], "model.layers.2", "last")
    assert torch.allclose(last.resid, gap.double(), atol=1e-4)


def test_apply_adds_exactly_the_deltas_and_copy_keeps_the_original(tmp_path):
    hp, res = setup(tmp_path, "gpt2")
    model, tok = make_model("gpt2"), make_tokenizer()
    update = execute_memit(model, tok, requests(), hp, res)
    edited, orig = apply_memit_to_model(model, tok, requests(), hp, copy=True, return_orig_weights=True, resources=res)
    assert edited is not model
    for name, delta in update.deltas.items():
        module = nethook.get_module(edited, delta.module_name)
        expected = orig[name] + update_to_weight_shape(delta.delta_out_in().float(), module)
        assert torch.allclose(nethook.get_parameter(edited, name), expected, atol=1e-6)
        assert torch.equal(nethook.get_parameter(model, name), orig[name])


def test_z_cache_is_written_and_reused(tmp_path):
    hp, res = setup(tmp_path, "llama", mom2_adjustment=False)
    model, tok = make_model("llama"), make_tokenizer()
    template = str(tmp_path / "cache" / "memit_z_{layer}_{clamp_norm_factor}_{case_id}.npz")
    first = execute_memit(model, tok, requests()[:2], hp, res, cache_template=template)
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 2 and all(s > 0 for s in first.z_steps)
    again = execute_memit(model, tok, requests()[:2], hp, res, cache_template=template)
    assert again.z_steps == [0, 0] and torch.allclose(again.zs, first.zs)
    for name, delta in first.deltas.items():
        assert torch.allclose(again.deltas[name].delta_out_in(), delta.delta_out_in())


def test_template_groups_follow_the_length_params():
    templates = ["{}", "a. {}", "b. {}", "c. {}"]
    assert template_groups(templates, [[10, 2], [5, 1]]) == [["{}"], ["a. {}", "b. {}"], ["c. {}"]]
    with pytest.raises(ValueError, match="do not match"):
        template_groups(templates, [[10, 2]])


def test_hparams_validation():
    good = memit_dict("gpt2")
    assert MEMITHyperParams.from_dict(good).z_layer == 2
    with pytest.raises(HParamsError, match="'layers'"):
        MEMITHyperParams.from_dict({**good, "layers": [2, 1]})
    with pytest.raises(HParamsError, match="'v_loss_layer'"):
        MEMITHyperParams.from_dict({**good, "layers": [1, 2], "v_loss_layer": 1})
    with pytest.raises(HParamsError, match="'mom2_update_weight'"):
        MEMITHyperParams.from_dict({k: v for k, v in good.items() if k != "mom2_update_weight"})


def test_evaluate_cli_two_edits_with_rollback(tmp_path):
    from experiments.evaluate import main

    world = TinyWorld(tmp_path, "gpt2")
    hp = world.write_hparams("MEMIT", memit_dict("gpt2"))
    run_dir = main(world.cli_args("MEMIT", hp, dataset_size_limit=6, edit_times=2))
    edits = sorted(run_dir.glob("edit_*_on_case_*.json"))
    assert len(edits) == 2
    for path in edits:
        record = json.loads(path.read_text())
        assert record["edit"]["layers"] == [1, 2] and record["edit"]["update_norm"] > 0
        assert set(record["edit"]["layer_update_norms"]) == {"1", "2"}
        assert record["rollback"]["update_norm"] > 0
        assert len(record["post"]["rewrite_prompts_correct"]) == 1
    retention = json.loads((run_dir / "retention_of_edit_2.json").read_text())
    assert retention["edit_retention_len"] == 2
    assert json.loads((run_dir / "run.json").read_text())["alg_name"] == "MEMIT"


def test_memit_samples_its_own_context_templates_after_five_prompts(tmp_path):
    """MEMIT's code: one 10-token continuation after each of "The", "Therefore", "Because", "I", "You",
    the prompt kept in the text; ROME's start from the start token. Seeded, so runs repeat."""
    from editing.context_templates import MEMIT_PROMPTS

    hp, res = setup(tmp_path, "gpt2")
    model, tok = make_model("gpt2"), make_tokenizer()
    templates = res.context_templates(model, tok, hp.template_spec)
    groups = template_groups(templates, hp.context_template_length_params, hp.context_template_prompts)
    assert groups[0] == ["{}"] and len(groups) == 2 and len(groups[1]) == 5
    for prompt, template in zip(MEMIT_PROMPTS, groups[1]):
        text = template[: -len(". {}")]
        assert template.endswith(". {}") and text.startswith(prompt)
    again = EditResources(load_paths(stats_dir=str(tmp_path)), "other", progress=False)
    assert again.context_templates(model, tok, hp.template_spec) == templates
    rome_style = res.context_templates(model, tok, hp.replace(context_template_prompts=None).template_spec)
    assert rome_style != templates and len(rome_style) == 6
