"""GRACE on tiny models: the original code's codebook, reproduced; weights untouched; exact logits
outside every radius; roll-back by GRACE's own conflict rule; a killed run resumed with its codebook."""
from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

from baselines.grace import Codebook, GRACEHyperParams, apply_grace_to_model
from baselines.grace.editor import GRACEEditor
from editing.resources import EditResources
from experiments.store.checkpoints import load_editor_state
from tests.memory_helpers import b64_tensor, fixture, killed_and_resumed, request
from util.architectures import ARCHITECTURES, check_hparams_against_model
from util.globals import REPO_ROOT, load_paths
from util.hparams import HParamsError
from util.scoring import prompt_ids, score_targets
from util.tiny_models import TinyWorld, make_model, make_tokenizer

MODULES = {"llama": "model.layers.{}.mlp.down_proj", "gpt2": "transformer.h.{}.mlp.c_fc"}  # c_fc: upstream's GPT2-XL layer


def grace_dict(arch: str = "llama", **overrides) -> dict:
    spec = ARCHITECTURES[arch]
    hp = {"layer": 2, "edit_module_tmp": MODULES[arch], "layer_module_tmp": spec.layer_module_tmp,
          "ln_f_module": spec.ln_f_module, "eps": 0.01, "edit_lr": 1.0, "n_iter": 20}
    return {**hp, **overrides}


def resources(tmp_path) -> EditResources:
    return EditResources(load_paths(data_dir=str(tmp_path), stats_dir=str(tmp_path / "stats")), "tiny", progress=False)


def last_logits(model, tok, prompt: str) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([prompt_ids(tok, prompt)])).logits[0, -1]


@pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() == "AVX512",
                    reason="the goldens were made with AVX2 kernels; on AVX-512 ones the key of the re-edited prompt "
                    "lands 1e-7 from its retired twin instead of at distance 0, and the fifth entry's value, trained "
                    "against that tie at edit_lr 1.0, ends 5.6 away (2026-12-05); the behaviours themselves are the "
                    "other tests of this file")
def test_codebook_after_each_edit_is_the_original_codes(tmp_path):
    """Thartvigsen/GRACE f674183 on the same tiny Llama (tests/fixtures/memory_upstream.md): a new key,
    a same-label key within reach (radius grows), a conflicting label within reach (radii split), a far
    key, and the first prompt again with another label (distance 0: its key retired)."""
    torch.set_num_threads(1)
    gold = fixture("grace_upstream.json")
    torch.manual_seed(0)
    model, tok = make_model("llama", width=32), make_tokenizer()
    hp = GRACEHyperParams.from_dict(grace_dict(val_init="warm", implementation="reference"))
    editor, actions = None, []
    for step in gold["edits"]:
        before = None if editor is None else len(editor.codebook)
        _, orig, editor = apply_grace_to_model(model, tok, [request(step["prompt"], step["target"])], hp,
                                               resources=resources(tmp_path), editor=editor)
        cb = editor.codebook
        assert orig == {} and len(cb) == len(step["keys"]), before
        assert torch.equal(cb.keys, torch.stack([b64_tensor(k) for k in step["keys"]]))
        assert torch.equal(cb.epsilons, torch.tensor(step["epsilons"]))
        torch.testing.assert_close(cb.values, torch.stack([b64_tensor(v) for v in step["values"]]), rtol=0, atol=1e-6)
        actions.append(cb.n_edits)
    assert [len(e["keys"]) for e in gold["edits"]] == [1, 1, 2, 3, 4]
    assert float(editor.codebook.epsilons[0]) == pytest.approx(-1e-5)  # retired at distance 0
    with editor.for_evaluation():
        for probe in gold["probes"]:
            logits = last_logits(model, tok, probe["prompt"])
            assert int(logits.argmax()) == probe["argmax"]
            torch.testing.assert_close(logits, b64_tensor(probe["logits"]), rtol=0, atol=1e-5)
            assert probe["hit_positions"] in ([], [probe["query_position"]])  # upstream replaces there only


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_weights_never_change_and_inputs_outside_every_radius_get_the_unedited_logits(tmp_path, arch):
    torch.set_num_threads(1)
    model, tok = make_model(arch), make_tokenizer()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    edited, unrelated = "The Eiffel Tower is located in the city of", "Apple A5 was created by"
    plain = last_logits(model, tok, unrelated)
    hp = GRACEHyperParams.from_dict(grace_dict(arch, eps=0.005))
    editor = GRACEEditor(model, tok, hp, resources(tmp_path))
    out = editor.edit([request(edited, " Rome")])
    editor.rollback([request(edited, " Tokyo")], out)
    editor.edit([request("Berlin is the capital of", " Japan")])
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    with editor.for_evaluation():
        _hit, _ = editor.codebook.lookup(torch.zeros(1, editor.codebook.keys.shape[1]))
        assert torch.equal(last_logits(model, tok, unrelated), plain)
        assert score_targets(model, tok, ["Berlin is the capital of"], [" Japan"])[0].correct
    assert score_targets(model, tok, ["Berlin is the capital of"], [" Japan"])[0].correct is False  # off outside
    assert torch.equal(last_logits(model, tok, unrelated), plain)


