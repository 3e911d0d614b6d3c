"""Fine-tuning baselines FT and FT-L (ROME's baselines/ft): Adam on the MLP output projections of chosen layers.

FT-L (Zhu et al. 2020, as ROME runs it) clamps every entry of the changed weights to within
``norm_constraint`` of its original value after each step; FT is the same without the clamp.
Every parameter of the chosen modules changes (weight and, for GPT-2, bias), as in the reference.

The loss is the mean teacher-forced NLL of the target_new tokens after each prompt (token j is
read at position len(prompt)-1+j). ROME's code reads every target token at the last prompt
position, which is the same for one-token targets and no likelihood for longer ones.
``execute_ft`` restores the weights and returns the deltas; ``apply_deltas`` adds them (editor.py: the editor, and ``apply_ft_to_model`` over it).
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import Iterator, Optional, Sequence

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from baselines.ft.ft_hparams import FTHyperParams
from editing.editor import snapshot_weights
from editing.requests import normalise_request
from editing.value_problems import KL_PROMPT
from util import nethook
from util.scoring import final_hidden, lm_logits, model_device, pad_right, pad_token_id, prompt_ids, target_ids

LOG = logging.getLogger(__name__)


@dataclasses.dataclass
class FTUpdate:
    deltas: dict[str, torch.Tensor]  # parameter name -> change, laid out like the parameter
    epochs: int
    final_loss: float  # mean NLL over the requests in the last epoch run


@dataclasses.dataclass
class TargetBatch:
    """Prompts followed by their targets, and where each target token is read."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor
    gold: torch.Tensor
    n_requests: int


def target_batch(tok: PreTrainedTokenizerBase, prompts: Sequence[str], targets: Sequence[str], device) -> TargetBatch:
    p_ids = [prompt_ids(tok, p) for p in prompts]
    t_ids = [target_ids(tok, t) for t in targets]
    ids, mask = pad_right([p + t for p, t in zip(p_ids, t_ids)], pad_token_id(tok), device)
    rows, cols, gold = [], [], []
    for i, (p, t) in enumerate(zip(p_ids, t_ids)):
        for j, token in enumerate(t):
            rows.append(i)
            cols.append(len(p) - 1 + j)
            gold.append(token)
    as_t = lambda xs: torch.tensor(xs, dtype=torch.long, device=device)  # noqa: E731
    return TargetBatch(ids, mask, as_t(rows), as_t(cols), as_t(gold), len(prompts))


def mean_target_nll(model: nn.Module, batch: TargetBatch) -> torch.Tensor:
    """Mean over requests of the mean NLL of each request's target tokens (differentiable)."""
    hidden = final_hidden(model, batch.input_ids, batch.attention_mask)
    logits = lm_logits(model, hidden[batch.rows, batch.cols])
    token_nll = -torch.log_softmax(logits.float(), dim=-1).gather(1, batch.gold[:, None]).squeeze(1)
    per_request = torch.zeros(batch.n_requests, device=token_nll.device).index_add(0, batch.rows, token_nll)
    counts = torch.zeros(batch.n_requests, device=token_nll.device).index_add(0, batch.rows, torch.ones_like(token_nll))
    return (per_request / counts).mean()


def kl_logprobs(model: nn.Module, tok: PreTrainedTokenizerBase, subjects: Sequence[str]) -> torch.Tensor:
    """Next-token log-probabilities after "{subject} is a", one row per subject."""
    device = model_device(model)
    seqs = [prompt_ids(tok, KL_PROMPT.format(s)) for s in subjects]
    ids, mask = pad_right(seqs, pad_token_id(tok), device)
    hidden = final_hidden(model, ids, mask)
    last = torch.tensor([len(s) - 1 for s in seqs], device=device)
    logits = lm_logits(model, hidden[torch.arange(len(seqs), device=device), last])
    return torch.log_softmax(logits.float(), dim=-1)


