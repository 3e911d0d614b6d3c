"""The one value optimisation of the project: find the vector that makes a request's target likely.

ROME injects the delta at the output of W_l (its v*), MEMIT and AlphaEdit at a block's output (their
z), and WilKE calls ROME's. ``prepare_request`` does the layer-independent work once per request
(prompts tokenized, the forward strategy with block inputs captured), so a WilKE scan shares it
across its candidate layers. The loss follows ROME's
code: mean target NLL over the rewriting prompts, ``kl_factor`` times the KL divergence at the
subject token of "{} is a" (as ROME's code computes it, KL(current || initial)), and
``v_weight_decay * ||delta|| / ||v0||^2``; Adam; early stop below ``v_early_stop_loss``; after each
step ||delta|| is clamped to ``clamp_norm_factor * ||v0||``.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Optional, Sequence

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from editing.forward import PromptBatch, Strategy, verified_forward
from editing.hparams import LocateEditHyperParams
from editing.representations import fact_token_index
from util import nethook
from util.architectures import num_layers, text_config, weight_out_in
from util.placement import module_device, working_dtype
from util.scoring import model_device, pad_right, pad_token_id, prompt_ids, target_ids

LOG = logging.getLogger(__name__)
KL_PROMPT = "{} is a"


@dataclasses.dataclass
class ValueProblem:
    """The prompts of one request's optimisation, tokenized once and shared by every candidate layer."""

    batch: PromptBatch  # rows/cols: every target position of the rewriting prompts, then the KL position
    fact_rows: torch.Tensor  # one entry per prompt: where the delta is injected
    fact_cols: torch.Tensor
    n_rewrite: int
    target: list[int]
    n_read_rewrite: int  # how many of batch.rows belong to rewriting prompts


def build_value_problem(
    tok: PreTrainedTokenizerBase,
    request: dict,
    context_templates: Sequence[str],
    fact_token: str,
    device: torch.device,
) -> ValueProblem:
    tgt = target_ids(tok, request["target_new"]["str"])
    stem = tok.decode(tgt[:-1]) if len(tgt) > 1 else ""
    rewriting = [ctx.format(request["prompt"]) + stem for ctx in context_templates]
    templates = rewriting + [KL_PROMPT]
    subject = request["subject"]
    seqs, fact_cols, rows, cols = [], [], [], []
    for i, template in enumerate(templates):
        ids = prompt_ids(tok, template.format(subject))
        seqs.append(ids)
        fact_cols.append(fact_token_index(tok, template, subject, fact_token))
        if i < len(rewriting):
            # the target tokens occupy the last len(tgt)-1 positions plus the next one
            end = len(ids)
            for j in range(len(tgt)):
                rows.append(i)
                cols.append(end - len(tgt) + j)
        else:
            rows.append(i)
            cols.append(fact_cols[-1])
    ids, mask = pad_right(seqs, pad_token_id(tok), device)
    as_t = lambda xs: torch.tensor(xs, dtype=torch.long, device=device)  # noqa: E731
    return ValueProblem(
        batch=PromptBatch(ids, mask, as_t(rows), as_t(cols)),
        fact_rows=torch.arange(len(templates), device=device),
        fact_cols=as_t(fact_cols),
        n_rewrite=len(rewriting),
        target=tgt,
        n_read_rewrite=len(rewriting) * len(tgt),
    )


@dataclasses.dataclass
class ValueResult:
    v_star: torch.Tensor  # v0 + delta, in the output space of the injected module
    v0: torch.Tensor  # the module's output at the first prompt's fact token, before editing
    delta: torch.Tensor
    steps: int  # forward passes run
    losses: list[float]  # total loss per forward pass
    deltas: list[torch.Tensor]  # the delta each pass ran with: what a run of i passes would have returned


