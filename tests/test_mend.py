"""MEND on tiny random GPT-2 (Conv1D) and Llama models: training, checkpoints, official files, executor, CLI."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config

from baselines.mend.batches import make_batch, record_example, request_example, segments_of
from baselines.mend.checkpoints import EditorCheckpointMissingError, load_editor
from baselines.mend.executor import MendRewriteExecutor, compute_edit
from baselines.mend.functional import EditRunner, RunnerFactory, gradient_factors, inner_params
from baselines.mend.mend_hparams import MENDHyperParams
from baselines.mend.official import map_official_mend_state
from baselines.mend.trainer import EditorTrainer
from util import nethook
from util.scoring import score_targets
from util.tiny_models import EIFFEL_PROMPT as PROMPT
from util.tiny_models import EIFFEL_REQUEST as REQUEST
from util.tiny_models import TinyWorld, make_model, make_tokenizer, tiny_records

HPARAMS_DIR = Path(__file__).resolve().parent.parent / "hparams"
MLP_WEIGHTS = {
    "gpt2": ("transformer.h.{}.mlp.c_proj.weight", "transformer.h.{}.mlp.c_fc.weight"),
    "gptj": ("transformer.h.{}.mlp.fc_out.weight", "transformer.h.{}.mlp.fc_in.weight"),
    "llama": ("model.layers.{}.mlp.down_proj.weight", "model.layers.{}.mlp.up_proj.weight"),
}


# -- helpers shared with tests/test_efk.py ------------------------------------------------------
def tiny_inner(arch: str, layers=(2, 3)) -> list[str]:
    return [t.format(layer) for layer in layers for t in MLP_WEIGHTS[arch]]


def tiny_editor_hparams(kind: str, arch: str, archive=None, **overrides):
    """Settings that make a tiny editor learn within a few dozen one-edit steps."""
    common = dict(model_name=f"tiny-{arch}", inner_params=tiny_inner(arch), archive=str(archive) if archive else None,
                  accumulate_bs=1, train_steps=30, val_interval=10, val_records=4, c_edit=1.0, lr=1e-3)
    if kind == "MEND":
        return MENDHyperParams.from_dict({**common, "rank": 16, "edit_lr": 1e-2, "lr_lr": 1e-3, **overrides})
    from baselines.efk.efk_hparams import KEHyperParams

    return KEHyperParams.from_dict({**common, "hidden_dim": 32, "condition_dim": 32, "lr": 1e-2, **overrides})


def tiny_examples():
    return [record_example(r) for r in tiny_records()]


def train_tiny(kind: str, arch: str, out: Path, steps: int = 30, **overrides) -> EditorTrainer:
    model, tok = make_model(arch), make_tokenizer()
    hp = tiny_editor_hparams(kind, arch, archive=out, train_steps=steps, **overrides)
    trainer = EditorTrainer(kind, model, tok, hp, tiny_examples(), tiny_examples()[:4], out, progress=False)
    trainer.train()
    return trainer


def target_nll(model, tok, prompt=PROMPT, target="Rome") -> float:
    return score_targets(model, tok, [prompt], [target])[0].nll


def run_cli_two_edits(kind: str, tmp_path: Path) -> Path:
    """Train a tiny editor, point a TinyWorld hparams file at it and run 2 edits with roll-back."""
    from experiments.evaluate import main

    world = TinyWorld(tmp_path, "llama")
    ckpt = tmp_path / f"{kind}.pt"
    trainer = train_tiny(kind, "llama", ckpt, steps=10)
    hp = world.write_hparams(kind, trainer.hparams.to_dict())
    run_dir = main(world.cli_args(kind, hp, dataset_size_limit=6, edit_times=2))
    edits = sorted(run_dir.glob("edit_*_on_case_*.json"))
    assert len(edits) == 2
    for path in edits:
        record = json.loads(path.read_text())
        assert record["edit"]["editor"] == kind and record["edit"]["update_norm"] > 0
        assert record["rollback"]["update_norm"] > 0
        assert set(record["edit"]["per_weight"]) == set(trainer.hparams.inner_params)
        assert record["post"]["rewrite_prompts_correct"] is not None
    assert (run_dir / "retention_of_edit_2.json").is_file()
    return run_dir


# -- the factors ---------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_gradient_factors_reproduce_the_weight_gradient(arch):
    """sum_i delta_i x_i^T equals autograd's gradient of the edit NLL w.r.t. each weight."""
    model, tok = make_model(arch), make_tokenizer()
    params = inner_params(model, tiny_inner(arch))
    batch = make_batch(tok, segments_of(request_example(REQUEST)), torch.device("cpu"))
    factors, _, loss = gradient_factors(EditRunner(model, batch, 2, "fast"), params)
    weights = [nethook.get_parameter(model, p.name) for p in params]
    for w in weights:
        w.requires_grad_(True)
    try:
        runner = EditRunner(model, batch, 2, "reference")
        from baselines.mend.functional import token_nll

        ref_loss = token_nll(runner.logits(), batch, batch.positions_of("inner"))
        grads = torch.autograd.grad(ref_loss, weights)
    finally:
        for w in weights:
            w.requires_grad_(False)
    assert torch.allclose(loss, ref_loss.detach(), atol=1e-5)
    for p, g in zip(params, grads):
        mine = factors[p.name].gradient()
        mine = mine.T if p.transposed else mine
        assert torch.allclose(mine, g, atol=1e-6, rtol=1e-4), p.name


