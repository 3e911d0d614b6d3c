"""Knowledge Neurons (Dai et al. 2022) as an editor, the way ROME's KN baseline runs it.

1. Prompts: the request's prompt under each context template (ROME's code used the bare prompt
   alone; with ``context_template_length_params`` empty that is what happens here).
2. For each prompt, integrated-gradient scores of every MLP neuron for the true target; coarse
   neurons are those above ``adaptive_threshold`` times the prompt's maximum.
3. Refine: keep neurons coarse in more than ``p`` of the prompts (all of them without ``refine``).
4. Edit (the KN code's ``edit_knowledge``): every kept neuron's value vector (column of W_l)
   gets ``edit_scale * (E[new] - E[old])``, E the input word embeddings, new the first token of
   target_new and old the first token of target_true (``old_token='argmax'``: the model's current
   prediction, as the KN code does; the two agree on records the model knows).
``execute_kn`` leaves the model unchanged; ``apply_update`` edits it (editor.py: the editor, and ``apply_kn_to_model`` over it).
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Optional

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from baselines.kn.attribution import Neuron, coarse_neurons, refined_neurons, target_scores
from baselines.kn.kn_hparams import KNHyperParams
from editing.editor import snapshot_weights
from editing.representations import template_prompts
from editing.requests import normalise_request
from editing.resources import EditResources, default_resources
from util import nethook
from util.architectures import num_layers, weight_out_in
from util.scoring import final_hidden, lm_logits, model_device, prompt_ids, target_ids

LOG = logging.getLogger(__name__)


@dataclasses.dataclass
class KNUpdate:
    """The same vector added to the value vector of each neuron."""

    neurons: list[Neuron]
    direction: torch.Tensor  # edit_scale * (E[new] - E[old]), in the projection's output space
    module_tmp: str
    n_prompts: int
    n_coarse: list[int]  # coarse neurons per prompt
    old_token: int
    new_token: int

    def weight_name(self, layer: int) -> str:
        return f"{self.module_tmp.format(layer)}.weight"

    @property
    def layers(self) -> list[int]:
        return sorted({layer for layer, _ in self.neurons})


@torch.no_grad()
def greedy_token(model: nn.Module, tok: PreTrainedTokenizerBase, text: str) -> int:
    ids = torch.tensor([prompt_ids(tok, text)], device=model_device(model))
    hidden = final_hidden(model, ids, torch.ones_like(ids))
    return int(lm_logits(model, hidden[0, -1]).argmax())


def find_neurons(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    request: dict,
    hparams: KNHyperParams,
    resources: EditResources,
) -> tuple[list[Neuron], list[int], int]:
    """(refined neurons, coarse count per prompt, number of prompts) for the request's true target."""
    layers = list(hparams.layers) if hparams.layers is not None else list(range(num_layers(model)))
    templates = resources.context_templates(model, tok, hparams.template_spec)
    prompts = [t.format(request["subject"]) for t in template_prompts(request, templates)]
    truth = target_ids(tok, request["target_true"]["str"])
    coarse = [
        coarse_neurons(target_scores(model, tok, p, truth, hparams, layers, resources), layers, hparams.adaptive_threshold)
        for p in prompts
    ]
    return refined_neurons(coarse, hparams.p, hparams.refine), [len(c) for c in coarse], len(prompts)


def execute_kn(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    request: dict,
    hparams: KNHyperParams,
    resources: Optional[EditResources] = None,
) -> KNUpdate:
    """The neurons and value-vector change KN would make for one request; the model is unchanged."""
    request = normalise_request(request)
    resources = resources or default_resources(model)
    neurons, n_coarse, n_prompts = find_neurons(model, tok, request, hparams, resources)
    new = target_ids(tok, request["target_new"]["str"])[0]
    if hparams.old_token == "argmax":
        old = greedy_token(model, tok, request["prompt"].format(request["subject"]))
    else:
        old = target_ids(tok, request["target_true"]["str"])[0]
    emb = model.get_input_embeddings().weight
    direction = hparams.edit_scale * (emb[new] - emb[old]).detach()
    LOG.info("KN: %d neuron(s) from %d prompt(s) (coarse per prompt %s)", len(neurons), n_prompts, n_coarse)
    return KNUpdate(neurons, direction, hparams.rewrite_module_tmp, n_prompts, n_coarse, old, new)


@torch.no_grad()
def apply_update(model: nn.Module, update: KNUpdate, weights_copy: Optional[dict[str, torch.Tensor]] = None) -> None:
    """Add the direction to each neuron's value vector; keep originals in ``weights_copy`` when given."""
    for layer in update.layers:
        module = nethook.get_module(model, update.module_tmp.format(layer))
        w = weight_out_in(module)
        if w.shape[0] != update.direction.shape[0]:
            raise ValueError(
                f"{update.module_tmp.format(layer)} outputs {w.shape[0]} values but the word embeddings have "
                f"{update.direction.shape[0]}; KN's edit needs them equal"
            )
        if weights_copy is not None:
            snapshot_weights(model, [update.weight_name(layer)], weights_copy)
        idx = torch.tensor([i for l, i in update.neurons if l == layer], device=w.device)
        w[:, idx] += update.direction.to(device=w.device, dtype=w.dtype)[:, None]