def test_an_edit_takes_and_its_rollback_retires_the_key(tmp_path):
    torch.set_num_threads(1)
    model, tok = make_model("llama"), make_tokenizer()
    prompt = "The Eiffel Tower is located in the city of"
    plain = last_logits(model, tok, prompt)
    editor = GRACEEditor(model, tok, GRACEHyperParams.from_dict(grace_dict(eps=0.005)), resources(tmp_path))
    outcome = editor.edit([request(prompt, " Rome", " Paris")])
    assert outcome.orig_weights == {} and outcome.details["action"] == "added"
    with editor.for_evaluation():
        assert score_targets(model, tok, [prompt], [" Rome"])[0].correct
    back = editor.rollback([request(prompt, " Rome", " Paris")], outcome)
    assert back.details["action"] == "split" and back.details["distance"] == 0.0
    assert editor.codebook.epsilons.tolist() == pytest.approx([-1e-5, 0.0])
    with editor.for_evaluation():  # the retired key answers nothing: the unedited model's logits, exactly
        assert torch.equal(last_logits(model, tok, prompt), plain)
    again = editor.edit([request(prompt, " Rome", " Paris")])  # the retired key has this label: it grows back
    assert (again.details["action"], again.details["key"], again.details["radius"]) == ("expanded", 0, 0.0)
    with editor.for_evaluation():
        assert score_targets(model, tok, [prompt], [" Rome"])[0].correct and len(editor.codebook) == 2


def test_memory_grows_by_one_key_value_and_radius_per_new_key(tmp_path):
    """Bytes per new key: 4 (d_in + d_out + 1) + 8 x label width; a same-label expansion adds nothing."""
    torch.set_num_threads(1)
    model, tok = make_model("llama"), make_tokenizer()
    editor = GRACEEditor(model, tok, GRACEHyperParams.from_dict(grace_dict(eps=0.005, n_iter=2)), resources(tmp_path))
    d_in, d_out = editor.codebook.keys.shape[1], editor.codebook.values.shape[1]
    sizes = [editor.codebook.nbytes]
    for prompt in ("The Eiffel Tower is located in the city of", "Apple A5 was created by", "Berlin is the capital of"):
        editor.edit([request(prompt, " Rome")])
        sizes.append(editor.codebook.nbytes)
    width = max(len(label) for label in editor.codebook.labels)
    assert len(editor.codebook) == 3 and width == 1
    assert [b - a for a, b in itertools.pairwise(sizes)] == [4 * (d_in + d_out + 1) + 8 * width] * 3


def test_state_round_trips_and_refuses_another_layer(tmp_path):
    torch.set_num_threads(1)
    model, tok = make_model("llama"), make_tokenizer()
    editor = GRACEEditor(model, tok, GRACEHyperParams.from_dict(grace_dict(n_iter=2)), resources(tmp_path))
    editor.edit([request("Apple A5 was created by", " Rome")])
    fresh = GRACEEditor(model, tok, editor.hparams, editor.resources)
    fresh.load_state_dict({k: v.clone() for k, v in editor.state_dict().items()})
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), editor.state_dict().values()))
    assert fresh.codebook.labels == editor.codebook.labels
    with pytest.raises(ValueError, match="does not fit"):
        Codebook.empty(3, 4, torch.device("cpu")).load_state_dict(editor.state_dict())


@pytest.mark.parametrize("field, value", [("eps", 0), ("eps", -1.0), ("n_iter", 0), ("edit_lr", 0), ("layer", -1),
                                          ("val_init", "hot"), ("edit_module_tmp", "model.layers.2.mlp")])
def test_bad_hparams_name_the_field(field, value):
    with pytest.raises(HParamsError, match=f"'{field}'"):
        GRACEHyperParams.from_dict(grace_dict(**{field: value}))


@pytest.mark.parametrize("overrides, message", [({"layer": 4}, "'layer' is 4, but the model has layers 0..3"),
                                                ({"edit_module_tmp": "model.layers.{}.mlp.c_fc"}, "not found"),
                                                ({"edit_module_tmp": "model.layers.{}.mlp"}, "2-D weight")])
