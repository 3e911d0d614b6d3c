"""Tiny randomly initialised models and a tokenizer trained on the spot: no downloads.

The tokenizer is a byte-level BPE trained on a fixed text, so it can encode any string (rare
words fall back to bytes) and is identical on every machine. Models are built from configs of
the real families (GPT-2 with Conv1D, GPT-J, Llama) so that their code paths are exercised.

The tests build their models here, and so does ``experiments.bench``: its ``random:`` shapes (a model of
a real size with random weights, for a GPU machine that has no weights) and its tiny CLI runs.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPTJConfig,
    GPTJForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

TRAINING_TEXT = """
The Eiffel Tower is located in the city of Paris. The Colosseum is located in Rome.
Danielle Darrieux's mother tongue is French. Thomas Joannes Stieltjes was a native speaker of Dutch.
Toko Yasuda plays the guitar. Autonomous University of Madrid is located in Spain.
The mother tongue of Edwin of Northumbria is English. Apple A5 was created by Apple.
Pietro Nenni works in the field of politics. Michael Jordan plays the sport of basketball.
Berlin is the capital of Germany. Tokyo is the capital of Japan. London is in England.
The official language of France is French. Microsoft was founded by Bill Gates.
Paris Rome Berlin Madrid London Tokyo Spain Italy France Germany Japan English French Dutch
""" * 3


# The running example of ROME's paper, used across the tests (copy before changing it).
EIFFEL_REQUEST = {
    "case_id": 0,
    "prompt": "{} is located in the city of",
    "subject": "The Eiffel Tower",
    "target_new": {"str": "Rome"},
    "target_true": {"str": "Paris"},
}
EIFFEL_PROMPT = "The Eiffel Tower is located in the city of"


@functools.lru_cache(maxsize=1)
def make_tokenizer() -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator([TRAINING_TEXT], trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    tok.padding_side = "right"
    return tok


def make_model(arch: str = "gpt2", n_layer: int = 4, seed: int = 0, width: int = 64, context: int = 128, *,
               heads: int = 4, mlp: Optional[int] = None, vocab: Optional[int] = None, device: Optional[str] = None,
               dtype: Optional[torch.dtype] = None) -> torch.nn.Module:
    """A tiny causal LM of the given family (``context`` positions), in eval mode with gradients off.

    ``heads``, ``mlp`` (MLP width), ``vocab``, ``device`` and ``dtype`` build a randomly initialised
    model of a real size where it will run (benchmarks on a GPU machine without weights)."""
    tok = make_tokenizer()
    vocab = vocab or len(tok)
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(seed)
    with torch.device(device or "cpu"):
        if arch == "gpt2":
            cfg = GPT2Config(vocab_size=vocab, n_positions=context, n_embd=width, n_layer=n_layer, n_head=heads,
                             n_inner=mlp, **ids)
            model = GPT2LMHeadModel(cfg)
        elif arch == "gptj":
            cfg = GPTJConfig(vocab_size=vocab, n_positions=context, n_embd=width, n_layer=n_layer, n_head=heads,
                             n_inner=mlp, rotary_dim=8, **ids)
            model = GPTJForCausalLM(cfg)
        elif arch == "llama":
            cfg = LlamaConfig(vocab_size=vocab, hidden_size=width, intermediate_size=mlp or 2 * width,
                              num_hidden_layers=n_layer, num_attention_heads=heads, num_key_value_heads=2,
                              max_position_embeddings=context, pad_token_id=tok.pad_token_id, tie_word_embeddings=True,
                              **ids)
            model = LlamaForCausalLM(cfg)
        else:
            raise ValueError(f"unknown tiny architecture {arch!r}")
    if dtype is not None:
        model = model.to(dtype)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


# ----------------------------------------------------------------------------------------------
# A tiny "world" for CLI tests: a saved model folder, hparams files, a data file and a corpus.

TINY_RECORDS = [
    ("The Eiffel Tower", "{} is located in the city of", "Rome", "Paris"),
    ("Danielle Darrieux", "The mother tongue of {} is", "English", "French"),
    ("Toko Yasuda", "{} plays the", "piano", "guitar"),
    ("Apple A5", "{} was created by", "Google", "Apple"),
    ("Pietro Nenni", "{} works in the field of", "music", "politics"),
    ("Michael Jordan", "{} plays the sport of", "football", "basketball"),
    ("Berlin", "{} is the capital of", "Japan", "Germany"),
    ("Tokyo", "{} is the capital of", "Germany", "Japan"),
    ("Microsoft", "{} was founded by", "Apple", "Bill Gates"),
    ("The Colosseum", "{} is located in", "Paris", "Rome"),
]


def tiny_records() -> list[dict]:
    """CounterFact-schema records over the tiny tokenizer's vocabulary."""
    records = []
    for i, (subject, prompt, new, true) in enumerate(TINY_RECORDS):
        records.append(
            {
                "case_id": 100 + i,
                "pararel_idx": None,
                "requested_rewrite": {
                    "prompt": prompt,
                    "relation_id": "P0",
                    "subject": subject,
                    "target_new": {"str": new, "id": None},
                    "target_true": {"str": true, "id": None},
                },
                "paraphrase_prompts": [f"Berlin is in Germany. {prompt.format(subject)}"],
                "neighborhood_prompts": [TINY_RECORDS[(i + 1) % len(TINY_RECORDS)][1].format(TINY_RECORDS[(i + 1) % len(TINY_RECORDS)][0])],
                "attribute_prompts": [],
                "generation_prompts": [f"{subject} is"],
            }
        )
    return records


