"""The one value optimisation of the project: find the vector that makes a request's target likely.

ROME injects the delta at the output of W_l (its v*), MEMIT and AlphaEdit at a block's output (their
z), and WilKE calls ROME's. ``prepare_request`` does the layer-independent work once per request
(prompts tokenized, the forward strategy with block inputs captured), so a WilKE scan shares it
across its candidate layers. The loss follows ROME's
code: mean target NLL over the rewriting prompts, ``kl_factor`` times the KL divergence at the
subject token of "{} is a" (as ROME's code computes it, KL(current || initial)), and
``v_weight_decay * ||delta|| / ||v0||^2``; Adam; early stop below ``v_early_stop_loss``; after each
step ||delta|| is clamped to ``clamp_norm_factor * ||v0||``.

ENCORE's most-probable early stopping (MPES, ``mpes_prob_cutoff = -n``; off at 0) adds a stop, as its
``compute_z`` does: on each pass, count the target positions of the rewriting prompts after the first
(the prefixed ones; the bare prompt is left out) whose argmax is the target; a pass whose count equals
the number of those prompts increments a counter that is never reset, and the optimisation stops on
the pass that brings it to n, keeping the delta that pass ran with (no step after it). For a one-token
target that is "the target is the most probable token on every prefixed prompt". Upstream compares
the count of positions with the number of prompts (its hard-coded 5) also for longer targets, where
the pass counts when exactly that many positions are right; so does this code. Without prefixed
prompts (NAS's bare-prompt reference optimisation) it never fires: upstream's count is then 0, never 5.

Batched: the optimisations of several requests (MEMIT's z's) or of one request at several layers
(WilKE's candidates) are independent, so ``optimise_values`` runs them as row groups of one padded
batch, each injecting its own delta, and sums their losses: a group's gradient is its own loss's
gradient. Each delta is its own parameter of one Adam, so it has its own moments and step count,
and each group keeps its own early stop, clamp, KL reference and pass count: a group that stops is
left out of the backward pass and of Adam's steps (its delta frozen at the one its last pass ran
with, which is what the one-at-a-time loop returns), and when the groups still running hold half
the batch's rows or fewer, the batch is rebuilt from them. Every group's trajectory is the loop's,
within float rounding (tests/test_value_batching.py). ``optimise_in_batches`` splits the tasks by
a token budget (``v_batch_tokens`` padded prompt positions per batch; 0 runs them one by one, the
loop) and halves a batch that runs out of memory, as the statistics collection does.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from editing.forward import PromptBatch
from editing.forward_choice import Strategy, verified_forward
from editing.hparams import LocateEditHyperParams
from editing.stats_collection import is_oom
from editing.value_problems import StackedTasks, ValueProblem, ValueTask, build_value_problem, stack_tasks
from util import nethook
from util.architectures import num_layers, text_config, weight_out_in
from util.placement import module_device, working_dtype
from util.scoring import model_device

LOG = logging.getLogger(__name__)
# Padded prompt positions per batched optimisation: a MEMIT request (6 MEMIT prompts + KL, ~20 tokens) is
# about 140, a WilKE candidate (11 ROME prompts + KL) about 240; out-of-memory batches are halved.


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


class _Optimisation:
    """Per-task state of a batched optimisation, by task index: deltas (each its own Adam parameter),
    v0, the initial KL distribution, whether it still runs, its losses, the delta of each pass and
    its MPES counter."""

    def __init__(self, model: nn.Module, tasks: Sequence[ValueTask], hparams: LocateEditHyperParams):
        widths = {_output_width(model, m) for m in {t.inject_module for t in tasks}}
        if len(widths) != 1:
            raise ValueError(f"tasks optimised together must inject into outputs of one width, got {sorted(widths)}")
        device = module_device(nethook.get_module(model, tasks[0].inject_module))
        self.dtype = working_dtype(next(model.parameters()).dtype)
        self.hparams = hparams
        n, width = len(tasks), widths.pop()
        self.deltas = [torch.zeros(width, device=device, dtype=self.dtype, requires_grad=True) for _ in tasks]
        self.adam = torch.optim.Adam(self.deltas, lr=hparams.v_lr)
        self.clamps = torch.tensor([t.clamp_norm_factor for t in tasks], device=device, dtype=self.dtype)
        self.v0: Optional[torch.Tensor] = None  # tasks x width, read on the first pass
        self.kl_init: Optional[torch.Tensor] = None  # tasks x vocabulary
        self.running = [True] * n
        self.losses: list[list[float]] = [[] for _ in tasks]
        self.history: list[list[torch.Tensor]] = [[] for _ in tasks]
        self.target_lengths = [len(t.problem.target) for t in tasks]  # the bare prompt's reads come first
        self.mpes_prompts = [t.problem.n_rewrite - 1 for t in tasks]  # the prefixed rewriting prompts
        self.mpes_passes = [0] * n  # passes on which all of them were right (never reset)

    def pass_losses(self, layout: "_Layout") -> tuple[torch.Tensor, Optional[list[int]]]:
        """One forward pass of the laid-out tasks; each one's loss (in the layout's order) and, with
        MPES on, each one's count of prefixed target positions whose argmax is the target."""
        ids, stacked = layout.ids, layout.stacked
        deltas = torch.stack([self.deltas[g] if self.running[g] else self.deltas[g].detach() for g in ids])
        ran = deltas.detach().clone()
        for k, g in enumerate(ids):
            if self.running[g]:
                self.history[g].append(ran[k])
        first = self.v0 is None
        if first:
            self.v0 = torch.zeros_like(ran)
        logits = layout.forward.logits(stacked.entries, list(layout.at), self._edit(layout, deltas, first))
        logp = torch.log_softmax(logits.float(), dim=-1)
        picked = logp.gather(1, stacked.read_target[:, None].to(logp.device)).squeeze(1)
        nll = stacked.read_weights.to(logp.device) @ -picked
        kl_logp = logp[stacked.kl_reads.to(logp.device)]
        if first:
            self.kl_init = kl_logp.detach().clone()
        kl_init = self.kl_init[layout.index.to(self.kl_init.device)]
        kl = self.hparams.kl_factor * (kl_logp.exp() * (kl_logp - kl_init)).sum(1)
        decay = self.hparams.v_weight_decay * (deltas.norm(dim=1) / self.v0[layout.index].norm(dim=1) ** 2)
        correct = self._prefixed_hits(layout, logp) if self.hparams.mpes_prob_cutoff else None
        return nll + kl + decay.to(nll.device), correct

    def _prefixed_hits(self, layout: "_Layout", logp: torch.Tensor) -> list[int]:
        """Per laid-out task: how many target positions of its prefixed rewriting prompts have the
        target as argmax (its rewriting reads, prompt by prompt, less the bare prompt's first ones)."""
        rewriting = layout.stacked.read_weights.to(logp.device) > 0
        bare = torch.tensor([self.target_lengths[g] for g in layout.ids], device=logp.device)
        prefixed = rewriting & (rewriting.cumsum(dim=1) > bare[:, None])
        hits = logp.detach().argmax(dim=1) == layout.stacked.read_target.to(logp.device)
        return (prefixed & hits[None, :]).sum(dim=1).tolist()

    def _edit(self, layout: "_Layout", deltas: torch.Tensor, read_v0: bool) -> Callable:
        """The output edit: each task's delta added at its fact tokens, in its own module's output."""

        def edit(out: Any, name: str) -> Any:
            hidden = _main_tensor(out)
            r, c, k, v0_r, v0_c, tasks = (t.to(hidden.device) for t in layout.at[name])
            if read_v0:
                self.v0[layout.index[tasks.to(self.v0.device)]] = hidden[v0_r, v0_c].detach().to(self.v0)
            hidden = hidden.clone()
            hidden[r, c] = hidden[r, c] + deltas[k.to(deltas.device)].to(hidden.device, hidden.dtype)
            return (hidden,) + tuple(out[1:]) if isinstance(out, tuple) else hidden

        return edit

    def step(self, loss: torch.Tensor, ids: list[int], last: bool, correct: Optional[list[int]] = None) -> None:
        """Record each running task's loss, stop those below the threshold or at MPES's count (all on
        the last pass), and take an Adam step, then the clamp, for those still running."""
        values = loss.detach().float().cpu().tolist()
        keep, stopping = [], []
        for k, g in enumerate(ids):
            if not self.running[g]:
                continue
            self.losses[g].append(values[k])
            if correct is not None and correct[k] == self.mpes_prompts[g] > 0:
                self.mpes_passes[g] += 1
            most_probable = self.hparams.mpes_prob_cutoff and self.mpes_passes[g] >= -self.hparams.mpes_prob_cutoff
            if values[k] < self.hparams.v_early_stop_loss or last or most_probable:
                self.running[g] = False
                stopping.append(g)
            else:
                keep.append(k)
        if not keep:
            return
        loss[keep].sum().backward()
        for g in stopping:
            self.deltas[g].grad = None  # Adam skips it: a stopped delta stays as its last pass ran it
        self.adam.step()
        live = [ids[k] for k in keep]
        with torch.no_grad():
            index = torch.tensor(live, device=self.v0.device)
            norms = torch.stack([self.deltas[g] for g in live]).norm(dim=1)
            max_norms = self.clamps[index] * self.v0[index].norm(dim=1)
            scales = torch.where(norms > max_norms, max_norms / norms, torch.ones_like(norms))
            for g, scale in zip(live, scales):
                self.deltas[g].mul_(scale)

    def results(self) -> list[ValueResult]:
        out = []
        for g, delta in enumerate(self.deltas):
            v0, delta = self.v0[g].clone(), delta.detach()
            out.append(ValueResult(v0 + delta, v0, delta, len(self.losses[g]), self.losses[g], self.history[g]))
        return out