def test_fast_and_reference_passes_agree_with_replaced_weights():
    model, tok = make_model("gpt2"), make_tokenizer()
    params = inner_params(model, tiny_inner("gpt2"))
    batch = make_batch(tok, segments_of(record_example(tiny_records()[0])), torch.device("cpu"))
    weights = {p.name: 1.5 * nethook.get_parameter(model, p.name) for p in params}
    fast = EditRunner(model, batch, 2, "fast").logits(weights)
    ref = EditRunner(model, batch, 2, "reference").logits(weights)
    assert fast.shape == ref.shape and torch.allclose(fast, ref, atol=1e-4)
    assert not torch.allclose(fast, EditRunner(model, batch, 2, "fast").logits(), atol=1e-3)


# -- training and checkpoints --------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_training_lowers_the_editing_loss(arch, tmp_path):
    trainer = train_tiny("MEND", arch, tmp_path / "mend.pt")
    first, last = trainer.history[0], trainer.history[-1]
    assert first["step"] == 0 and last["step"] == 30
    assert last["edit_nll"] < first["edit_nll"] - 0.1
    assert (tmp_path / "mend.pt").is_file() and (tmp_path / "mend.json").is_file()


def test_saved_checkpoint_reloads_to_identical_edits(tmp_path):
    trainer = train_tiny("MEND", "gpt2", tmp_path / "mend.pt", steps=10)
    model, tok = trainer.model, trainer.tok
    trainer.editor.eval()
    mine = compute_edit(model, tok, trainer.editor, REQUEST, trainer.hparams, RunnerFactory())
    loaded, raw = load_editor("MEND", model, trainer.hparams)
    again = compute_edit(model, tok, loaded, REQUEST, trainer.hparams, RunnerFactory())
    assert raw["step"] == 10
    for name in mine.updates:
        assert torch.equal(mine.updates[name], again.updates[name])


def test_resumed_training_continues_exactly(tmp_path):
    hp_over = dict(accumulate_bs=2, val_interval=2)
    straight = train_tiny("MEND", "llama", tmp_path / "a.pt", steps=6, **hp_over)
    train_tiny("MEND", "llama", tmp_path / "b.pt", steps=2, **hp_over)
    model, tok = make_model("llama"), make_tokenizer()
    hp = tiny_editor_hparams("MEND", "llama", archive=tmp_path / "b.pt", train_steps=6, **hp_over)
    resumed = EditorTrainer("MEND", model, tok, hp, tiny_examples(), tiny_examples()[:4], tmp_path / "b.pt",
                            resume=True, progress=False)
    assert resumed.step == 2
    resumed.train()
    a, b = straight.editor.state_dict(), resumed.editor.state_dict()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    from baselines.mend.checkpoints import EditorCheckpointMismatchError

    train_tiny("MEND", "llama", tmp_path / "m.pt", steps=2, val_interval=2)
    hp = tiny_editor_hparams("MEND", "llama", archive=tmp_path / "m.pt", rank=8)
    with pytest.raises(EditorCheckpointMismatchError, match="rank"):
        load_editor("MEND", make_model("llama"), hp)


