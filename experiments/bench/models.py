"""The models a benchmark times: the tiny test model, the real embedded ones, and randomly
initialised models of the real shapes (GPT2-XL, Llama-3-8B) for machines without their weights.

A random model of a real shape costs what the real one costs per optimisation step, though its
optimisation converges differently; so its hparams never stop early (``v_early_stop_loss`` 0) and
fast and reference modes are compared at the same number of steps. Its tokenizer is the tiny
test tokenizer and its statistics come from a synthetic corpus written on the spot: nothing is
downloaded, which is what a GPU machine without internet or weights needs.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch

from util.architectures import ARCHITECTURES
from util.globals import load_paths

# (architecture, config fields, ROME's layer, WilKE's scanning ceiling): the papers' for GPT2-XL;
# Llama-3-8B scans 8 candidates (its 16 would hold 16 float64 covariances of 14336^2 = 26 GB)
RANDOM_SHAPES: dict[str, tuple[str, dict[str, Any], int, int]] = {
    "gpt2-xl": ("gpt2", dict(n_embd=1600, n_layer=48, n_head=25, n_positions=1024, vocab_size=50257), 17, 24),
    "llama-3-8b": ("llama", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                                 num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
                                 rope_theta=500000.0), 5, 8),
    "gpt2-tiny": ("gpt2", dict(n_embd=64, n_layer=6, n_head=4, n_positions=256, vocab_size=512), 2, 3),
    "llama-tiny": ("llama", dict(hidden_size=64, intermediate_size=224, num_hidden_layers=6, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=512, max_position_embeddings=512), 2, 3),
}


def random_model(shape: str, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """A randomly initialised model of ``shape``, built directly on ``device`` in ``dtype``."""
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    from util.tiny_models import make_tokenizer

    arch, fields, _, _ = RANDOM_SHAPES[shape]
    tok = make_tokenizer()
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    config = GPT2Config(**fields, **ids) if arch == "gpt2" else LlamaConfig(**fields, **ids, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


# the AlphaEdit paper's file of each shape family, and its edited layers on the tiny shapes
ALPHAEDIT_FILES = {"gpt2": "gpt2-xl.json", "llama": "meta-llama_Meta-Llama-3-8B.json"}


def random_shape_hparams(shape: str, corpus: Path, n_samples: int) -> dict[str, dict]:
    """The papers' hparams (ROME's GPT2-XL file; AlphaEdit's GPT2-XL or Llama-3-8B file) on the
    shape's modules, with the synthetic corpus, never stopping early."""
    arch, fields, layer, ceiling = RANDOM_SHAPES[shape]
    n_layers = fields.get("n_layer") or fields["num_hidden_layers"]
    spec = ARCHITECTURES[arch]
    modules = {name: getattr(spec, name) for name in ("rewrite_module_tmp", "layer_module_tmp", "mlp_module_tmp",
                                                      "attn_module_tmp", "ln_f_module", "lm_head_module")}
    common = dict(v_loss_layer=n_layers - 1, mom2_dataset=str(corpus), mom2_n_samples=n_samples,
                  v_early_stop_loss=0.0, mom2_max_length=256)
    rome = json.loads((load_paths().hparams_dir / "ROME" / "gpt2-xl.json").read_text())
    rome.update(**modules, **common, layers=[layer])
    alpha = json.loads((load_paths().hparams_dir / "AlphaEdit" / ALPHAEDIT_FILES[arch]).read_text())
    alpha.update(**modules, **common)
    if n_layers < 12:  # the tiny shapes: two MLPs below the top
        alpha["layers"] = [1, 2]
    return {"ROME": rome, "WilKE": {**rome, "scanning_ceiling": ceiling}, "AlphaEdit": alpha}


def synthetic_corpus(path: Path, n_texts: int = 400) -> Path:
    """Texts for timing statistics collection: sentences of the tiny test text, shuffled per text."""
    import random

    from util.tiny_models import TRAINING_TEXT

    sentences = [s.strip() for s in TRAINING_TEXT.split(".") if s.strip()]
    rng = random.Random(0)
    texts = [". ".join(rng.choice(sentences) for _ in range(rng.randint(8, 40))) + "." for _ in range(n_texts)]
    path.write_text("\n\n".join(texts))
    return path


def load_random_shape(shape: str, tmp: Path, dtype: torch.dtype, device: torch.device, n_samples: int = 200):
    """(model, tok, hparams_dir, slug, stats_dir) for a random model of ``shape``."""
    from util.tiny_models import make_tokenizer

    if shape not in RANDOM_SHAPES:
        raise ValueError(f"unknown random shape {shape!r}; choose one of {', '.join(RANDOM_SHAPES)}")
    folder = tmp / f"random-{shape}"
    hparams_dir = folder / "hparams"
    folder.mkdir(parents=True, exist_ok=True)
    corpus = synthetic_corpus(folder / "corpus.txt")
    for alg, hp in random_shape_hparams(shape, corpus, n_samples).items():
        (hparams_dir / alg).mkdir(parents=True, exist_ok=True)
        (hparams_dir / alg / f"random-{shape}.json").write_text(json.dumps(hp))
    return random_model(shape, dtype, device), make_tokenizer(), hparams_dir, f"random-{shape}", folder / "stats"


def load_bench_model(name: str, tmp: Path, dtype: torch.dtype = torch.float32, device: Optional[str] = None):
    """(model, tok, hparams_dir, slug, stats_dir): tiny and random models are built here, real ones loaded."""
    from util.models import load_model, model_slug, pick_device

    if name.startswith("random:"):
        return load_random_shape(name.split(":", 1)[1], tmp, dtype, pick_device(device))
    if name == "tiny":
        from util.tiny_models import TinyWorld, rank_one_hparams

        world = TinyWorld(tmp / "tiny", "llama", n_layer=6)
        base = rank_one_hparams("llama", 6, mom2_n_samples=200)
        world.write_hparams("ROME", base)
        world.write_hparams("WilKE", {**base, "scanning_ceiling": 5})
        world.write_hparams("AlphaEdit", {**base, "layers": [1, 2], "mom2_update_weight": 100.0, "clamp_norm_factor": 0.75,
                                          "context_template_length_params": [[10, 5]], "nullspace_threshold": 2e-2,
                                          "L2": 10.0})
        model, tok = load_model(str(world.model_dir), device=device or "cpu", dtype=dtype)
        return model, tok, world.hparams_dir, "tiny-llama", world.stats_dir
    model, tok = load_model(name, device=device, dtype=dtype)
    paths = load_paths()
    return model, tok, paths.hparams_dir, model_slug(name), paths.stats_dir
