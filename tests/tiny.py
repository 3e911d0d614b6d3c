"""Tiny randomly initialised models and a tokenizer trained on the spot: no downloads.

The tokenizer is a byte-level BPE trained on a fixed text, so it can encode any string (rare
words fall back to bytes) and is identical on every machine. Models are built from configs of
the real families (GPT-2 with Conv1D, GPT-J, Llama) so that their code paths are exercised.
"""
from __future__ import annotations

import functools

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


def make_model(arch: str = "gpt2", n_layer: int = 4, seed: int = 0, width: int = 64) -> torch.nn.Module:
    """A tiny causal LM of the given family, in eval mode with gradients off."""
    tok = make_tokenizer()
    vocab = len(tok)
    torch.manual_seed(seed)
    if arch == "gpt2":
        cfg = GPT2Config(vocab_size=vocab, n_positions=128, n_embd=width, n_layer=n_layer, n_head=4,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        model = GPT2LMHeadModel(cfg)
    elif arch == "gptj":
        cfg = GPTJConfig(vocab_size=vocab, n_positions=128, n_embd=width, n_layer=n_layer, n_head=4,
                         rotary_dim=8, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        model = GPTJForCausalLM(cfg)
    elif arch == "llama":
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=width, intermediate_size=2 * width,
                          num_hidden_layers=n_layer, num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=128, bos_token_id=tok.bos_token_id,
                          eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                          tie_word_embeddings=True)
        model = LlamaForCausalLM(cfg)
    else:
        raise ValueError(f"unknown tiny architecture {arch!r}")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model
