"""Half precision and models placed by accelerate: a bfloat16 model edited with float32 optimisation,
and a dispatched model (weights offloaded to a CPU map, moved in by accelerate's hooks for every
forward pass) that gets the same updates as the model it was made from."""
from __future__ import annotations

import pytest
import torch

from editing.resources import EditResources
from rome import ROMEHyperParams, apply_rome_to_model, execute_rome
from util import nethook
from util.globals import load_paths
from util.scoring import score_targets
from util.tiny_models import EIFFEL_PROMPT as PROMPT
from util.tiny_models import EIFFEL_REQUEST as REQUEST
from util.tiny_models import TinyWorld, make_model, make_tokenizer, rank_one_hparams, tiny_records


def rome_hparams(arch: str = "llama", **kw) -> ROMEHyperParams:
    return ROMEHyperParams.from_dict(rank_one_hparams(arch, 4, mom2_adjustment=False, **kw))


def greedy_is(model, tok, prompt: str, target: str) -> bool:
    return score_targets(model, tok, [prompt], [target])[0].correct


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_bfloat16_model_edited_with_float32_optimisation_flips_its_answer(arch):
    model, tok = make_model(arch).to(torch.bfloat16), make_tokenizer()
    hp = rome_hparams(arch)
    update = execute_rome(model, tok, REQUEST, hp, EditResources(load_paths(), "tiny-bf16"))
    assert update.u.dtype == update.r.dtype == update.v_star.dtype == update.key.dtype == torch.float32
    module = nethook.get_module(model, update.module_name)
    assert not greedy_is(model, tok, PROMPT, "Rome")
    apply_rome_to_model(model, tok, [REQUEST], hp, resources=EditResources(load_paths(), "tiny-bf16"))
    assert module.weight.dtype == torch.bfloat16 and greedy_is(model, tok, PROMPT, "Rome")
    # W k = v* to bfloat16 precision (8 bits of mantissa): the layer applied in float32 to the bare key
    out = torch.nn.functional.linear(update.key, nethook.get_parameter(model, f"{update.module_name}.weight").float().T
                                     if arch == "gpt2" else nethook.get_parameter(model, f"{update.module_name}.weight").float())
    assert (out - update.v_star).norm() / update.v_star.norm() < 2e-2


def offloaded(model):
    """The model with every weight offloaded to a CPU map, put back by accelerate's hooks per forward."""
    from accelerate import cpu_offload

    cpu_offload(model, execution_device="cpu")
    assert all(p.device.type == "meta" for p in model.parameters())
    return model


def stored(model, name: str) -> torch.Tensor:
    return nethook.get_parameter(model, name).detach().clone()


def world_resources(tmp_path, arch: str):
    world = TinyWorld(tmp_path, arch)
    return world, EditResources(load_paths(stats_dir=str(world.stats_dir)), f"tiny-{arch}", progress=False)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_dispatched_model_gets_the_same_rome_and_wilke_updates(tmp_path, arch):
    from wilke.editor import apply_wilke_to_model
    from wilke.wilke_hparams import WilKEHyperParams

    world, res = world_resources(tmp_path, arch)
    hp = ROMEHyperParams.from_json(world.write_hparams("ROME", rank_one_hparams(arch, 4)))
    whp = WilKEHyperParams.from_json(world.write_hparams("WilKE", {**rank_one_hparams(arch, 4), "scanning_ceiling": 3}))
    tok = make_tokenizer()
    plain, dispatched = make_model(arch), offloaded(make_model(arch))
    for model in (dispatched, plain):  # the dispatched model first: it collects the statistics
        apply_rome_to_model(model, tok, [REQUEST], hp, resources=res)
    _, _, plain_result = apply_wilke_to_model(plain, tok, [tiny_records()[1]["requested_rewrite"]], whp, resources=res)
    _, _, dispatched_result = apply_wilke_to_model(dispatched, tok, [tiny_records()[1]["requested_rewrite"]], whp,
                                                   resources=res)
    assert dispatched_result.chosen_layers == plain_result.chosen_layers
    for name, _ in plain.named_parameters():
        assert torch.allclose(stored(dispatched, name), stored(plain, name), rtol=0, atol=1e-5), name
    assert greedy_is(dispatched, tok, PROMPT, "Rome")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_dispatched_model_gets_the_same_memit_update(tmp_path, arch):
    from memit import MEMITHyperParams, apply_memit_to_model

    world, res = world_resources(tmp_path, arch)
    hp = MEMITHyperParams.from_json(world.write_hparams("MEMIT", rank_one_hparams(
        arch, 4, layers=[1, 2], mom2_update_weight=100.0, context_template_length_params=[[10, 5]])))
    tok = make_tokenizer()
    requests = [dict(r["requested_rewrite"], case_id=r["case_id"]) for r in tiny_records()[:3]]
    plain, dispatched = make_model(arch), offloaded(make_model(arch))
    for model in (dispatched, plain):  # the dispatched model first: it collects the statistics
        apply_memit_to_model(model, tok, requests, hp, resources=res)
    for name, _ in plain.named_parameters():
        assert torch.allclose(stored(dispatched, name), stored(plain, name), rtol=0, atol=1e-5), name
    assert not torch.equal(stored(plain, f"{hp.rewrite_module_tmp.format(1)}.weight"),
                           stored(make_model(arch), f"{hp.rewrite_module_tmp.format(1)}.weight"))


def test_half_precision_overflow_stops_the_run_and_names_float32_as_the_fix(tmp_path, monkeypatch, caplog):
    """An edit that overflows float16 (simulated: the edited weight gets an inf, as a too-large
    update cast to float16 does) is caught by the numerical-fault checks, whose message says to
    rerun in float32."""
    import json

    from experiments.evaluate import cli
    from rome.editor import ROMEEditor

    world = TinyWorld(tmp_path, "llama")
    hp = world.write_hparams("ROME", rank_one_hparams("llama", 4))
    real_edit = ROMEEditor.edit

    def overflowing_edit(editor, requests):
        outcome = real_edit(editor, requests)
        weight = nethook.get_parameter(editor.model, next(iter(outcome.orig_weights)))
        assert weight.dtype == torch.float16
        with torch.no_grad():
            weight[0, 0] = weight[0, 0] * 1e5  # beyond float16's range: inf
        return outcome

    monkeypatch.setattr(ROMEEditor, "edit", overflowing_edit)
    assert cli(world.cli_args("ROME", hp, edit_times=1, dtype="float16", num_threads=1)) == 3
    failure = json.loads((world.results_dir / "ROME" / "run_000" / "failure.json").read_text())
    assert "non-finite" in failure["problem"] and "--dtype float32" in failure["problem"]
    assert "rerun with --dtype float32" in caplog.text


def test_synchronize_and_device_name_follow_the_model_not_a_named_device():
    from util.placement import device_name, synchronize

    model = make_model("gpt2", 2)
    synchronize(model)  # CPU: a no-op through torch.cpu, no device type written in the code
    assert device_name(model) == "cpu"
    if torch.cuda.is_available():
        model = model.to("cuda")
        synchronize(model)
        assert device_name(model) == torch.cuda.get_device_name(0)