def test_train_cli_writes_resumes_and_refuses_to_overwrite(tmp_path):
    from baselines.mend.train import main

    world = TinyWorld(tmp_path, "llama")
    ckpt = tmp_path / "cli.pt"
    hp = world.write_hparams("MEND", tiny_editor_hparams("MEND", "llama", archive=ckpt, val_interval=2).to_dict())
    args = ["--editor", "MEND", "--model_name", str(world.model_dir), "--hparams_fname", str(hp), "--ds_name", "zsre",
            "--val_records", "2", "--final_val_records", "2"]
    report = main(args + ["--train_steps", "2"])
    assert report["steps"] == 2 and ckpt.is_file() and report["held_out"]["n_records"] == 2
    with pytest.raises(FileExistsError, match="--resume"):
        main(args + ["--train_steps", "4"])
    assert main(args + ["--train_steps", "4", "--resume"])["steps"] == 4
    history = json.loads(ckpt.with_suffix(".json").read_text())["history"]
    assert [h["step"] for h in history] == [0, 2, 4]


# -- applying edits ------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_executor_edit_moves_the_model_toward_the_target(arch, tmp_path):
    trainer = train_tiny("MEND", arch, tmp_path / "mend.pt")
    model, tok = make_model(arch), make_tokenizer()
    record = tiny_records()[0]
    before = target_nll(model, tok)
    w = nethook.get_parameter(model, trainer.hparams.inner_params[0]).clone()
    edited, orig = MendRewriteExecutor().apply_to_model(model, tok, record["requested_rewrite"], trainer.hparams,
                                                        copy=True, return_orig_weights=True)
    assert torch.equal(nethook.get_parameter(model, trainer.hparams.inner_params[0]), w)  # copy=True
    assert set(orig) == set(trainer.hparams.inner_params) and torch.equal(orig[trainer.hparams.inner_params[0]], w)
    after = target_nll(edited, tok)
    assert after < before - 0.5, (before, after)
    # apply_mend_to_model (ROME's apply contract, over the run's editor) makes the same edit
    from baselines.mend import apply_mend_to_model

    again, _ = apply_mend_to_model(model, tok, [record["requested_rewrite"]], trainer.hparams, copy=True)
    name = trainer.hparams.inner_params[0]
    assert torch.allclose(nethook.get_parameter(again, name), nethook.get_parameter(edited, name), atol=1e-6)


def test_missing_official_checkpoint_names_the_file_and_the_url():
    hp = MENDHyperParams.from_json(HPARAMS_DIR / "MEND" / "gpt2-xl.json")
    if hp.archive_path().exists():
        pytest.skip("the official file is present")
    with pytest.raises(EditorCheckpointMissingError) as info:
        MendRewriteExecutor().apply_to_model(make_model("gpt2"), make_tokenizer(), REQUEST, hp)
    msg = str(info.value)
    assert "baselines/mend/weights/mend-10tok-gpt2-xl.pt" in msg
    assert "https://rome.baulab.info/data/weights/mend-10tok-gpt2-xl.pt" in msg
    assert "python -m baselines.mend.train" in msg


def test_every_mend_hparams_file_names_its_checkpoint():
    for path in sorted((HPARAMS_DIR / "MEND").glob("*.json")):
        hp = MENDHyperParams.from_json(path)
        assert hp.archive and hp.archive.startswith("baselines/mend/weights/"), path


# -- the official file layout ---------------------------------------------------------------------
def _official_mend_state(model, hp: MENDHyperParams, seed: int = 1) -> dict:
    """A state dict in the MEND code base's layout for the tiny model, with random values."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    params = inner_params(model, hp.inner_params)
    shapes = {}
    for p in params:
        shapes.setdefault(str((p.in_features, p.out_features)), (p.in_features, p.out_features, []))[2].append(p.name)
    state = {}
    for key, (x_dim, d_dim, names) in shapes.items():
        dim, mid = x_dim + d_dim, min(hp.rank, x_dim + d_dim)
        for i in range(hp.n_hidden + 1):
            pre = f"gtn.{key}.mlp.layers.{i}."
            state[pre + "u"], state[pre + "v"], state[pre + "bias"] = 0.05 * rnd(dim, mid), 0.05 * rnd(mid, dim), 0.1 * rnd(dim)
            state[pre + "mode_scale.weight"] = 1 + 0.1 * rnd(len(names), dim)
            state[pre + "mode_shift.weight"] = 0.1 * rnd(len(names), dim)
        for side, n in (("u", x_dim), ("v", d_dim)):
            state[f"gtn.{key}.{side}_mean"] = 0.1 * rnd(n)
            state[f"gtn.{key}.{side}_std"] = 0.5 + rnd(n).abs()
            state[f"gtn.{key}.{side}_s"] = rnd(n).abs()
        state[f"gtn.{key}.k"] = torch.tensor([123.0])
    state["edit_lrs"] = 1e-2 * rnd(len(params))
    return state


def _reference_mend_update(state: dict, hp: MENDHyperParams, p, mode: int, index: int, x, delta) -> torch.Tensor:
    """The MEND code base's edit, written out directly: returns the new weight minus the old one."""
    key = f"gtn.{str((p.in_features, p.out_features))}."
    keep = (x != 0).any(-1) & (delta != 0).any(-1)
    u = (x[keep] - state[key + "u_mean"]) / (state[key + "u_std"] + 1e-7)
    v = (delta[keep] - state[key + "v_mean"]) / (state[key + "v_std"] + 1e-7)
    h = torch.cat((u, v), -1)
    for i in range(hp.n_hidden + 1):
        pre = key + f"mlp.layers.{i}."
        act = (state[pre + "u"] @ (state[pre + "v"] @ h.T)).T + state[pre + "bias"]
        act = act * state[pre + "mode_scale.weight"][mode] + state[pre + "mode_shift.weight"][mode]
        h = h + act.clamp(min=0)
    xt, dt = h[:, : p.in_features], h[:, p.in_features :]
    grad = torch.einsum("bi,bj->ij" if p.transposed else "bi,bj->ji", xt, dt)
    return state["edit_lrs"][index] * grad


