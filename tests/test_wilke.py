"""WilKE on tiny models: argmin choice, reuse of the scanned update, pinned roll-back, protocol files."""
import json

import pytest
import torch

from editing.resources import EditResources
from util import nethook
from util.globals import load_paths
from util.tiny_models import EIFFEL_REQUEST, TinyWorld, make_model, make_tokenizer, rank_one_hparams
from wilke import WilKEHyperParams, apply_wilke_to_model
from wilke.wilke_main import layer_adaptability, scan_layers

# ROME's running example with a space before each target, as CounterFact spells them
REQUEST = {**EIFFEL_REQUEST, "case_id": 7, "target_new": {"str": " Rome"}, "target_true": {"str": " Paris"}}


def hparams(arch="llama", n_layer=4, **kw):
    base = rank_one_hparams(arch, n_layer, mom2_adjustment=False)
    return WilKEHyperParams.from_dict({**base, "scanning_ceiling": 3, **kw})


def down_proj_weights(model, n=4):
    return [nethook.get_parameter(model, f"model.layers.{l}.mlp.down_proj.weight").detach().clone() for l in range(n)]


def test_chosen_layer_is_the_argmin_of_recorded_la():
    model, tok = make_model("llama"), make_tokenizer()
    _, _, result = apply_wilke_to_model(model, tok, [REQUEST], hparams(), resources=EditResources(load_paths(), "t"))
    edit = result.edits[0]
    assert set(edit.layer_adaptability) == {0, 1, 2}
    assert edit.layer == min(edit.layer_adaptability, key=edit.layer_adaptability.get)
    assert edit.update_norm / edit.weight_norm == pytest.approx(edit.layer_adaptability[edit.layer], rel=1e-6)


def test_applied_update_is_the_scanned_update_of_the_chosen_layer():
    model, tok = make_model("llama"), make_tokenizer()
    res = EditResources(load_paths(), "t")
    hp = hparams()
    scanned = scan_layers(model, tok, REQUEST, hp, hp.candidate_layers, res)
    la = {l: layer_adaptability(model, u) for l, u in scanned.items()}
    best = min(la, key=la.get)
    before = down_proj_weights(model)
    apply_wilke_to_model(model, tok, [REQUEST], hp, resources=res)
    after = down_proj_weights(model)
    applied = after[best] - before[best]
    expected = scanned[best].delta_out_in()
    assert float((applied - expected).norm() / expected.norm()) < 1e-5
    for l in range(4):
        if l != best:
            assert torch.equal(after[l], before[l])


def test_rollback_with_edited_layer_edits_that_layer_only():
    model, tok = make_model("llama"), make_tokenizer()
    before = down_proj_weights(model)
    _, orig, result = apply_wilke_to_model(
        model, tok, [REQUEST], hparams(), edited_layer=3, return_orig_weights=True, resources=EditResources(load_paths(), "t")
    )
    after = down_proj_weights(model)
    assert [l for l in range(4) if not torch.equal(before[l], after[l])] == [3]
    assert result.edits[0].layer == 3 and result.edits[0].scan == "pinned" and result.edits[0].layer_adaptability == {}
    assert list(orig) == ["model.layers.3.mlp.down_proj.weight"]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_fast_mode_matches_reference_mode(arch):
    """Same layer and the same update (relative difference < 1e-4) as the paper's procedure."""
    tok = make_tokenizer()
    results = {}
    for impl in ("reference", "fast"):
        model = make_model(arch)
        w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
        _, _, res = apply_wilke_to_model(model, tok, [REQUEST], hparams(arch, implementation=impl), resources=EditResources(load_paths(), "t"))
        deltas = {n: p.detach() - w0[n] for n, p in model.named_parameters() if not torch.equal(p, w0[n])}
        results[impl] = (res.edits[0], deltas)
    (ref, d_ref), (fast, d_fast) = results["reference"], results["fast"]
    assert ref.layer == fast.layer
    assert d_ref.keys() == d_fast.keys() and len(d_ref) == 1
    for n in d_ref:
        assert float((d_ref[n] - d_fast[n]).norm() / d_ref[n].norm()) < 1e-4
    for l in ref.layer_adaptability:
        assert ref.layer_adaptability[l] == pytest.approx(fast.layer_adaptability[l], rel=1e-4)