@dataclasses.dataclass
class _Layout:
    """Where the tasks ``ids`` sit in a stacked batch and its forward strategy: per injected module,
    the (row, position) of each fact token with its task, and where each task's v0 is read."""

    ids: list[int]
    stacked: StackedTasks
    forward: Strategy
    index: torch.Tensor  # ids, on the deltas' device
    at: dict[str, tuple[torch.Tensor, ...]]

    @classmethod
    def of(cls, ids: list[int], stacked: StackedTasks, forward: Strategy, device: torch.device) -> "_Layout":
        at = {}
        for name in dict.fromkeys(stacked.modules):
            tasks = torch.tensor([k for k, m in enumerate(stacked.modules) if m == name], device=stacked.row_task.device)
            rows = torch.nonzero(torch.isin(stacked.row_task, tasks)).squeeze(1)
            r, c = forward.positions(rows, stacked.fact_cols[rows])
            first = stacked.first_rows[tasks]
            v0_r, v0_c = forward.positions(first, stacked.fact_cols[first])
            at[name] = (r, c, stacked.row_task[rows], v0_r, v0_c, tasks)
        return cls(ids, stacked, forward, torch.tensor(ids, device=device), at)


def optimise_values(
    model: nn.Module,
    tasks: Sequence[ValueTask],
    forward: Strategy,
    hparams: LocateEditHyperParams,
    restack: Optional[Callable[[Sequence[ValueTask], StackedTasks], Strategy]] = None,
) -> list[ValueResult]:
    """Every task's delta, optimised together in one batch (see the module docstring).

    ``forward`` runs ``stack_tasks(tasks).batch``; ``restack(tasks, stacked)`` builds the strategy of
    a smaller stack, used once the running tasks hold half the rows or fewer (without it the batch stays).
    Deltas live on the first injected module's device in the working precision (float32 for a
    half-precision model, whose forward passes stay in its own dtype); the losses are float32.
    """
    state = _Optimisation(model, tasks, hparams)
    device = state.deltas[0].device
    layout = _Layout.of(list(range(len(tasks))), stack_tasks(tasks), forward, device)
    blocks = sorted({t.start_block for t in tasks})
    where = f"layer {blocks[0]}" if len(blocks) == 1 else f"layers {blocks[0]}-{blocks[-1]}"
    bar = tqdm(total=hparams.v_num_grad_steps, desc=f"value optimisation, {len(tasks)} at {where}", unit="pass",
               leave=False, disable=None)  # None: shown on a terminal, silent in logs that are files
    for it in range(hparams.v_num_grad_steps):
        state.adam.zero_grad()
        loss, correct = state.pass_losses(layout)
        state.step(loss, layout.ids, it == hparams.v_num_grad_steps - 1, correct)
        live = [g for g in layout.ids if state.running[g]]
        bar.update()
        bar.set_postfix(running=len(live))
        if not live:
            break
        if restack is not None and len(live) < len(layout.ids) and 2 * _rows(tasks, live) <= layout.stacked.n_rows:
            running = [tasks[g] for g in live]
            stacked = stack_tasks(running)
            layout = _Layout.of(live, stacked, restack(running, stacked), device)
    bar.close()
    results = state.results()
    LOG.debug("value optimisation of %d task(s) at %s: %d-%d passes", len(tasks), sorted(set(t.inject_module for t in tasks)),
              min(r.steps for r in results), max(r.steps for r in results))
    return results


