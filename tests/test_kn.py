"""Knowledge Neurons on tiny random GPT-2 (Conv1D) and Llama models: attribution, refinement, the edit."""
import copy
import json

import pytest
import torch

from baselines.kn import KNHyperParams, apply_kn_to_model, execute_kn
from baselines.kn.attribution import coarse_neurons, prompt_scores, refined_neurons
from baselines.kn.kn_main import greedy_token
from editing.resources import EditResources
from util import nethook
from util.architectures import ARCHITECTURES, weight_out_in
from util.globals import load_paths
from util.scoring import final_hidden, lm_logits, prompt_ids, score_targets
from util.tiny_models import EIFFEL_PROMPT as PROMPT
from util.tiny_models import EIFFEL_REQUEST as REQUEST
from util.tiny_models import TinyWorld, make_model, make_tokenizer


def kn_dict(arch: str, **kw) -> dict:
    spec = ARCHITECTURES[arch]
    hp = dict(
        steps=20, batch_size=10, adaptive_threshold=0.2, p=0.4, refine=True,
        context_template_length_params=[[5, 4]],
        rewrite_module_tmp=spec.rewrite_module_tmp, layer_module_tmp=spec.layer_module_tmp,
        ln_f_module=spec.ln_f_module, lm_head_module=spec.lm_head_module,
    )
    hp.update(kw)
    return hp


def resources() -> EditResources:
    return EditResources(load_paths(), "tiny", progress=False)


@torch.no_grad()
def prob(model, tok, token: int) -> float:
    ids = torch.tensor([prompt_ids(tok, PROMPT)])
    return float(torch.softmax(lm_logits(model, final_hidden(model, ids, torch.ones_like(ids))[0, -1]), -1)[token])


@torch.no_grad()
def drop_when_zeroed(model, tok, module_tmp: str, flat: torch.Tensor, width: int, token: int) -> float:
    ablated = copy.deepcopy(model)
    for f in flat.tolist():
        layer, i = divmod(f, width)
        weight_out_in(nethook.get_module(ablated, module_tmp.format(layer)))[:, i] = 0
    return prob(model, tok, token) - prob(ablated, tok, token)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_top_attributed_neurons_matter_more_than_random_ones(arch):
    """Zeroing the 10 best-scored neurons lowers P(prediction) more than any of 10 random draws of 10."""
    model, tok = make_model(arch), make_tokenizer()
    hp = KNHyperParams.from_dict(kn_dict(arch))
    token = greedy_token(model, tok, PROMPT)
    scores = prompt_scores(model, tok, PROMPT, token, hp, [0, 1, 2, 3], resources())
    width = scores.shape[1]
    top = drop_when_zeroed(model, tok, hp.rewrite_module_tmp, scores.flatten().topk(10).indices, width, token)
    g = torch.Generator().manual_seed(0)
    random = [
        drop_when_zeroed(model, tok, hp.rewrite_module_tmp, torch.randperm(scores.numel(), generator=g)[:10], width, token)
        for _ in range(10)
    ]
    assert top > 0 and top > max(random)


def test_fast_and_reference_attribution_agree():
    model, tok = make_model("llama"), make_tokenizer()
    token = greedy_token(model, tok, PROMPT)
    fast = prompt_scores(model, tok, PROMPT, token, KNHyperParams.from_dict(kn_dict("llama")), [1, 3], resources())
    ref = prompt_scores(model, tok, PROMPT, token, KNHyperParams.from_dict(kn_dict("llama", implementation="reference")), [1, 3], resources())
    assert torch.allclose(fast, ref, rtol=1e-4, atol=1e-9)


def test_coarse_and_refined_neurons():
    scores = torch.tensor([[1.0, 0.1, 0.5], [0.3, 0.05, 0.0]])
    assert coarse_neurons(scores, [4, 7], 0.25) == [(4, 0), (4, 2), (7, 0)]
    coarse = [[(4, 0), (4, 2)], [(4, 0)], [(4, 0), (7, 1)], [(7, 1)], [(7, 1), (4, 2)]]
    assert refined_neurons(coarse, 0.4, refine=True) == [(4, 0), (7, 1)]  # in more than 2 of 5
    assert refined_neurons(coarse, 0.4, refine=False) == [(4, 0), (4, 2), (7, 1)]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_edit_moves_each_found_neurons_value_vector_toward_the_new_target(arch):
    model, tok = make_model(arch), make_tokenizer()
    hp = KNHyperParams.from_dict(kn_dict(arch))
    update = execute_kn(model, tok, REQUEST, hp, resources())
    assert update.n_prompts == 5 and update.neurons
    new_before = score_targets(model, tok, [PROMPT], ["Rome"])[0].nll
    edited, orig = apply_kn_to_model(model, tok, [REQUEST], hp, copy=True, return_orig_weights=True, resources=resources())
    emb = model.get_input_embeddings().weight
    expected = 2.0 * (emb[update.new_token] - emb[update.old_token])
    for layer in update.layers:
        name = hp.rewrite_module_tmp.format(layer)
        diff = weight_out_in(nethook.get_module(edited, name)) - weight_out_in(nethook.get_module(model, name))
        picked = [i for l, i in update.neurons if l == layer]
        others = [i for i in range(diff.shape[1]) if i not in picked]
        assert torch.allclose(diff[:, picked], expected[:, None].expand(-1, len(picked)), atol=1e-6)
        assert float(diff[:, others].abs().max()) == 0
        assert torch.equal(orig[f"{name}.weight"], nethook.get_parameter(model, f"{name}.weight"))
    assert score_targets(edited, tok, [PROMPT], ["Rome"])[0].nll < new_before


def test_evaluate_cli_two_edits_with_rollback(tmp_path):
    from experiments.evaluate import main

    world = TinyWorld(tmp_path, "gpt2")
    hp = world.write_hparams("KN", kn_dict("gpt2", context_template_length_params=[[5, 2]]))
    run_dir = main(world.cli_args("KN", hp, dataset_size_limit=6, edit_times=2))
    edits = sorted(run_dir.glob("edit_*_on_case_*.json"))
    assert len(edits) == 2
    for path in edits:
        record = json.loads(path.read_text())
        assert record["edit"]["n_neurons"] == len(record["edit"]["neurons"]) > 0
        assert record["edit"]["update_norm"] > 0 and record["rollback"]["update_norm"] > 0
    assert (run_dir / "retention_of_edit_2.json").exists()
