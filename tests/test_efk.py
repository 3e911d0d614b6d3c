"""KE (efk) on tiny random models: training, checkpoints, the official file layout, executor, CLI."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import GPT2Config

from baselines.efk.efk_hparams import KEHyperParams
from baselines.efk.efk_main import EfkRewriteExecutor
from baselines.efk.ke_network import conditioner_key
from baselines.efk.official import map_official_efk_state
from baselines.mend.batches import make_batch, request_example, segments_of
from baselines.mend.checkpoints import EditorCheckpointMissingError, load_editor
from baselines.mend.executor import compute_edit
from baselines.mend.functional import EditRunner, RunnerFactory, gradient_factors, inner_params
from tests.test_mend import REQUEST, run_cli_two_edits, target_nll, tiny_editor_hparams, train_tiny
from util import nethook
from util.tiny_models import make_model, make_tokenizer, tiny_records

HPARAMS_DIR = Path(__file__).resolve().parent.parent / "hparams"


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_training_lowers_the_editing_loss(arch, tmp_path):
    trainer = train_tiny("KE", arch, tmp_path / "ke.pt")
    first, last = trainer.history[0], trainer.history[-1]
    assert last["step"] == 30 and last["edit_nll"] < first["edit_nll"] - 0.1


def test_saved_checkpoint_reloads_to_identical_edits(tmp_path):
    trainer = train_tiny("KE", "llama", tmp_path / "ke.pt", steps=10)
    model, tok = trainer.model, trainer.tok
    trainer.editor.eval()
    mine = compute_edit(model, tok, trainer.editor, REQUEST, trainer.hparams, RunnerFactory())
    loaded, _ = load_editor("KE", model, trainer.hparams)
    again = compute_edit(model, tok, loaded, REQUEST, trainer.hparams, RunnerFactory())
    for name in mine.updates:
        assert torch.equal(mine.updates[name], again.updates[name])


def test_executor_edit_moves_the_model_toward_the_target(tmp_path):
    trainer = train_tiny("KE", "gpt2", tmp_path / "ke.pt")
    model, tok = make_model("gpt2"), make_tokenizer()
    before = target_nll(model, tok)
    _, orig = EfkRewriteExecutor().apply_to_model(model, tok, tiny_records()[0]["requested_rewrite"], trainer.hparams,
                                                 return_orig_weights=True)
    assert set(orig) == set(trainer.hparams.inner_params)
    assert target_nll(model, tok) < before - 0.5


def test_missing_official_checkpoint_names_the_file_and_the_url():
    hp = KEHyperParams.from_json(HPARAMS_DIR / "KE" / "gpt2-xl.json")
    if hp.archive_path().exists():
        pytest.skip("the official file is present")
    with pytest.raises(EditorCheckpointMissingError) as info:
        EfkRewriteExecutor().apply_to_model(make_model("gpt2"), make_tokenizer(), REQUEST, hp)
    msg = str(info.value)
    assert "baselines/efk/weights/efk-1tok-gpt2-xl.pt" in msg
    assert "https://rome.baulab.info/data/weights/efk-1tok-gpt2-xl.pt" in msg


def _official_efk_state(model, hp: KEHyperParams, vocab: int, seed: int = 2) -> dict:
    """A state dict in the MEND code base's EFK layout (weight_norm, AllenNLP wrappers), random values."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: 0.3 * torch.randn(*s, generator=g)  # noqa: E731
    state = {}
    for p in inner_params(model, hp.inner_params):
        d0, d1 = (p.in_features, p.out_features) if p.transposed else (p.out_features, p.in_features)
        pre = f"editor.conditioners.{conditioner_key(p.name)}.conditioners."
        for idx, (out, inp) in ((0, (hp.hidden_dim, hp.condition_dim)), (2, (2 * (d0 + d1) + 1, hp.hidden_dim))):
            state[f"{pre}{idx}.weight_g"] = rnd(out, 1).abs() + 0.5
            state[f"{pre}{idx}.weight_v"] = rnd(out, inp)
            state[f"{pre}{idx}.bias"] = rnd(out)
    emb = model.get_input_embeddings().weight.shape[1]
    state["editor.condition.embedding.weight"] = rnd(vocab, emb)
    lstm = torch.nn.LSTM(emb, hp.hidden_dim, bidirectional=True, batch_first=True)
    for name, value in lstm.state_dict().items():
        state[f"editor.condition.lstm._module.{name}"] = rnd(*value.shape)
    state["editor.condition.linear._linear_layers.0.weight"] = rnd(hp.condition_dim, 2 * hp.hidden_dim)
    state["editor.condition.linear._linear_layers.0.bias"] = rnd(hp.condition_dim)
    return state