def _main_tensor(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def optimise_value(
    model: nn.Module,
    problem: ValueProblem,
    forward: Strategy,
    inject_module: str,
    start_block: int,
    hparams: LocateEditHyperParams,
    clamp_norm_factor: Optional[float] = None,
) -> ValueResult:
    """Find the delta at ``inject_module``'s output (fact token of every prompt) that makes the target likely.

    The delta lives on the injected module's device in the working precision (float32 for a
    half-precision model, whose forward passes stay in its own dtype); the losses are float32.
    """
    module = nethook.get_module(model, inject_module)
    width = _output_width(model, inject_module)
    dtype = working_dtype(next(model.parameters()).dtype)
    delta = torch.zeros(width, device=module_device(module), dtype=dtype, requires_grad=True)
    state: dict[str, Any] = {"v0": None}
    rows, cols = forward.positions(problem.fact_rows, problem.fact_cols)

    def edit(out: Any, _name: str) -> Any:
        hidden = _main_tensor(out)
        r, c = rows.to(hidden.device), cols.to(hidden.device)
        if state["v0"] is None:
            state["v0"] = hidden[0, c[0]].detach().to(dtype).clone()
        hidden = hidden.clone()
        hidden[r, c] = hidden[r, c] + delta.to(hidden.device, hidden.dtype)
        if isinstance(out, tuple):
            return (hidden,) + tuple(out[1:])
        return hidden

    optimiser = torch.optim.Adam([delta], lr=hparams.v_lr)
    tgt = torch.tensor(problem.target)
    n_t = len(problem.target)
    clamp = hparams.clamp_norm_factor if clamp_norm_factor is None else clamp_norm_factor
    kl_init: Optional[torch.Tensor] = None
    losses: list[float] = []
    deltas: list[torch.Tensor] = []
    steps = 0
    for it in range(hparams.v_num_grad_steps):
        optimiser.zero_grad()
        deltas.append(delta.detach().clone())
        logits = forward.logits(start_block, inject_module, edit)
        steps += 1
        logp = torch.log_softmax(logits.float(), dim=-1)
        tgt = tgt.to(logp.device)
        rew = logp[: problem.n_read_rewrite].view(problem.n_rewrite, n_t, -1)
        nll = -rew.gather(2, tgt.expand(problem.n_rewrite, n_t)[..., None]).squeeze(2).sum(1) / n_t
        kl_logp = logp[problem.n_read_rewrite :]
        if kl_init is None:
            kl_init = kl_logp.detach().clone()
        kl = hparams.kl_factor * torch.nn.functional.kl_div(kl_init, kl_logp, log_target=True, reduction="batchmean")
        decay = hparams.v_weight_decay * (delta.norm() / state["v0"].norm() ** 2)
        loss = nll.mean() + kl + decay.to(nll.device)
        losses.append(float(loss.detach()))
        if losses[-1] < hparams.v_early_stop_loss or it == hparams.v_num_grad_steps - 1:
            break
        loss.backward()
        optimiser.step()
        max_norm = clamp * state["v0"].norm().to(delta.device)
        with torch.no_grad():
            if delta.norm() > max_norm:
                delta.mul_(max_norm / delta.norm())
    LOG.debug("value optimisation at %s: %d passes, loss %.4f -> %.4f", inject_module, steps, losses[0], losses[-1])
    delta = delta.detach()
    return ValueResult(v_star=state["v0"] + delta, v0=state["v0"], delta=delta, steps=steps, losses=losses, deltas=deltas)


def _output_width(model: nn.Module, inject_module: str) -> int:
    """Width of the injected module's output, read from its weight when it has one."""
    module = nethook.get_module(model, inject_module)
    if hasattr(module, "weight") and module.weight is not None and module.weight.dim() == 2:
        return int(weight_out_in(module).shape[0])
    cfg = text_config(model)
    return int(getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd"))


@dataclasses.dataclass
class PreparedRequest:
    """A request with its value problem and forward strategy, ready for any injection layer."""

    request: dict
    context_templates: list[str]
    problem: ValueProblem
    forward: Strategy


def prepare_request(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    request: dict,
    hparams: LocateEditHyperParams,
    resources: Any,
    first_layer: int,
) -> PreparedRequest:
    """Templates, tokenized prompts and the fastest verified forward from block ``first_layer`` up."""
    templates = resources.context_templates(model, tok, hparams.template_spec)
    problem = build_value_problem(tok, request, templates, hparams.fact_token, model_device(model))
    forward = verified_forward(
        hparams.implementation,
        model,
        problem.batch,
        hparams.layer_module_tmp,
        num_layers(model),
        hparams.v_loss_layer,
        hparams.ln_f_module,
        first_block=first_layer,
        probe_module=hparams.rewrite_module_tmp.format(first_layer),
        checked=resources.forward_checked,
        anchor_cols=problem.fact_cols,
    )
    return PreparedRequest(request, templates, problem, forward)
