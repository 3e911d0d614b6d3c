"""FT and FT-L on tiny random GPT-2 (Conv1D with bias) and Llama models."""
import json

import pytest
import torch

from baselines.ft import FTHyperParams, apply_ft_to_model, execute_ft
from baselines.ft.ft_main import mean_target_nll, target_batch
from util import nethook
from util.architectures import ARCHITECTURES
from util.hparams import HParamsError
from util.scoring import score_targets
from util.tiny_models import EIFFEL_PROMPT as PROMPT
from util.tiny_models import EIFFEL_REQUEST as REQUEST
from util.tiny_models import TinyWorld, make_model, make_tokenizer


def ft_dict(arch: str, **kw) -> dict:
    spec = ARCHITECTURES[arch]
    hp = dict(
        layers=[1], num_steps=25, lr=5e-4, weight_decay=0.0, kl_factor=0.0, norm_constraint=None,
        rewrite_module_tmp=spec.rewrite_module_tmp, layer_module_tmp=spec.layer_module_tmp,
        mlp_module_tmp=spec.mlp_module_tmp, attn_module_tmp=spec.attn_module_tmp,
        ln_f_module=spec.ln_f_module, lm_head_module=spec.lm_head_module,
    )
    hp.update(kw)
    return hp


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_ft_l_keeps_every_entry_inside_its_bound(arch):
    eps = 2e-3
    model, tok = make_model(arch), make_tokenizer()
    hp = FTHyperParams.from_dict(ft_dict(arch, norm_constraint=eps, lr=5e-3, layers=[1, 2]))
    _, orig = apply_ft_to_model(model, tok, [REQUEST], hp, return_orig_weights=True)
    expected = {n for l in (1, 2) for n, _ in model.named_parameters() if n.startswith(hp.rewrite_module_tmp.format(l) + ".")}
    assert set(orig) == expected
    for name, old in orig.items():
        change = (nethook.get_parameter(model, name) - old).abs().max()
        assert 0 < change <= eps * (1 + 1e-5)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_unconstrained_ft_makes_the_target_the_greedy_answer(arch):
    model, tok = make_model(arch), make_tokenizer()
    assert not score_targets(model, tok, [PROMPT], ["Rome"])[0].correct
    apply_ft_to_model(model, tok, [REQUEST], FTHyperParams.from_dict(ft_dict(arch)))
    assert score_targets(model, tok, [PROMPT], ["Rome"])[0].correct


def test_execute_ft_leaves_weights_and_gradient_flags_unchanged():
    model, tok = make_model("gpt2"), make_tokenizer()
    model.lm_head.weight.requires_grad_(True)  # a flag the caller set must survive
    before = {n: (p.clone(), p.requires_grad) for n, p in model.named_parameters()}
    update = execute_ft(model, tok, [REQUEST], FTHyperParams.from_dict(ft_dict("gpt2", kl_factor=0.5)))
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n][0]) and p.requires_grad == before[n][1]
    assert all(float(d.abs().max()) > 0 for d in update.deltas.values())


def test_loss_is_the_teacher_forced_target_nll():
    """Multi-token targets are scored token by token, as util.scoring does."""
    model, tok = make_model("llama"), make_tokenizer()
    prompts = ["Toko Yasuda plays the", "Apple A5 was created by"]
    targets = [" piano", " Google"]  # several tokens each in the tiny tokenizer
    batch = target_batch(tok, prompts, targets, torch.device("cpu"))
    with torch.no_grad():
        loss = float(mean_target_nll(model, batch))
    expected = sum(s.nll for s in score_targets(model, tok, prompts, targets)) / 2
    assert loss == pytest.approx(expected, rel=1e-5)


def test_hparams_validation():
    with pytest.raises(HParamsError, match="'norm_constraint'"):
        FTHyperParams.from_dict(ft_dict("gpt2", norm_constraint=-1.0))
    with pytest.raises(HParamsError, match="'layers'"):
        FTHyperParams.from_dict(ft_dict("gpt2", layers=[]))


def test_evaluate_cli_two_edits_with_rollback(tmp_path):
    from experiments.evaluate import main

    world = TinyWorld(tmp_path, "llama")
    hp = world.write_hparams("FT", ft_dict("llama", norm_constraint=5e-3, lr=5e-3))
    run_dir = main(world.cli_args("FT", hp, dataset_size_limit=6, edit_times=2))
    edits = sorted(run_dir.glob("edit_*_on_case_*.json"))
    assert len(edits) == 2
    for path in edits:
        record = json.loads(path.read_text())
        assert record["edit"]["layers"] == [1] and 0 < record["edit"]["max_abs_change"] <= 5e-3 * (1 + 1e-5)
        assert record["rollback"]["update_norm"] > 0
    assert (run_dir / "retention_of_edit_2.json").exists()