def _reference_efk_updates(state: dict, hp: KEHyperParams, params, grads: dict, ids: torch.Tensor) -> dict:
    """The EFK/OneShotLearner forward written out directly (torch's own LSTM, explicit weight norm)."""
    emb = state["editor.condition.embedding.weight"][ids]
    lstm = torch.nn.LSTM(emb.shape[-1], hp.hidden_dim, bidirectional=True, batch_first=True)
    lstm.load_state_dict({k.split("_module.")[1]: v for k, v in state.items() if "_module." in k})
    _, (h, _) = lstm(emb)
    final = torch.cat((h[0], h[1]), -1)
    cond = torch.tanh(final @ state["editor.condition.linear._linear_layers.0.weight"].T
                      + state["editor.condition.linear._linear_layers.0.bias"])

    def wn(x, pre):
        v, gain = state[pre + "weight_v"], state[pre + "weight_g"]
        return x @ (gain * v / v.norm(dim=1, keepdim=True)).T + state[pre + "bias"]

    out = {}
    for p in params:
        pre = f"editor.conditioners.{conditioner_key(p.name)}.conditioners."
        grad = grads[p.name]
        d0, d1 = grad.shape
        o = wn(torch.tanh(wn(cond, pre + "0.")), pre + "2.")
        cola, rowa, colb, rowb, norm = o.split([d1, d0, d1, d0, 1], -1)
        a = rowa.softmax(-1).T @ cola
        b = rowb.softmax(-1).T @ colb
        out[p.name] = hp.max_scale * norm.sigmoid().squeeze() * (grad * a + b)
    return out


def test_official_layout_loads_and_edits_as_the_reference(tmp_path):
    """GPT-2 (Conv1D layout), an embedding one row larger than the vocabulary (the reference's [PAD])."""
    model, tok = make_model("gpt2"), make_tokenizer()
    path = tmp_path / "efk-1tok-tiny.pt"
    hp = tiny_editor_hparams("KE", "gpt2", archive=path)
    vocab = model.get_input_embeddings().weight.shape[0] + 1
    state = _official_efk_state(model, hp, vocab)
    torch.save({"model": {**state, "model_config": GPT2Config(n_layer=4)}, "opt": {}, "step": 3}, path)
    editor, _ = load_editor("KE", model, hp)
    params = inner_params(model, hp.inner_params)
    batch = make_batch(tok, segments_of(request_example(REQUEST), False, False), torch.device("cpu"))
    factors, _, _ = gradient_factors(EditRunner(model, batch, 2, "fast"), params)
    ids = batch.sequence_ids(0)
    with torch.no_grad():
        ours = editor.updates(factors, condition=ids)
        grads = {p.name: factors[p.name].gradient().T if p.transposed else factors[p.name].gradient() for p in params}
        ref = _reference_efk_updates(state, hp, params, grads, ids)
    for p in params:
        assert ours[p.name].shape == nethook.get_parameter(model, p.name).shape
        assert torch.allclose(ours[p.name], ref[p.name], atol=1e-5, rtol=1e-4), p.name


def test_official_mapping_rejects_unknown_keys():
    with pytest.raises(KeyError, match="unexpected key"):
        map_official_efk_state({"editor.conditioners.x_conditioner.conditioners.0.weight_g": torch.zeros(1),
                                "editor.condition.mystery": torch.zeros(1)})


def test_evaluate_cli_runs_two_ke_edits_with_rollback(tmp_path):
    run_cli_two_edits("KE", tmp_path)