def test_approximate_scan_ranks_all_and_optimises_the_best_few():
    model, tok = make_model("llama"), make_tokenizer()
    hp = hparams(scan="approximate", approx_grad_steps=3, approx_top_k=2)
    _, _, result = apply_wilke_to_model(model, tok, [REQUEST], hp, resources=EditResources(load_paths(), "t"))
    edit = result.edits[0]
    assert edit.scan == "approximate" and set(edit.layer_adaptability) == {0, 1, 2}
    assert edit.layer in edit.layer_adaptability


def test_scanning_ceiling_beyond_the_model_is_refused():
    model, tok = make_model("llama"), make_tokenizer()
    with pytest.raises(ValueError, match="scanning_ceiling"):
        apply_wilke_to_model(model, tok, [REQUEST], hparams(scanning_ceiling=9), resources=EditResources(load_paths(), "t"))


def test_protocol_run_makes_exactly_n_edits_with_retention_at_checkpoints(tmp_path):
    from experiments.evaluate import main

    world = TinyWorld(tmp_path, "llama")
    hp = world.write_hparams("WilKE", {**rank_one_hparams("llama", 4), "scanning_ceiling": 3})
    run_dir = main(world.cli_args("WilKE", hp, dataset_size_limit=10, edit_times=5))
    edits = sorted(run_dir.glob("edit_*_on_case_*.json"), key=lambda p: int(p.name.split("_")[1]))
    assert [int(p.name.split("_")[1]) for p in edits] == [1, 2, 3, 4, 5]
    assert sorted(p.name for p in run_dir.glob("retention_of_edit_*.json")) == [
        "retention_of_edit_1.json", "retention_of_edit_2.json", "retention_of_edit_4.json"
    ]
    meta = json.loads((run_dir / "run.json").read_text())
    assert meta["n_edit_stream"] == 5 and meta["n_orig_retention"] == 5 and meta["seed"] == 9
    first = json.loads(edits[0].read_text())
    la = first["edit"]["layer_adaptability"]
    assert first["edit"]["layer"] == int(min(la, key=la.get))
    assert first["rollback"]["layer"] == first["edit"]["layer"] and first["rollback"]["scan"] == "pinned"
    ret = json.loads((run_dir / "retention_of_edit_4.json").read_text())
    assert ret["edit_retention_len"] == 4 and ret["orig_retention_len"] == 5
    assert 0 <= ret["edit_retention"] <= 4


def test_approximate_choice_read_off_an_exact_scan_equals_the_approximate_scan():
    """One exact scan predicts what every (grad_steps, top_k) approximate scan chooses."""
    from editing.requests import normalise_request
    from experiments.bench.agreement import adaptabilities, approximate_choice, norm_by_pass
    from util.tiny_models import tiny_records
    from wilke.wilke_main import choose_layer

    model, tok = make_model("llama", n_layer=6), make_tokenizer()
    hp = hparams(n_layer=6, scanning_ceiling=5, v_num_grad_steps=6)
    res = EditResources(load_paths(), "t")
    checked = 0
    for record in tiny_records()[:3]:
        request = normalise_request({**record["requested_rewrite"], "case_id": record["case_id"]})
        updates = scan_layers(model, tok, request, hp, hp.candidate_layers, res)
        for u in updates.values():
            by_pass = norm_by_pass(u)
            assert len(by_pass) == u.steps and by_pass[-1] == pytest.approx(u.norm, rel=1e-5)
        la, la_by_pass = adaptabilities(model, updates)
        assert approximate_choice(la_by_pass, la, hp.v_num_grad_steps, 1) == min(la, key=la.get)
        for steps, top_k in [(1, 1), (2, 1), (2, 2), (3, 3)]:
            approx_hp = hp.replace(scan="approximate", approx_grad_steps=steps, approx_top_k=top_k)
            chosen, _ = choose_layer(model, tok, request, approx_hp, res)
            assert chosen.layer == approximate_choice(la_by_pass, la, steps, top_k), (record["case_id"], steps, top_k)
            checked += 1
    assert checked == 12
