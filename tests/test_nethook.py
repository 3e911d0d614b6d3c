"""nethook: tracing and editing by module name, with hooks always removed."""
import pytest
import torch

from util import nethook
from util.tiny_models import make_model, make_tokenizer


@pytest.fixture(scope="module")
def model_and_ids():
    tok = make_tokenizer()
    ids = torch.tensor([tok("The Eiffel Tower is located in")["input_ids"]])
    return make_model("gpt2", n_layer=3), ids


def _hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_trace_retains_input_and_output(model_and_ids):
    model, ids = model_and_ids
    with nethook.Trace(model, "transformer.h.1.mlp.c_proj", retain_input=True, clone=True) as tr:
        model(ids)
    proj = nethook.get_module(model, "transformer.h.1.mlp.c_proj")
    assert torch.allclose(proj(tr.input), tr.output, atol=1e-6)
    assert _hook_count(model) == 0


def test_edit_output_changes_the_forward_pass(model_and_ids):
    model, ids = model_and_ids
    base = model(ids).logits

    def zero(out, name):
        assert name == "transformer.h.1.mlp"
        return torch.zeros_like(out)

    with nethook.Trace(model, "transformer.h.1.mlp", edit_output=zero):
        edited = model(ids).logits
    assert not torch.allclose(base, edited)
    assert torch.allclose(model(ids).logits, base)  # hook gone


def test_tracedict_tuple_outputs_and_stop(model_and_ids):
    model, ids = model_and_ids
    layers = ["transformer.h.0", "transformer.h.1"]
    with nethook.TraceDict(model, layers, stop=True) as td:
        model(ids)
    assert td["transformer.h.1"].first_output.shape[-1] == 64
    assert _hook_count(model) == 0


def test_hooks_removed_when_forward_raises(model_and_ids):
    model, ids = model_and_ids

    def boom(out, name):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        with nethook.Trace(model, "transformer.h.0", edit_output=boom):
            model(ids)
    assert _hook_count(model) == 0


def test_get_parameter_and_requires_grad(model_and_ids):
    model, _ = model_and_ids
    w = nethook.get_parameter(model, "transformer.h.0.mlp.c_proj.weight")
    nethook.set_requires_grad(True, w)
    assert w.requires_grad
    nethook.set_requires_grad(False, model)
    assert not w.requires_grad
    with pytest.raises(LookupError, match="no parameter"):
        nethook.get_parameter(model, "transformer.h.9.weight")
    with pytest.raises(LookupError, match="transformer.h.0"):
        nethook.get_module(model, "transformer.h.0.nope")