def trainable_parameters(model: nn.Module, hparams: FTHyperParams) -> dict[str, nn.Parameter]:
    """Every parameter of the rewrite module of each chosen layer, by full name."""
    params = {}
    for layer in hparams.layers:
        name = hparams.rewrite_module_tmp.format(layer)
        for pname, p in nethook.get_module(model, name).named_parameters():
            params[f"{name}.{pname}"] = p
    return params


@contextlib.contextmanager
def only_trainable(model: nn.Module, params: dict[str, nn.Parameter]) -> Iterator[None]:
    """Gradients on for ``params`` only; every parameter's previous flag is restored on exit."""
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    chosen = {id(p) for p in params.values()}
    try:
        for p in model.parameters():
            p.requires_grad_(id(p) in chosen)
        yield
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])


def _chunks(items: Sequence, n: int) -> Iterator[Sequence]:
    for start in range(0, len(items), n):
        yield items[start : start + n]


def _run_epochs(model, tok, requests, hparams, params, originals) -> tuple[int, float]:
    """ROME's loop: up to num_steps epochs over batches; a step is skipped when its loss is already
    below early_stop_loss, the clamp (FT-L) follows every batch, and training stops once an
    epoch's mean NLL is below early_stop_loss."""
    device = model_device(model)
    chunks = list(_chunks(requests, hparams.batch_size))
    batches = [
        target_batch(tok, [r["prompt"].format(r["subject"]) for r in c], [r["target_new"]["str"] for r in c], device)
        for c in chunks
    ]
    subjects = [[r["subject"] for r in c] for c in chunks]
    kl_init = None
    if hparams.kl_factor > 0:
        with torch.no_grad():
            kl_init = [kl_logprobs(model, tok, s) for s in subjects]
    optimiser = torch.optim.Adam(list(params.values()), lr=hparams.lr, weight_decay=hparams.weight_decay)
    eps = hparams.norm_constraint
    for epoch in range(1, hparams.num_steps + 1):
        total = 0.0
        for i, batch in enumerate(batches):
            optimiser.zero_grad()
            nll = mean_target_nll(model, batch)
            loss = nll
            if kl_init is not None:
                current = kl_logprobs(model, tok, subjects[i])
                kl = torch.nn.functional.kl_div(current, kl_init[i], log_target=True, reduction="batchmean")
                loss = loss + hparams.kl_factor * kl
            total += float(nll.detach()) * batch.n_requests
            if float(loss.detach()) >= hparams.early_stop_loss:
                loss.backward()
                optimiser.step()
            if eps is not None:
                with torch.no_grad():
                    for name, p in params.items():
                        p.copy_(torch.clamp(p, min=originals[name] - eps, max=originals[name] + eps))
        avg = total / len(requests)
        LOG.debug("FT epoch %d: mean NLL %.4f", epoch, avg)
        if avg < hparams.early_stop_loss:
            break
    return epoch, avg


def execute_ft(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    requests: Sequence[dict],
    hparams: FTHyperParams,
) -> FTUpdate:
    """Fine-tune on the requests and return the weight changes; the model is left unchanged."""
    requests = [normalise_request(r) for r in requests]
    params = trainable_parameters(model, hparams)
    originals: dict[str, torch.Tensor] = {}
    snapshot_weights(model, list(params), originals)
    try:
        with only_trainable(model, params):
            epochs, loss = _run_epochs(model, tok, requests, hparams, params, originals)
        deltas = {n: (p.detach() - originals[n]).clone() for n, p in params.items()}
    finally:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(originals[n])
    LOG.info("FT: %d epoch(s), final NLL %.4f, weights %s", epochs, loss, list(params))
    return FTUpdate(deltas, epochs, loss)


@torch.no_grad()
def apply_deltas(model: nn.Module, update: FTUpdate, weights_copy: Optional[dict[str, torch.Tensor]] = None) -> None:
    for name, delta in update.deltas.items():
        if weights_copy is not None:
            snapshot_weights(model, [name], weights_copy)
        nethook.get_parameter(model, name).add_(delta)
