"""The editing math on a GPU: tiny models on cuda (skipped where there is none; scripts/gpu_check.sh
runs these on the device machine). W k* = v* after a ROME edit, WilKE's argmin, the fast and
reference implementations agreeing, a bfloat16 model edited with float32 optimisation, and the
lifelong editors (AlphaEdit and ENCORE with NAS's anchor, UltraEdit, GRACE, WISE) editing on the
device as they do on the CPU.

``TEST_CUDA_DEVICE=cpu python -m pytest -m cuda tests/test_cuda.py`` runs the same tests on the CPU,
so that a machine without a GPU checks the tests themselves before a GPU's minutes are spent on them.
"""
from __future__ import annotations

import os
import shutil

import pytest
import torch

from editing.resources import EditResources
from rome import ROMEHyperParams, apply_rome_to_model, execute_rome
from util import nethook
from util.globals import load_paths
from util.scoring import score_targets
from util.tiny_models import EIFFEL_PROMPT as PROMPT
from util.tiny_models import EIFFEL_REQUEST as REQUEST
from util.tiny_models import make_model, make_tokenizer, rank_one_hparams

DEVICE = os.environ.get("TEST_CUDA_DEVICE", "cuda")
pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(),
                                 reason="no CUDA device (run scripts/gpu_check.sh on one)")]
ARCHS = ["gpt2", "llama"]


def on_cuda(arch: str, dtype: torch.dtype = torch.float32):
    return make_model(arch).to(DEVICE, dtype), make_tokenizer()


def hparams(arch: str, **kw) -> ROMEHyperParams:
    return ROMEHyperParams.from_dict(rank_one_hparams(arch, 4, mom2_adjustment=False, **kw))


def resources() -> EditResources:
    return EditResources(load_paths(), "tiny-cuda", progress=False)


@pytest.mark.parametrize("arch", ARCHS)
def test_rome_on_cuda_maps_the_key_to_v_star(arch):
    model, tok = on_cuda(arch)
    update = execute_rome(model, tok, REQUEST, hparams(arch), resources())
    assert update.u.device.type == update.v_star.device.type == torch.device(DEVICE).type
    module = nethook.get_module(model, update.module_name)
    apply_rome_to_model(model, tok, [REQUEST], hparams(arch), resources=resources())
    after = module(update.key[None])[0].detach()
    assert torch.allclose(after, update.v_star, rtol=1e-3, atol=1e-4)
    assert score_targets(model, tok, [PROMPT], ["Rome"])[0].correct


@pytest.mark.parametrize("arch", ARCHS)
def test_wilke_on_cuda_chooses_the_argmin_and_fast_equals_reference(arch):
    from wilke.editor import apply_wilke_to_model
    from wilke.wilke_hparams import WilKEHyperParams

    results = {}
    for implementation in ("fast", "reference"):
        model, tok = on_cuda(arch)
        hp = WilKEHyperParams.from_dict({**rank_one_hparams(arch, 4, mom2_adjustment=False), "scanning_ceiling": 3,
                                         "implementation": implementation})
        _, orig, result = apply_wilke_to_model(model, tok, [REQUEST], hp, return_orig_weights=True, resources=resources())
        edit = result.edits[0]
        assert edit.layer == min(edit.layer_adaptability, key=edit.layer_adaptability.get)
        name = next(iter(orig))
        results[implementation] = (edit.layer, nethook.get_parameter(model, name).detach() - orig[name])
    (fast_layer, fast), (ref_layer, ref) = results["fast"], results["reference"]
    assert fast_layer == ref_layer and (fast - ref).norm() / ref.norm() < 1e-3


@pytest.mark.parametrize("arch", ARCHS)
def test_bfloat16_on_cuda_flips_the_answer(arch):
    model, tok = on_cuda(arch, torch.bfloat16)
    assert not score_targets(model, tok, [PROMPT], ["Rome"])[0].correct
    apply_rome_to_model(model, tok, [REQUEST], hparams(arch), resources=resources())
    assert score_targets(model, tok, [PROMPT], ["Rome"])[0].correct


# --------------------------------------------------------------------------------------------
# The lifelong editors on the device: the same edit as on the CPU (templates "{}" alone, so no
# sampled text differs between devices; statistics and NAS's reference norm made on each device)

