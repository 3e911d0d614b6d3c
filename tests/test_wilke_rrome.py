"""WilKE's layer choice over r-ROME (``consistent_keys: true``): in the fast and the reference scan, the
argmin-LA layer is chosen among r-ROME updates and its r-ROME update is applied (and rolled back);
the shipped WilKE files stay the paper's algorithm (ROME's bare-prompt key)."""
from __future__ import annotations

import json

import pytest
import torch

from editing.representations import keys_and_values, template_keys, template_prompts
from editing.requests import normalise_request, swapped_request
from editing.resources import EditResources
from rome.rome_main import execute_rome
from util import nethook
from util.architectures import weight_out_in
from util.globals import REPO_ROOT, load_paths
from util.tiny_models import EIFFEL_REQUEST, make_model, make_tokenizer, rank_one_hparams
from wilke import WilKEHyperParams, apply_wilke_to_model
from wilke.editor import WilKEEditor

# ROME's running example with a space before each target, as CounterFact spells them
REQUEST = {**EIFFEL_REQUEST, "case_id": 7, "target_new": {"str": " Rome"}, "target_true": {"str": " Paris"}}


def hparams(arch: str = "llama", **kw) -> WilKEHyperParams:
    base = rank_one_hparams(arch, 4, mom2_adjustment=False)
    return WilKEHyperParams.from_dict({**base, "scanning_ceiling": 3, "consistent_keys": True, **kw})


def resources() -> EditResources:
    return EditResources(load_paths(), "t", progress=False)


def out_in(model, layer: int) -> torch.Tensor:
    return weight_out_in(nethook.get_module(model, f"model.layers.{layer}.mlp.down_proj")).detach().clone()


@pytest.mark.parametrize("implementation", ["fast", "reference"])
def test_consistent_keys_choose_the_argmin_among_rrome_updates_and_apply_that_update(implementation):
    model, tok = make_model("llama"), make_tokenizer()
    hp, res = hparams(implementation=implementation), resources()
    request = normalise_request(REQUEST)
    # every candidate's r-ROME update, computed one layer at a time as ROME with consistent_keys would
    expected = {l: execute_rome(model, tok, request, hp.replace(layers=[l]), res, layer=l) for l in hp.candidate_layers}
    la = {l: u.norm / float(out_in(model, l).norm()) for l, u in expected.items()}
    best = min(la, key=la.get)
    templates = template_prompts(request, res.context_templates(model, tok, hp.template_spec))
    name = hp.rewrite_module_tmp.format(best)
    k_star = template_keys(model, tok, request, res.context_templates(model, tok, hp.template_spec), [name], hp.fact_token)[name]
    before = [out_in(model, l) for l in range(4)]

    _, _, result = apply_wilke_to_model(model, tok, [REQUEST], hp, resources=res)
    edit = result.edits[0]
    assert edit.layer == best and edit.layer == min(edit.layer_adaptability, key=edit.layer_adaptability.get)
    assert edit.rule == "r-ROME" and edit.scan == "exact"
    assert all(edit.layer_adaptability[l] == pytest.approx(la[l], rel=1e-4) for l in la)
    applied = out_in(model, best) - before[best]
    assert float((applied - expected[best].delta_out_in()).norm() / applied.norm()) < 1e-4
    assert all(torch.equal(out_in(model, l), before[l]) for l in range(4) if l != best)
    # r-ROME's solve key is the template-averaged k*: after the edit, W k* (+ bias) = v*
    assert torch.allclose(expected[best].key, k_star, rtol=1e-5, atol=1e-6)
    mean_key, mean_value = keys_and_values(model, tok, request, templates, [name], hp.fact_token)
    assert torch.allclose(mean_value[name], expected[best].v_star, rtol=1e-3, atol=1e-4)
    assert torch.allclose(mean_key[name], k_star, rtol=1e-5, atol=1e-6)  # keys below the edit do not move


def test_consistent_keys_change_the_solve_key_from_the_bare_prompt_to_k_star():
    """ROME (the shipped WilKE files): (W + Delta) k = v* for the bare prompt's key; r-ROME: for k*."""
    model, tok, res = make_model("llama"), make_tokenizer(), resources()
    request = normalise_request(REQUEST)
    layer, name = 1, "model.layers.1.mlp.down_proj"
    bare_key = keys_and_values(model, tok, request, [request["prompt"]], [name], "last")[0][name]
    templates = res.context_templates(model, tok, hparams().template_spec)
    k_star = template_keys(model, tok, request, templates, [name], "last")[name]
    assert not torch.allclose(bare_key, k_star)
    for consistent, key in ((False, bare_key), (True, k_star)):
        hp = hparams(consistent_keys=consistent).replace(layers=[layer])
        update = execute_rome(model, tok, request, hp, res, layer=layer)
        assert torch.allclose(update.key, key, rtol=1e-5, atol=1e-6)
        edited = out_in(model, layer) + update.delta_out_in()  # the Llama MLP has no bias: value = W key
        other = bare_key if consistent else k_star
        hit, miss = (float((edited @ k - update.v_star).norm()) for k in (key, other))
        assert hit < 1e-5 * float(update.v_star.norm()) and miss > 1e3 * hit, (consistent, hit, miss)


def test_fast_and_reference_rrome_scans_agree():
    tok = make_tokenizer()
    deltas, layers = {}, {}
    for implementation in ("reference", "fast"):
        model = make_model("gpt2")
        w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
        hp = hparams("gpt2", implementation=implementation)
        _, _, result = apply_wilke_to_model(model, tok, [REQUEST], hp, resources=resources())
        layers[implementation] = result.edits[0].layer
        deltas[implementation] = {n: p.detach() - w0[n] for n, p in model.named_parameters()
                                  if not torch.equal(p, w0[n])}
    assert layers["fast"] == layers["reference"] and deltas["fast"].keys() == deltas["reference"].keys()
    for n, d in deltas["reference"].items():
        assert float((deltas["fast"][n] - d).norm() / d.norm()) < 1e-4


def test_rollback_is_the_rrome_update_of_the_swapped_request_at_the_chosen_layer():
    model, tok, res = make_model("llama"), make_tokenizer(), resources()
    hp = hparams()
    editor = WilKEEditor(model, tok, hp, res)
    outcome = editor.edit([REQUEST])
    layer = outcome.details["layer"]
    before = out_in(model, layer)
    swapped = swapped_request(normalise_request(REQUEST))
    expected = execute_rome(model, tok, swapped, hp.replace(layers=[layer]), res, layer=layer)
    editor.rollback([REQUEST], outcome)
    applied = out_in(model, layer) - before
    assert float((applied - expected.delta_out_in()).norm() / applied.norm()) < 1e-4


@pytest.mark.parametrize("model_name", ["smollm2-135m", "gemma-3-270m"])
def test_rrome_files_are_the_shipped_files_with_consistent_keys(model_name):
    folder = REPO_ROOT / "hparams" / "WilKE"
    shipped = json.loads((folder / f"{model_name}.json").read_text())
    rrome = json.loads((folder / f"{model_name}_rrome.json").read_text())
    assert rrome == {**shipped, "consistent_keys": True}
    assert WilKEHyperParams.from_dict(rrome).consistent_keys


def test_shipped_wilke_files_are_the_papers_algorithm():
    for path in sorted((REPO_ROOT / "hparams" / "WilKE").glob("*.json")):
        hp = WilKEHyperParams.from_json(path)
        assert hp.consistent_keys == path.stem.endswith("_rrome"), path.name
        assert hp.scan == ("approximate" if path.stem.endswith("_approx") else "exact"), path.name
        assert hp.implementation == "fast", path.name