def test_official_layout_loads_and_edits_as_the_reference(tmp_path):
    """A GPT-2 file in the official archive layout (pickled config, 'gtn.' keys, + lr convention)."""
    model, tok = make_model("gpt2"), make_tokenizer()
    path = tmp_path / "mend-10tok-tiny.pt"
    hp = tiny_editor_hparams("MEND", "gpt2", archive=path, rank=8)
    state = _official_mend_state(model, hp)
    torch.save({"model": {**state, "model_config": GPT2Config(n_layer=4)}, "opt": {"state": {}, "param_groups": []},
                "lr_opt": None, "val_stats": {"loss/total_edit_val": 1.0}, "step": 7, "elapsed_time": 1.0}, path)
    editor, raw = load_editor("MEND", model, hp)
    assert raw["step"] == 7 and torch.allclose(editor.edit_lrs, -state["edit_lrs"])
    params = inner_params(model, hp.inner_params)
    batch = make_batch(tok, segments_of(request_example(REQUEST), False, False), torch.device("cpu"))
    factors, _, _ = gradient_factors(EditRunner(model, batch, 2, "fast"), params)
    with torch.no_grad():
        ours = editor.updates(factors)
    modes = {"(256, 64)": 0, "(64, 256)": 0}
    for index, p in enumerate(params):
        key = str((p.in_features, p.out_features))
        ref = _reference_mend_update(state, hp, p, modes[key], index, factors[p.name].x, factors[p.name].delta)
        modes[key] += 1
        assert ours[p.name].shape == nethook.get_parameter(model, p.name).shape
        assert torch.allclose(ours[p.name], ref, atol=1e-5, rtol=1e-4), p.name


def test_official_mapping_rejects_unknown_keys():
    with pytest.raises(KeyError, match="unexpected key"):
        map_official_mend_state({"edit_lrs": torch.zeros(1), "mend.(1, 2).mystery": torch.zeros(1)})


# -- the evaluate CLI ----------------------------------------------------------------------------
def test_evaluate_cli_runs_two_mend_edits_with_rollback(tmp_path):
    run_dir = run_cli_two_edits("MEND", tmp_path)
    assert json.loads((run_dir / "params.json").read_text())["rank"] == 16


@pytest.mark.slow
def test_mend_pass_on_smollm2_fast_equals_reference(smollm2):
    """The cached-prefix pass reproduces the full model with replaced weights on the real architecture."""
    model, tok = smollm2
    names = [f"model.layers.{layer}.mlp.{m}.weight" for layer in (28, 29) for m in ("down_proj", "up_proj")]
    params = inner_params(model, names)
    batch = make_batch(tok, segments_of(record_example(tiny_records()[0])), torch.device("cpu"))
    fast_runner = EditRunner(model, batch, 28, "fast")
    factors, _, _ = gradient_factors(fast_runner, params)
    weights = {p.name: nethook.get_parameter(model, p.name) - 1e-3 * (f.gradient().T if p.transposed else f.gradient())
               for p, f in ((p, factors[p.name]) for p in params)}
    fast = fast_runner.logits(weights)
    ref = EditRunner(model, batch, 28, "reference").logits(weights)
    assert torch.allclose(fast, ref, atol=1e-3, rtol=1e-4)
