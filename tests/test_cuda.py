"""The editing math on a GPU: tiny models on cuda (skipped where there is none; scripts/gpu_check.sh
runs these on the device machine). W k* = v* after a ROME edit, WilKE's argmin, the fast and
reference implementations agreeing, and a bfloat16 model edited with float32 optimisation."""
from __future__ import annotations

import pytest
import torch

from editing.resources import EditResources
from rome import ROMEHyperParams, apply_rome_to_model, execute_rome
from tests.tiny import EIFFEL_PROMPT as PROMPT
from tests.tiny import EIFFEL_REQUEST as REQUEST
from tests.tiny import make_model, make_tokenizer, rank_one_hparams
from util import nethook
from util.globals import load_paths
from util.scoring import score_targets

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device (run scripts/gpu_check.sh on one)")]
ARCHS = ["gpt2", "llama"]


def on_cuda(arch: str, dtype: torch.dtype = torch.float32):
    return make_model(arch).to("cuda", dtype), make_tokenizer()


def hparams(arch: str, **kw) -> ROMEHyperParams:
    return ROMEHyperParams.from_dict(rank_one_hparams(arch, 4, mom2_adjustment=False, **kw))


def resources() -> EditResources:
    return EditResources(load_paths(), "tiny-cuda", progress=False)


@pytest.mark.parametrize("arch", ARCHS)
def test_rome_on_cuda_maps_the_key_to_v_star(arch):
    model, tok = on_cuda(arch)
    update = execute_rome(model, tok, REQUEST, hparams(arch), resources())
    assert update.u.device.type == update.v_star.device.type == "cuda"
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