def _rows(tasks: Sequence[ValueTask], ids: Sequence[int]) -> int:
    return sum(tasks[g].problem.batch.input_ids.shape[0] for g in ids)


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

    ``forward`` runs ``problem.batch``. One task of ``optimise_values``: ROME's loop.
    """
    clamp = hparams.clamp_norm_factor if clamp_norm_factor is None else clamp_norm_factor
    return optimise_values(model, [ValueTask(problem, inject_module, start_block, clamp)], forward, hparams)[0]


def token_batches(tasks: Sequence[ValueTask], batch_tokens: int) -> list[list[int]]:
    """Consecutive tasks grouped so that a group's stacked batch (rows x widest prompt) stays within
    ``batch_tokens`` padded positions; a task beyond the budget, or every task when it is 0, alone."""
    groups: list[list[int]] = []
    rows = width = 0
    for i, task in enumerate(tasks):
        n, w = task.problem.batch.input_ids.shape
        if groups and (rows + n) * max(width, w) <= batch_tokens:
            groups[-1].append(i)
            rows, width = rows + n, max(width, w)
        else:
            groups.append([i])
            rows, width = n, w
    return groups


def optimise_in_batches(
    model: nn.Module,
    tasks: Sequence[ValueTask],
    hparams: LocateEditHyperParams,
    checked: Optional[dict],
    batch_tokens: int,
) -> list[ValueResult]:
    """Every task's result, in order, optimised in batches of at most ``batch_tokens`` padded
    prompt positions (tasks sorted by start block, then longest suffix after the fact token and
    longest prompt first, so that a batch pads little).

    ``checked`` remembers which forward strategies agree with the full pass (``verified_forward``).
    """
    order = sorted(range(len(tasks)), key=lambda i: (tasks[i].start_block, -_suffix(tasks[i]),
                                                     -tasks[i].problem.batch.input_ids.shape[1]))
    groups = token_batches([tasks[i] for i in order], batch_tokens)
    if 1 < len(groups) < len(tasks):
        LOG.info("value optimisation: %d tasks in %d batches of at most %d padded tokens", len(tasks), len(groups), batch_tokens)
    elif len(tasks) > 1 and len(groups) == len(tasks):
        LOG.info("value optimisation: %d tasks one at a time (v_batch_tokens %d holds no two)", len(tasks), batch_tokens)
    forwards = _Forwards(model, hparams, checked)
    results: list[Optional[ValueResult]] = [None] * len(tasks)
    for group in groups:
        indices = [order[j] for j in group]
        for i, result in zip(indices, _fitting(model, [tasks[i] for i in indices], hparams, forwards)):
            results[i] = result
    return results  # type: ignore[return-value]


def _suffix(task: ValueTask) -> int:
    """The longest stretch of a task's prompts from the fact token on: what a prefix-cached step runs."""
    b = task.problem.batch
    return int((b.attention_mask.sum(1) - task.problem.fact_cols.to(b.attention_mask.device)).max())