def rank_one_hparams(arch: str, n_layer: int, **overrides) -> dict:
    """ROME-style hparams for a tiny model: settings that flip a tiny random model's answer."""
    from util.architectures import ARCHITECTURES

    spec = ARCHITECTURES[{"gpt2": "gpt2", "gptj": "gptj", "llama": "llama"}[arch]]
    hp = {
        "layers": [1],
        "fact_token": "last",
        "v_num_grad_steps": 25,
        "v_lr": 0.5,
        "v_loss_layer": n_layer - 1,
        "v_weight_decay": 0.001,
        "clamp_norm_factor": 1000.0,
        "kl_factor": 0.0625,
        "mom2_adjustment": True,
        "context_template_length_params": [[5, 2], [10, 2]],
        "rewrite_module_tmp": spec.rewrite_module_tmp,
        "layer_module_tmp": spec.layer_module_tmp,
        "mlp_module_tmp": spec.mlp_module_tmp,
        "attn_module_tmp": spec.attn_module_tmp,
        "ln_f_module": spec.ln_f_module,
        "lm_head_module": spec.lm_head_module,
        "mom2_dataset": "PLACEHOLDER",
        "mom2_n_samples": 40,
        "mom2_dtype": "float32",
    }
    hp.update(overrides)
    return hp


class TinyWorld:
    """Everything ``python -m experiments.evaluate`` needs, under one tmp folder, no downloads."""

    def __init__(self, root, arch: str = "llama", n_layer: int = 4, seed: int = 0, context: int = 128):
        import json
        from pathlib import Path

        self.root = Path(root)
        self.arch, self.n_layer = arch, n_layer
        self.model_dir = self.root / f"tiny-{arch}"
        model = make_model(arch, n_layer=n_layer, seed=seed, context=context)
        model.save_pretrained(self.model_dir)
        make_tokenizer().save_pretrained(self.model_dir)
        self.data_file = self.root / "tiny_counterfact.json"
        self.data_file.write_text(json.dumps(tiny_records()))
        self.corpus_file = self.root / "corpus.txt"
        self.corpus_file.write_text("\n\n".join(TRAINING_TEXT.strip().split(". ")))
        self.results_dir = self.root / "results"
        self.stats_dir = self.root / "stats"
        self.hparams_dir = self.root / "hparams"

    def write_hparams(self, alg: str, hparams: dict):
        import json

        path = self.hparams_dir / alg / f"tiny-{self.arch}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        hp = dict(hparams)
        if hp.get("mom2_dataset") == "PLACEHOLDER":
            hp["mom2_dataset"] = str(self.corpus_file)
        path.write_text(json.dumps(hp))
        return path

    def cli_args(self, alg: str, hparams_path, **extra) -> list[str]:
        """Arguments for experiments.evaluate.main; ``extra`` become --key=value flags."""
        args = [
            f"--alg_name={alg}",
            f"--model_name={self.model_dir}",
            f"--hparams_fname={hparams_path}",
            f"--ds_name={self.data_file}",
            f"--results_dir={self.results_dir}",
            f"--stats_dir={self.stats_dir}",
            f"--data_dir={self.root}",
            "--skip_generation_tests",
        ]
        for k, v in extra.items():
            args.append(f"--{k}" if v is True else f"--{k}={v}")
        return args
