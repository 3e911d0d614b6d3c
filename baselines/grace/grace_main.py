"""GRACE (Hartvigsen et al., NeurIPS 2023): a codebook at one layer; the weights never change.

An edit: if the model (its codebook on) already completes the prompt with the target, nothing is
done (upstream edits only errors). Otherwise the query q = the watched module's input at the
prompt's last token (upstream's ``key_id``: the last token before the labels) is placed in the
codebook (codebook.py), and the value of the key q falls to is trained with Adam (``edit_lr``,
``n_iter`` steps, no early stop) on the mean NLL of the target tokens. Keys and radii never move
during the training, as upstream's only change them at iteration 0.

Where this differs from upstream and why: upstream replaces the output at one token position, the
one its ``key_id`` names (``replace_last``, EasyEdit's setting) or the positions before it
(``replace_prompt``, the original's GPT2-XL setting); at evaluation it learns ``key_id`` from the
labels, which this harness's metrics never pass (they score prompt + target in one batch, right
padded). Here every position is its own query: wherever the module's input lies within a key's
radius, that key's value replaces the module's output there, in training and at inference alike.
At the edited prompt's last token this is exactly ``replace_last``; elsewhere it applies GRACE's
own rule to each position, so a paraphrase or neighbour is routed by its own activations.
Labels are compared as target token ids (upstream compares the mean of the whole label tensor,
prompt mask included, which calls two same-answer edits with prompts of different lengths a
conflict and two different answers with equal means the same).
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from baselines.grace.codebook import Codebook
from baselines.grace.grace_hparams import GRACEHyperParams
from editing.forward import PromptBatch
from editing.memory_layer import edit_forward, logits_at, module_io, watch_output
from editing.requests import normalise_request
from editing.resources import EditResources
from util import nethook
from util.scoring import model_device, pad_right, pad_token_id, prompt_ids, score_targets, target_ids

if TYPE_CHECKING:
    pass

LOG = logging.getLogger(__name__)


def replace_hits(codebook: Codebook, inputs: torch.Tensor, output: torch.Tensor,
                 values: torch.Tensor | None = None) -> torch.Tensor:
    """``output`` with every position whose input lies in a key's radius replaced by that key's value
    (``values`` stands in for the codebook's values, with a trainable row, during an edit)."""
    hit, index = codebook.lookup(inputs.reshape(-1, inputs.shape[-1]))
    if not bool(hit.any()):
        return output
    table = codebook.values if values is None else values
    flat = output.reshape(-1, output.shape[-1]).clone()
    flat[hit] = table[index[hit]].to(flat.dtype)
    return flat.view_as(output)


@contextlib.contextmanager
def routing(model: nn.Module, hparams: GRACEHyperParams, codebook: Codebook) -> Iterator[None]:
    """The model as GRACE delivers it: the codebook consulted at the watched module."""
    module = nethook.get_module(model, hparams.module_name)
    with watch_output(module, lambda inputs, output: replace_hits(codebook, inputs, output)):
        yield


def edit_batch(tok: PreTrainedTokenizerBase, prompt: str, target: Sequence[int], device: torch.device) -> PromptBatch:
    """prompt + target as one row; the loss reads the positions that predict the target tokens."""
    p = prompt_ids(tok, prompt)
    ids, mask = pad_right([p + list(target)], pad_token_id(tok), device)
    cols = torch.arange(len(p) - 1, len(p) - 1 + len(target), device=device)
    return PromptBatch(ids, mask, torch.zeros_like(cols), cols)


def initial_value(hparams: GRACEHyperParams, codebook: Codebook, warm: torch.Tensor) -> torch.Tensor:
    """Upstream's new value: uniform [0, 1) ("cold", seeded by the edit count here) or the layer's output."""
    if hparams.val_init == "warm":
        return warm.detach().float()
    generator = torch.Generator().manual_seed(hparams.seed + codebook.n_edits)
    return torch.rand(warm.shape[-1], generator=generator)


def train_value(model: nn.Module, hparams: GRACEHyperParams, codebook: Codebook, batch: PromptBatch,
                index: int, checked: dict) -> list[float]:
    """Adam on value ``index`` for ``n_iter`` steps; returns the loss of every step."""
    strategy = edit_forward(model, hparams, batch, checked)
    target = batch.input_ids[batch.rows, batch.cols + 1]
    value = nn.Parameter(codebook.values[index].clone())
    optimizer = torch.optim.Adam([value], lr=hparams.edit_lr)
    module = nethook.get_module(model, hparams.module_name)
    losses = []
    for _ in range(hparams.n_iter):
        table = torch.cat([codebook.values[:index], value[None], codebook.values[index + 1 :]])
        with watch_output(module, lambda inputs, output, table=table: replace_hits(codebook, inputs, output, table)):
            logits = logits_at(strategy, hparams)
        loss = torch.nn.functional.cross_entropy(logits.float(), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    codebook.values[index] = value.detach()
    return losses


def execute_grace(model: nn.Module, tok: PreTrainedTokenizerBase, request: dict, hparams: GRACEHyperParams,
                  codebook: Codebook, resources: EditResources) -> dict:
    """Edit ``codebook`` (in place) with one request; returns what happened, JSON-ready."""
    req = normalise_request(request)
    prompt, target = req["prompt"].format(req["subject"]), req["target_new"]["str"]
    with routing(model, hparams, codebook):
        already = score_targets(model, tok, [prompt], [target])[0].correct
    if already:
        LOG.info("GRACE: the model already answers %r with %r; no edit (upstream edits errors only)", prompt, target)
        return {"action": "none", "n_keys": len(codebook)}
    label = tuple(target_ids(tok, target))
    batch = edit_batch(tok, prompt, label, model_device(model))
    inputs, outputs = module_io(model, hparams.module_name, batch)
    last = int(batch.cols[0])
    action, distance = codebook.place(inputs[0, last], label, lambda: initial_value(hparams, codebook, outputs[0, last]),
                                      hparams.eps, hparams.eps_expand)
    codebook.n_edits += 1
    hit, index = codebook.lookup(inputs[0, last][None])
    key = int(index[0])
    losses = train_value(model, hparams, codebook, batch, key, resources.forward_checked) if bool(hit[0]) else []
    LOG.info("GRACE %s key %d (distance %s); %d keys; loss %s", action, key, distance, len(codebook),
             f"{losses[0]:.3f} -> {losses[-1]:.3f}" if losses else "not trained (the query falls in no radius)")
    return {"action": action, "key": key, "distance": distance, "n_keys": len(codebook),
            "radius": float(codebook.epsilons[key]), "loss": [losses[0], losses[-1]] if losses else None,
            "memory_bytes": codebook.nbytes}