class _Forwards:
    """Forward strategies of stacked tasks, capturing block inputs as rarely as possible.

    Tasks that share one request's prompts (WilKE's candidates) get the strategy of those prompts
    alone, tiled once per task, so a batch of candidates captures no more than one candidate does.
    The last strategy built serves again a stack of the same prompts whose rows enter at or above its
    first block: candidates one at a time (or a smaller stack of them) share its capture, as the
    scan did before it was batched.
    """

    def __init__(self, model: nn.Module, hparams: LocateEditHyperParams, checked: Optional[dict]):
        self.model, self.hparams, self.checked = model, hparams, checked
        self.last: Optional[tuple[list[ValueProblem], int, Strategy]] = None

    def __call__(self, tasks: Sequence[ValueTask], stacked: StackedTasks) -> Strategy:
        first = stacked.entries.blocks[0]
        shared = all(t.problem is tasks[0].problem for t in tasks)
        problems = [tasks[0].problem] if shared else [t.problem for t in tasks]
        forward = None
        if self.last is not None:
            kept, kept_first, kept_forward = self.last
            if len(kept) == len(problems) and all(a is b for a, b in zip(kept, problems)) and kept_first <= first:
                forward = kept_forward
        if forward is None:
            forward = stacked_forward(self.model, stack_tasks(tasks[:1]) if shared else stacked, self.hparams, self.checked)
            self.last = (problems, first, forward)
        return forward.tiled(len(tasks)) if shared and len(tasks) > 1 else forward


