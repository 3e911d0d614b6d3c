"""The official KE checkpoint (``efk-1tok-gpt2-xl.pt``) as a KENetwork.

Layout (the MEND code base's ``EFK`` wrapper, saved by its trainer under ``"model"``):
    editor.conditioners.<weight name with '_' for '.'>_conditioner.conditioners.{0,2}.{weight_g, weight_v, bias}
    editor.condition.embedding.weight                      (the LM's vocabulary, one padding row more for GPT-2)
    editor.condition.lstm._module.{weight,bias}_{ih,hh}_l0[_reverse]   (AllenNLP's Seq2Vec wrapper)
    editor.condition.linear._linear_layers.0.{weight,bias}  (AllenNLP's FeedForward, tanh)
Hyper-networks saved with the newer weight-norm parametrisation (``parametrizations.weight.original0/1``)
are accepted too.
"""
from __future__ import annotations

import re

import torch

_RULES = [
    (re.compile(r"^conditioners\.(\w+)\.conditioners\.0\.(.+)$"), r"conditioners.\1.hidden.\2"),
    (re.compile(r"^conditioners\.(\w+)\.conditioners\.2\.(.+)$"), r"conditioners.\1.out.\2"),
    (re.compile(r"^condition\.embedding\.weight$"), r"condition.embedding.weight"),
    (re.compile(r"^condition\.lstm\._module\.(.+)$"), r"condition.lstm.\1"),
    (re.compile(r"^condition\.linear\._linear_layers\.0\.(weight|bias)$"), r"condition.proj.\1"),
]
_PARAMETRISED = {"parametrizations.weight.original0": "weight_g", "parametrizations.weight.original1": "weight_v"}


def is_official_efk(state: dict) -> bool:
    return any(k.startswith("editor.conditioners.") for k in state)


def map_official_efk_state(state: dict) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key == "model_config" or key.startswith("model."):
            continue
        if not key.startswith("editor."):
            raise KeyError(f"unexpected key {key!r} in an official KE state dict")
        name = key[len("editor."):]
        for old, new in _PARAMETRISED.items():
            name = name.replace(old, new)
        for pattern, repl in _RULES:
            if pattern.match(name):
                out[pattern.sub(repl, name)] = value.float()
                break
        else:
            raise KeyError(f"unexpected key {key!r} in an official KE state dict")
    return out


def official_vocab_size(state: dict) -> int:
    """Rows of the conditioner's embedding (the reference adds a [PAD] token to GPT-2's vocabulary)."""
    return int(state["editor.condition.embedding.weight"].shape[0])
