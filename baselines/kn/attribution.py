"""Integrated-gradient attribution of MLP neurons (Dai et al. 2022), computed as the KN code does.

A neuron is one input coordinate of an MLP output projection W_l (its value vector is column i of
W_l viewed as (out, in)). With a = the projection's input at the prompt's last token and t the
target token, neuron i scores

    a_i / m * sum_{k=0}^{m-1} dP(t | a := alpha_k a) / da_i,   alpha = linspace(0, 1, m),

where the scaled activation replaces a at the last token only (one scaled copy per batch row). The
knowledge-neurons code patches GPT-2's ``mlp.c_fc`` output (before the GELU); here the patched
quantity is the projection's input, the neuron of the value-vector edit, for every architecture.
Because only block l and above see the patch, the fast forward starts at block l and reads
logits at one position (editing.forward.SuffixForward, checked against the full pass once per model).
"""
from __future__ import annotations

import collections
from typing import Any, Sequence

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from baselines.kn.kn_hparams import KNHyperParams
from editing.forward import PromptBatch
from editing.forward_choice import verified_forward
from editing.representations import reprs_at_tokens
from editing.resources import EditResources
from util import nethook
from util.architectures import num_layers, weight_out_in
from util.scoring import model_device, prompt_ids

Neuron = tuple[int, int]  # (layer, index of the projection's input)


def _patch_fn(module: nn.Module, scaled: torch.Tensor, position: int):
    """An edit_output that makes the module's output at ``position`` W(scaled) + b, row by row."""

    def edit(out: Any, _name: str) -> Any:
        patched = torch.nn.functional.linear(scaled, weight_out_in(module), module.bias)
        out = out.clone()
        out[:, position] = patched.to(out.dtype)
        return out

    return edit


def prompt_scores(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    text: str,
    target_token: int,
    hparams: KNHyperParams,
    layers: Sequence[int],
    resources: EditResources,
) -> torch.Tensor:
    """Integrated gradients of P(target_token | text) for every neuron of ``layers`` (len(layers) x width)."""
    device = model_device(model)
    ids = prompt_ids(tok, text)
    pos = len(ids) - 1
    names = [hparams.rewrite_module_tmp.format(l) for l in layers]
    base = reprs_at_tokens(model, tok, [text], [pos], names, track="in")
    rows = hparams.batch_size
    batch = PromptBatch(
        torch.tensor([ids] * rows, device=device),
        torch.ones(rows, len(ids), dtype=torch.long, device=device),
        torch.arange(rows, device=device),
        torch.full((rows,), pos, device=device),
    )
    n = num_layers(model)
    forward = verified_forward(
        hparams.implementation, model, batch, hparams.layer_module_tmp, n, n - 1, hparams.ln_f_module,
        first_block=min(layers), probe_module=names[0], checked=resources.forward_checked,
    )
    alphas = torch.linspace(0, 1, hparams.steps, device=device)
    scores = []
    for layer, name in zip(layers, names):
        a = base[name][0]
        module = nethook.get_module(model, name)
        grad_sum = torch.zeros_like(a)
        for chunk in alphas.split(rows):
            scaled = (chunk[:, None].to(a.dtype) * a[None]).requires_grad_(True)
            logits = forward.logits(layer, name, _patch_fn(module, scaled, pos))
            prob = torch.softmax(logits.float(), dim=-1)[:, target_token]
            grad_sum += torch.autograd.grad(prob.sum(), scaled)[0].sum(0)
        scores.append(a * grad_sum / hparams.steps)
    return torch.stack(scores)


def target_scores(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    prompt: str,
    target: Sequence[int],
    hparams: KNHyperParams,
    layers: Sequence[int],
    resources: EditResources,
) -> torch.Tensor:
    """Scores for a multi-token target: the mean over its tokens, each scored after the ones before it."""
    per_token = [
        prompt_scores(model, tok, prompt + tok.decode(list(target[:j])), int(target[j]), hparams, layers, resources)
        for j in range(len(target))
    ]
    return torch.stack(per_token).mean(0)


def coarse_neurons(scores: torch.Tensor, layers: Sequence[int], adaptive_threshold: float) -> list[Neuron]:
    """Neurons scoring above adaptive_threshold times the prompt's maximum score."""
    threshold = float(scores.max()) * adaptive_threshold
    return [(int(layers[r]), int(c)) for r, c in torch.nonzero(scores > threshold).tolist()]


def refined_neurons(coarse: Sequence[Sequence[Neuron]], p: float, refine: bool) -> list[Neuron]:
    """Neurons coarse in more than p * n_prompts prompts (every coarse neuron without refine)."""
    counts = collections.Counter(n for prompt_neurons in coarse for n in set(prompt_neurons))
    if not refine:
        return sorted(counts)
    return sorted(n for n, c in counts.items() if c > p * len(coarse))