NAS = {"value_norm_anchor": True, "value_norm_anchor_samples": 4}
LOCATE_EDIT = {"layers": [1, 2], "mom2_update_weight": 100.0, "context_template_length_params": [],
               "fact_token": "subject_last", "v_num_grad_steps": 5}
WEIGHT_EDITORS = {
    "AlphaEdit": {**LOCATE_EDIT, **NAS, "nullspace_threshold": 1e-4, "L2": 1e-2},
    "ENCORE": {**LOCATE_EDIT, **NAS, "update_norm_lambda": 0.1, "mpes_prob_cutoff": -2},
}


def lifelong_editor(tmp_path, alg: str, device: str):
    """(model on ``device``, tokenizer, editor) with resources of that device's own (statistics, NAS's r)."""
    from experiments.algorithms import ALGORITHMS
    from util.tiny_models import TinyWorld

    world_dir = tmp_path / "world"
    world = TinyWorld(world_dir, "llama") if not world_dir.exists() else None
    data_file = world_dir / "tiny_counterfact.json"
    algorithm = ALGORITHMS[alg]
    if alg in WEIGHT_EDITORS:
        hp_dict = rank_one_hparams("llama", 4, **WEIGHT_EDITORS[alg], value_norm_anchor_dataset=str(data_file),
                                   mom2_dataset=str(world_dir / "corpus.txt"))
    elif alg == "UltraEdit":
        hp_dict = {"edit_modules": [["model.layers.{}.mlp.down_proj", [1, 2, 3]]], "lr": 1e-2, "sub_batch_size": 2}
    elif alg == "GRACE":
        from tests.test_grace import grace_dict
        hp_dict = grace_dict("llama", eps=0.005)
    else:
        from tests.test_wise import wise_dict
        hp_dict = wise_dict()
    hp = algorithm.load_hparams_class().from_dict(hp_dict)
    if world is not None and alg == "WISE":
        from tests.test_wise import resources as wise_resources
        wise_resources(world_dir)  # its unrelated rows, in the data folder
    stats = tmp_path / f"stats_{device}"
    shutil.rmtree(stats, ignore_errors=True)
    res = EditResources(load_paths(data_dir=str(world_dir), stats_dir=str(stats)), "tiny-llama", progress=False)
    model, tok = make_model("llama").to(device), make_tokenizer()
    return model, tok, algorithm.make_editor(model, tok, hp, res)


def lifelong_requests() -> list[dict]:
    from util.tiny_models import tiny_records
    return [dict(r["requested_rewrite"], case_id=r["case_id"]) for r in tiny_records()[:2]]


@pytest.mark.parametrize("alg", [*WEIGHT_EDITORS, "UltraEdit"])
def test_weight_editors_write_on_the_device_what_they_write_on_the_cpu(tmp_path, alg):
    deltas = {}
    for device in ("cpu", DEVICE):
        model, tok, editor = lifelong_editor(tmp_path, alg, device)
        before = {n: p.detach().cpu().clone() for n, p in model.named_parameters()}
        for request in lifelong_requests():  # two edits in a row: the editor's state carried on the device
            editor.edit([request])
        assert all(p.device.type == torch.device(device).type for p in model.parameters())
        deltas[device] = {n: p.detach().cpu() - before[n] for n, p in model.named_parameters()
                          if not torch.equal(p.detach().cpu(), before[n])}
    assert deltas["cpu"] and deltas["cpu"].keys() == deltas[DEVICE].keys()
    for name, delta in deltas["cpu"].items():
        assert (deltas[DEVICE][name] - delta).norm() / delta.norm() < 1e-2, name


@pytest.mark.parametrize("alg", ["GRACE", "WISE"])
def test_memory_editors_answer_on_the_device_and_leave_the_weights(tmp_path, alg):
    from tests.memory_helpers import request

    model, tok, editor = lifelong_editor(tmp_path, alg, DEVICE)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    edited, unrelated = "The Eiffel Tower is located in the city of", "Apple A5 was created by"
    plain = score_targets(model, tok, [unrelated], [" Rome"])[0].nll
    editor.edit([request(edited, " Rome")])
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    with editor.for_evaluation():
        assert score_targets(model, tok, [edited], [" Rome"])[0].correct
        other = score_targets(model, tok, [unrelated], [" Rome"])[0]
    assert not other.correct
    if alg == "GRACE":  # outside every radius: the unedited model's output (WISE routes by a learned score)
        assert other.nll == pytest.approx(plain, abs=1e-4)
