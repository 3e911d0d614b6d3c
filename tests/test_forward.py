"""The forward strategies of a value optimisation agree with the full pass, delta included.

The prefix-cached strategy recomputes only positions from each row's fact token on; these tests
check, on tiny models of every tested family and on the real models, that it is the strategy
chosen, that it gives the full pass's logits with a delta injected, that the v* optimisation
it drives matches the reference's, and that it steps aside when it cannot serve a batch.
"""
import pytest
import torch

from editing.forward import FullForward, PromptBatch, SuffixForward
from editing.forward_choice import agrees_with_full, verified_forward
from editing.forward_prefix import PrefixCachedForward
from editing.requests import normalise_request
from editing.value_optimisation import optimise_value
from editing.value_problems import build_value_problem
from rome import ROMEHyperParams
from util.architectures import num_layers
from util.tiny_models import EIFFEL_REQUEST, make_model, make_tokenizer, rank_one_hparams

REQUEST = normalise_request(EIFFEL_REQUEST)
# contexts of different lengths, so rows need different amounts of left padding
TEMPLATES = ["{}", "A short one. {}", "Here is a rather longer context sentence. {}", "Yes. {}"]


def problem_for(tok, model, templates=TEMPLATES):
    return build_value_problem(tok, REQUEST, templates, "subject_last", torch.device("cpu"))


def strategy_for(model, hp, problem, first_block, checked=None):
    return verified_forward(
        "fast", model, problem.batch, hp.layer_module_tmp, num_layers(model), hp.v_loss_layer, hp.ln_f_module,
        first_block=first_block, probe_module=hp.rewrite_module_tmp.format(first_block),
        checked={} if checked is None else checked, anchor_cols=problem.fact_cols,
    )


@pytest.mark.parametrize("arch", ["gpt2", "gptj", "llama"])
def test_prefix_cached_forward_is_chosen_and_matches_the_full_pass_with_a_delta(arch):
    model, tok = make_model(arch), make_tokenizer()
    hp = ROMEHyperParams.from_dict(rank_one_hparams(arch, 4))
    problem = problem_for(tok, model)
    checked = {}
    strategy = strategy_for(model, hp, problem, first_block=1, checked=checked)
    assert isinstance(strategy, PrefixCachedForward), checked
    assert checked == {(id(model), "prefix"): True}
    # it recomputes fewer positions than the padded prompts hold
    assert strategy.total - strategy.n_prefix < problem.batch.input_ids.shape[1]
    full = FullForward(model, problem.batch, hp.layer_module_tmp.format(hp.v_loss_layer), hp.ln_f_module)
    probe = (problem.fact_rows, problem.fact_cols)
    for block in (1, 2, 3):
        assert agrees_with_full(strategy, full, block, hp.rewrite_module_tmp.format(block), probe)
        assert agrees_with_full(strategy, full, block, hp.layer_module_tmp.format(block), probe)


def test_the_probe_detects_a_delta_put_in_the_wrong_place():
    """The check is not vacuous: shifting the injected position by one breaks agreement."""
    model, tok = make_model("llama"), make_tokenizer()
    hp = ROMEHyperParams.from_dict(rank_one_hparams("llama", 4))
    problem = problem_for(tok, model)
    strategy = strategy_for(model, hp, problem, first_block=1)
    full = FullForward(model, problem.batch, hp.layer_module_tmp.format(hp.v_loss_layer), hp.ln_f_module)

    class Shifted:
        def __getattr__(self, name):
            return getattr(strategy, name)

        def positions(self, rows, cols):
            r, c = strategy.positions(rows, cols)
            return r, c + 1

    name = hp.rewrite_module_tmp.format(1)
    assert agrees_with_full(strategy, full, 1, name, (problem.fact_rows, problem.fact_cols))
    assert not agrees_with_full(Shifted(), full, 1, name, (problem.fact_rows, problem.fact_cols))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_value_optimisation_is_the_same_under_every_strategy(arch):
    model, tok = make_model(arch), make_tokenizer()
    hp = ROMEHyperParams.from_dict(rank_one_hparams(arch, 4, v_num_grad_steps=8))
    problem = problem_for(tok, model)
    full = FullForward(model, problem.batch, hp.layer_module_tmp.format(hp.v_loss_layer), hp.ln_f_module)
    prefix = strategy_for(model, hp, problem, first_block=1)
    assert isinstance(prefix, PrefixCachedForward)
    names = [hp.layer_module_tmp.format(i) for i in range(num_layers(model))]
    suffix = SuffixForward(model, problem.batch, names, hp.v_loss_layer, hp.ln_f_module, 1)
    for layer in (1, 2):
        module = hp.rewrite_module_tmp.format(layer)
        ref = optimise_value(model, problem, full, module, layer, hp)
        for strategy in (prefix, suffix):
            got = optimise_value(model, problem, strategy, module, layer, hp)
            assert got.steps == ref.steps
            assert torch.allclose(got.v0, ref.v0, rtol=1e-5, atol=1e-6)
            assert float((got.v_star - ref.v_star).norm() / ref.v_star.norm()) < 1e-4


def test_prefix_strategy_steps_aside_when_a_read_position_precedes_the_fact_token():
    model, tok = make_model("llama"), make_tokenizer()
    hp = ROMEHyperParams.from_dict(rank_one_hparams("llama", 4))
    problem = problem_for(tok, model)
    b = problem.batch
    early = PromptBatch(b.input_ids, b.attention_mask, b.rows, torch.zeros_like(b.cols))
    names = [hp.layer_module_tmp.format(i) for i in range(4)]
    assert "precedes" in PrefixCachedForward.applicable(model, early, problem.fact_cols, names)
    strategy = verified_forward(
        "fast", model, early, hp.layer_module_tmp, 4, hp.v_loss_layer, hp.ln_f_module, first_block=1,
        checked={}, anchor_cols=problem.fact_cols,
    )
    assert isinstance(strategy, SuffixForward)
    with pytest.raises(ValueError, match="fact token"):
        strategy_for(model, hp, problem, first_block=1).positions(problem.fact_rows, problem.fact_cols - 1)


def test_reference_implementation_always_uses_the_full_pass():
    model, tok = make_model("llama"), make_tokenizer()
    hp = ROMEHyperParams.from_dict(rank_one_hparams("llama", 4))
    problem = problem_for(tok, model)
    strategy = verified_forward(
        "reference", model, problem.batch, hp.layer_module_tmp, 4, hp.v_loss_layer, hp.ln_f_module, first_block=1,
        checked={}, anchor_cols=problem.fact_cols,
    )
    assert isinstance(strategy, FullForward)


@pytest.mark.slow
@pytest.mark.parametrize("fixture", ["smollm2", "gemma3"])
def test_real_models_use_the_prefix_cached_forward(fixture, request):
    model, tok = request.getfixturevalue(fixture)
    from util.architectures import arch_of

    spec = arch_of(model)
    n = num_layers(model)
    layer_tmp = spec.layer_module_tmp
    problem = build_value_problem(tok, REQUEST, TEMPLATES, "subject_last", torch.device("cpu"))
    checked = {}
    strategy = verified_forward(
        "fast", model, problem.batch, layer_tmp, n, n - 1, spec.ln_f_module, first_block=2,
        probe_module=spec.rewrite_module_tmp.format(2), checked=checked, anchor_cols=problem.fact_cols,
    )
    assert isinstance(strategy, PrefixCachedForward), checked
