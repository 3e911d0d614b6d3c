"""ROME on tiny random GPT-2 (Conv1D), GPT-J and Llama models: the rank-one identity and the flip."""
import json

import pytest
import torch

from editing.context_templates import generate_context_templates
from editing.representations import template_keys
from editing.resources import EditResources
from rome import ROMEHyperParams, apply_rome_to_model, execute_rome
from util import nethook
from util.globals import load_paths
from util.scoring import score_targets
from util.tiny_models import EIFFEL_PROMPT as PROMPT
from util.tiny_models import EIFFEL_REQUEST as REQUEST
from util.tiny_models import TinyWorld, make_model, make_tokenizer, rank_one_hparams

ARCHS = ["gpt2", "gptj", "llama"]


def hparams(arch, **kw):
    return ROMEHyperParams.from_dict(rank_one_hparams(arch, 4, mom2_adjustment=False, **kw))


def resources():
    return EditResources(load_paths(), "tiny")


@pytest.mark.parametrize("arch", ARCHS)
def test_edited_layer_maps_bare_key_to_v_star(arch):
    model, tok = make_model(arch), make_tokenizer()
    update = execute_rome(model, tok, REQUEST, hparams(arch), resources())
    module = nethook.get_module(model, update.module_name)
    before = module(update.key[None])[0].detach()
    apply_rome_to_model(model, tok, [REQUEST], hparams(arch), resources=resources())
    after = module(update.key[None])[0].detach()
    assert not torch.allclose(before, update.v_star, atol=1e-3)
    assert torch.allclose(after, update.v_star, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_edit_makes_target_the_greedy_answer(arch):
    model, tok = make_model(arch), make_tokenizer()
    assert not score_targets(model, tok, [PROMPT], ["Rome"])[0].correct
    _, orig = apply_rome_to_model(model, tok, [REQUEST], hparams(arch), return_orig_weights=True, resources=resources())
    assert score_targets(model, tok, [PROMPT], ["Rome"])[0].correct
    assert list(orig) == [hparams(arch).rewrite_module_tmp.format(1) + ".weight"]


def test_return_orig_weights_and_copy_leave_the_original_intact():
    model, tok = make_model("llama"), make_tokenizer()
    w = nethook.get_parameter(model, "model.layers.1.mlp.down_proj.weight").clone()
    edited, orig = apply_rome_to_model(model, tok, [REQUEST], hparams("llama"), copy=True, return_orig_weights=True, resources=resources())
    assert edited is not model
    assert torch.equal(nethook.get_parameter(model, "model.layers.1.mlp.down_proj.weight"), w)
    assert torch.equal(orig["model.layers.1.mlp.down_proj.weight"], w)


def test_consistent_keys_flag_changes_the_key_used():
    """r-ROME solves with the template-averaged k*, and then W k* = v*."""
    model, tok = make_model("llama"), make_tokenizer()
    res = resources()
    plain = execute_rome(model, tok, REQUEST, hparams("llama"), res)
    consistent = execute_rome(model, tok, REQUEST, hparams("llama", consistent_keys=True), res)
    templates = res.context_templates(model, tok, hparams("llama").template_spec)
    name = plain.module_name
    req = dict(REQUEST, target_new={"str": " Rome"}, target_true={"str": " Paris"})
    k_star = template_keys(model, tok, req, templates, [name], "last")[name]
    bare = template_keys(model, tok, req, ["{}"], [name], "last")[name]
    assert torch.allclose(plain.key, bare, atol=1e-6)
    assert torch.allclose(consistent.key, k_star, atol=1e-6)
    assert not torch.allclose(plain.key, consistent.key, atol=1e-3)
    apply_rome_to_model(model, tok, [REQUEST], hparams("llama", consistent_keys=True), resources=res)
    out = nethook.get_module(model, name)(k_star[None])[0]
    assert torch.allclose(out, consistent.v_star, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_fast_and_reference_implementations_agree(arch):
    model, tok = make_model(arch), make_tokenizer()
    res = resources()
    ref = execute_rome(model, tok, REQUEST, hparams(arch, implementation="reference"), res)
    fast = execute_rome(model, tok, REQUEST, hparams(arch, implementation="fast"), res)
    d_ref, d_fast = ref.delta_out_in(), fast.delta_out_in()
    assert float((d_ref - d_fast).norm() / d_ref.norm()) < 1e-4
    assert ref.steps == fast.steps


def test_context_templates_are_seeded():
    model, tok = make_model("llama"), make_tokenizer()
    a = generate_context_templates(model, tok, [[5, 3]], seed=1)
    b = generate_context_templates(model, tok, [[5, 3]], seed=1)
    c = generate_context_templates(model, tok, [[5, 3]], seed=2)
    assert a == b and a != c
    assert a[0] == "{}" and all(t.endswith(". {}") for t in a[1:]) and len(a) == 4


def test_mom2_adjustment_uses_the_covariance(tmp_path):
    """u = C^{-1} k* / ||.||: check against a direct solve with the collected statistics."""
    world = TinyWorld(tmp_path, "gpt2")
    hp = ROMEHyperParams.from_json(world.write_hparams("ROME", rank_one_hparams("gpt2", 4)))
    model, tok = make_model("gpt2"), make_tokenizer()
    res = EditResources(load_paths(stats_dir=str(world.stats_dir)), "tiny-gpt2")
    update = execute_rome(model, tok, REQUEST, hp, res)
    name = update.module_name
    cov = res.covariances(model, tok, hp, [name], keep_matrix=True)[name].matrix
    req = dict(REQUEST, target_new={"str": " Rome"}, target_true={"str": " Paris"})
    k_star = template_keys(model, tok, req, res.context_templates(model, tok, hp.template_spec), [name], "last")[name]
    u = torch.linalg.solve(cov, k_star.double()).float()
    assert torch.allclose(update.u, u / u.norm(), atol=1e-5)
    assert any(world.stats_dir.rglob("*.npz"))


def test_evaluate_cli_writes_valid_per_edit_json(tmp_path):
    from experiments.evaluate import main

    world = TinyWorld(tmp_path, "gpt2")
    hp = world.write_hparams("ROME", rank_one_hparams("gpt2", 4))
    run_dir = main(world.cli_args("ROME", hp, dataset_size_limit=6, edit_times=2))
    edits = sorted(run_dir.glob("edit_*_on_case_*.json"))
    assert len(edits) == 2
    record = json.loads(edits[0].read_text())
    post = record["post"]
    for kind in ("rewrite", "paraphrase", "neighborhood"):
        assert len(post[f"{kind}_prompts_probs"]) == len(post[f"{kind}_prompts_correct"]) >= 1
        assert all(set(p) == {"target_new", "target_true"} for p in post[f"{kind}_prompts_probs"])
    assert record["edit"]["layer"] == 1 and record["edit"]["update_norm"] > 0
    assert record["rollback"]["update_norm"] > 0
    meta = json.loads((run_dir / "run.json").read_text())
    assert meta["seed"] == 9 and meta["alg_name"] == "ROME" and meta["packages"]["torch"]
    assert json.loads((run_dir / "params.json").read_text())["layers"] == [1]


def test_covariance_solve_is_exact_when_positive_definite_and_regularised_when_singular(caplog):
    from editing.covariance import FactorisedCovariance

    g = torch.Generator().manual_seed(0)
    keys = torch.randn(200, 8, generator=g, dtype=torch.float64)
    c = keys.T @ keys / 200
    k = torch.randn(8, generator=g, dtype=torch.float64)
    assert torch.allclose(c @ FactorisedCovariance(c).solve(k), k, atol=1e-10)

    low_rank = keys[:3].T @ keys[:3]  # rank 3 of 8: no Cholesky factor without jitter
    with caplog.at_level("WARNING"):
        cov = FactorisedCovariance(low_rank, name="covariance of layer.x")
    assert "covariance of layer.x is not positive definite" in caplog.text
    u = cov.solve(low_rank[:, 0])
    assert torch.isfinite(u).all()
    assert torch.allclose(low_rank @ u, low_rank[:, 0], atol=1e-4 * float(low_rank.norm()))

    with pytest.raises(ValueError, match="layer.y is singular"):
        FactorisedCovariance(-torch.eye(4, dtype=torch.float64), name="covariance of layer.y")
    with pytest.raises(ValueError, match="NaN"):
        FactorisedCovariance(torch.full((4, 4), float("nan")), name="covariance of layer.z")


def test_a_kept_matrix_is_factorised_only_when_something_solves_with_it():
    from editing.covariance import FactorisedCovariance

    unfactorisable = -torch.eye(4, dtype=torch.float64)
    cov = FactorisedCovariance(unfactorisable, keep_matrix=True, name="covariance of layer.w")  # MEMIT's use: fine
    assert cov.nbytes == unfactorisable.numel() * 8  # the matrix only, no factor yet
    with pytest.raises(ValueError, match="layer.w is singular"):
        cov.solve(torch.ones(4, dtype=torch.float64))

    c = torch.eye(4, dtype=torch.float64) * 2
    kept = FactorisedCovariance(c, keep_matrix=True)
    assert torch.allclose(kept.solve(torch.ones(4, dtype=torch.float64)), torch.full((4,), 0.5, dtype=torch.float64))
    assert kept.nbytes == 2 * c.numel() * 8


def test_layer_sweep_collects_every_layers_statistics_in_one_pass_and_restores_the_model(tmp_path, monkeypatch):
    from editing import resources as resources_module
    from experiments.sweeps import layer_sweep
    from util.tiny_models import tiny_records

    world = TinyWorld(tmp_path, "gpt2")
    hp = ROMEHyperParams.from_json(world.write_hparams("ROME", rank_one_hparams("gpt2", 4)))
    model, tok = make_model("gpt2"), make_tokenizer()
    before = {n: w.clone() for n, w in model.named_parameters()}
    passes = []
    counting = lambda model, tok, names, **kw: passes.append(list(names)) or real(model, tok, names, **kw)  # noqa: E731
    real = resources_module.layer_stats
    monkeypatch.setattr(resources_module, "layer_stats", counting)
    res = EditResources(load_paths(stats_dir=str(world.stats_dir)), "tiny-gpt2")
    table = layer_sweep.sweep(model, tok, tiny_records()[:2], hp, [1, 2], res)
    assert passes == [[hp.rewrite_module_tmp.format(1), hp.rewrite_module_tmp.format(2)]]
    assert sorted(table) == [1, 2] and all(row["n"] == 2 and row["LA"] > 0 for row in table.values())
    assert all(torch.equal(w, before[n]) for n, w in model.named_parameters())