def _fitting(model: nn.Module, tasks: list[ValueTask], hparams: LocateEditHyperParams, forwards: _Forwards) -> list[ValueResult]:
    """``optimise_values`` on the tasks, split in halves (recursively) when a batch runs out of memory;
    each half restarts its optimisations, so the results are those of the smaller batches."""
    message = ""
    try:
        stacked = stack_tasks(tasks)
        return optimise_values(model, tasks, forwards(tasks, stacked), hparams, forwards)
    except RuntimeError as e:
        if not is_oom(e) or len(tasks) == 1:
            raise
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
    # Outside the except block, so the failed attempt's frames and activations are freed.
    forwards.last = None
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    half = (len(tasks) + 1) // 2
    LOG.warning("out of memory optimising %d values in one batch (%s); retrying as %d + %d "
                "(a smaller v_batch_tokens avoids the retries)", len(tasks), message, half, len(tasks) - half)
    return _fitting(model, tasks[:half], hparams, forwards) + _fitting(model, tasks[half:], hparams, forwards)


def _output_width(model: nn.Module, inject_module: str) -> int:
    """Width of the injected module's output, read from its weight when it has one."""
    module = nethook.get_module(model, inject_module)
    if hasattr(module, "weight") and module.weight is not None and module.weight.dim() == 2:
        return int(weight_out_in(module).shape[0])
    cfg = text_config(model)
    return int(getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd"))


def _verified(model: nn.Module, batch: PromptBatch, anchor_cols: torch.Tensor, hparams: LocateEditHyperParams,
              first_layer: int, checked: Optional[dict]) -> Strategy:
    """The fastest verified forward of ``batch`` from block ``first_layer`` up (editing.forward)."""
    return verified_forward(
        hparams.implementation,
        model,
        batch,
        hparams.layer_module_tmp,
        num_layers(model),
        hparams.v_loss_layer,
        hparams.ln_f_module,
        first_block=first_layer,
        probe_module=hparams.rewrite_module_tmp.format(first_layer),
        checked=checked,
        anchor_cols=anchor_cols,
    )


def stacked_forward(model: nn.Module, stacked: StackedTasks, hparams: LocateEditHyperParams, checked: Optional[dict]) -> Strategy:
    """The forward strategy of a stack of tasks, from its lowest entry block up."""
    return _verified(model, stacked.batch, stacked.fact_cols, hparams, stacked.entries.blocks[0], checked)


@dataclasses.dataclass
class PreparedRequest:
    """A request with its value problem and (when it will be optimised alone) its forward strategy."""

    request: dict
    context_templates: list[str]
    problem: ValueProblem
    forward: Optional[Strategy]  # None where the optimisation is batched (a WilKE scan)


def prepare_request(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    request: dict,
    hparams: LocateEditHyperParams,
    resources: Any,
    first_layer: Optional[int],
) -> PreparedRequest:
    """Templates, tokenized prompts and the fastest verified forward from block ``first_layer`` up
    (no forward when ``first_layer`` is None: the problem is optimised in a batch)."""
    templates = resources.context_templates(model, tok, hparams.template_spec)
    problem = build_value_problem(tok, request, templates, hparams.fact_token, model_device(model))
    forward = None
    if first_layer is not None:
        forward = _verified(model, problem.batch, problem.fact_cols, hparams, first_layer, resources.forward_checked)
    return PreparedRequest(request, templates, problem, forward)