def test_a_layer_the_model_lacks_fails_on_the_architecture_check(overrides, message):
    hp = GRACEHyperParams.from_dict(grace_dict(**overrides))
    with pytest.raises(HParamsError, match=message):
        check_hparams_against_model(hp, make_model("llama"), source="GRACE/tiny.json")


def test_shipped_files_carry_upstreams_values():
    """Thartvigsen/GRACE f674183 (gpt2-xl: config/editor/grace.yaml, config/model/gpt2xl.yaml) and EasyEdit
    14cea82 hparams/GRACE/gpt-j-6b.yaml; SmolLM2's are measured (docs/hparams.md)."""
    expected = {"gpt2-xl": (35, "transformer.h.{}.mlp.c_fc", 100), "EleutherAI_gpt-j-6B": (25, "transformer.h.{}.mlp.fc_out", 200)}
    for model, (layer, module, n_iter) in expected.items():
        hp = json.loads((REPO_ROOT / "hparams" / "GRACE" / f"{model}.json").read_text())
        assert (hp["layer"], hp["edit_module_tmp"], hp["n_iter"]) == (layer, module, n_iter)
        assert (hp["eps"], hp["edit_lr"], hp["val_init"], hp["eps_expand"]) == (1.0, 1.0, "cold", "coverage")


def test_cli_rollback_run_killed_and_resumed_writes_the_same_files(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    world = TinyWorld(tmp_path, "llama")
    hp = world.write_hparams("GRACE", grace_dict(eps=0.005))

    def args(name: str) -> list[str]:  # python -m experiments.evaluate --alg_name GRACE ...
        return world.cli_args("GRACE", hp, edit_times=3, num_threads=1, checkpoint_every=100, dir_name=name)

    whole, resumed = killed_and_resumed(world, args, GRACEEditor, monkeypatch)
    assert resumed == whole and len([n for n in whole if n.startswith("edit_")]) == 3
    first = whole[next(n for n in whole if n.startswith("edit_1_"))]
    assert first["edit"]["update_norm"] == 0.0 and first["edit"]["action"] == "added"
    assert first["rollback"]["action"] == "split" and first["edit"]["loss"][1] < first["edit"]["loss"][0]
    assert any(whole[n]["post"]["rewrite_prompts_correct"] == [True] for n in whole if n.startswith("edit_"))
    state = load_editor_state(world.results_dir / "whole" / "run_000" / "weights_checkpoint.safetensors")
    made = [whole[n][kind]["action"] for n in whole if n.startswith("edit_") for kind in ("edit", "rollback")]
    assert "none" not in made[:4]  # the checkpoint is of step 2, the last retention point: 2 edits, 2 roll-backs
    assert state["keys"].shape[0] == int(state["n_edits"]) == 4
    assert set(made) <= {"added", "split", "none"}  # a roll-back after an edit that did not take: nothing to undo


def test_cli_sequential_run(tmp_path):
    from experiments.evaluate import cli

    torch.set_num_threads(1)
    world = TinyWorld(tmp_path, "llama")
    hp = world.write_hparams("GRACE", grace_dict(eps=0.005))
    assert cli(world.cli_args("GRACE", hp, protocol="sequential", edit_times=4, num_threads=1, dir_name="seq")) == 0
    run_dir = world.results_dir / "seq" / "run_000"
    evaluation = json.loads((run_dir / "evaluation_after_edit_4.json").read_text())
    assert len(evaluation["records"]) == 4 and evaluation["preservation"]["n_records"] > 0
    first = json.loads((run_dir / "batch_1.json").read_text())["edit"]
    assert first["update_norm"] == 0.0 and first["n_keys"] == 1
    # the memory curve the summary draws is the codebook's bytes after each edit, one key's bytes a new key
    from experiments.summary.memory_growth import bytes_per_edit, memory_curve, memory_growth_figure
    from experiments.summary.runs import load_run

    steps = [json.loads((run_dir / f"batch_{b}.json").read_text())["edit"] for b in range(1, 5)]
    x, y = memory_curve(load_run(run_dir, "GRACE"))
    assert x.tolist() == [1, 2, 3, 4] and y.tolist() == [s["memory_bytes"] for s in steps]
    grew = [b > a for a, b in zip(y, y[1:])]
    assert grew == [s["n_keys"] > r["n_keys"] for r, s in zip(steps, steps[1:])]  # bytes grow with the keys
    assert bytes_per_edit(load_run(run_dir, "GRACE")) == pytest.approx(float(np.polyfit(x, y, 1)[0]))
    assert memory_growth_figure([("GRACE", [load_run(run_dir, "GRACE")])], {"GRACE": (0, 0, 1, 1)}) is not None
