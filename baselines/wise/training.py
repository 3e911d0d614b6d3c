"""One WISE edit: the side memory W' trained on the request under context templates, with margins
that teach the router to tell the edit's inputs from an unrelated one (EasyEdit ``WISE.edit``).

Rows: the prompt + target under every context template ("{}" and greedy continuations of "I", "You",
"Because", "Yes", "Q: ", each followed by " {}"), then one unrelated text (a zsRE question with its
answer). During the edit the watched module outputs W' a at every position of every row.
Loss = ft + margins. ft: per edit row the summed NLL of the target tokens divided by their count + 1
(upstream's label mask also counts the position before the first target token), averaged over rows.
Margins, with D = a row's mean over its tokens of ||act(W' a) - act(W a)||, D_edit per edit row and
D_irr the unrelated row's: mean+(D_irr - D_edit + gamma) + mean+(D_irr - alpha) + mean+(beta - D_edit),
mean+ being the mean of the positive entries (0 if none). SGD (``edit_lr``, ``weight_decay``) on W',
the gradient masked to the shard's mask, W' clamped to W +- ``norm_constraint`` after each step. It
stops after ``n_iter`` steps or once the loss changed by at most 1e-4 and is at most 0.02; the mean D
of the edit rows at that last forward pass enters the shard's threshold (its minimum over edits).
Upstream counts padding positions in D and in its label mask (which loses the target tokens when
the unrelated row is the longer); here they are left out.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F
from transformers import PreTrainedTokenizerBase

from baselines.wise.router import Activation, side_output, token_scores
from baselines.wise.side_memory import SideMemory
from baselines.wise.wise_hparams import WISEHyperParams
from editing.forward import PromptBatch
from editing.memory_layer import edit_forward, logits_at, watch_output
from util import nethook
from util.scoring import pad_right, pad_token_id, prompt_ids

EARLY_STOP_CHANGE, EARLY_STOP_LOSS = 1e-4, 0.02


@dataclasses.dataclass
class EditRows:
    batch: PromptBatch  # the edit rows, then the unrelated row; reads: every target position of the edit rows
    n_edit_rows: int
    n_target: int


def edit_rows(tok: PreTrainedTokenizerBase, prompt: str, target: Sequence[int], templates: Sequence[str],
              unrelated: str, device: torch.device) -> EditRows:
    seqs, rows, cols = [], [], []
    for i, template in enumerate(templates):
        p = prompt_ids(tok, template.format(prompt))
        seqs.append(p + list(target))
        rows += [i] * len(target)
        cols += range(len(p) - 1, len(p) - 1 + len(target))
    seqs.append(prompt_ids(tok, unrelated))
    ids, mask = pad_right(seqs, pad_token_id(tok), device)
    batch = PromptBatch(ids, mask, torch.tensor(rows, device=device), torch.tensor(cols, device=device))
    return EditRows(batch, len(templates), len(target))


def positive_mean(x: torch.Tensor) -> torch.Tensor:
    positive = x[x > 0]
    return positive.mean() if positive.numel() else x.new_zeros(())


def row_scores(act: Activation, original: torch.Tensor, new: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """D per row: the mean over its real tokens of ||act(W' a) - act(W a)||."""
    scores = token_scores(act, original, new)
    return (scores * real).sum(dim=1) / real.sum(dim=1)


def wise_loss(rows: EditRows, logits: torch.Tensor, scores: torch.Tensor, hparams: WISEHyperParams) -> torch.Tensor:
    target = rows.batch.input_ids[rows.batch.rows, rows.batch.cols + 1]
    nll = F.cross_entropy(logits.float(), target, reduction="none").view(rows.n_edit_rows, rows.n_target)
    ft = (nll.sum(dim=1) / (rows.n_target + 1)).mean()
    d_edit, d_irr = scores[: rows.n_edit_rows], scores[rows.n_edit_rows :]
    margins = (positive_mean(d_irr.view(-1, 1) - d_edit + hparams.gamma) + positive_mean(d_irr - hparams.alpha)
               + positive_mean(hparams.beta - d_edit))
    return ft + margins


class _StopMeter:
    """Upstream's EarlyStopMeter: the last two losses."""

    def __init__(self) -> None:
        self.previous, self.last = 0.0, 1e9

    def update(self, loss: float) -> None:
        self.previous, self.last = self.last, loss

    def stop(self) -> bool:
        return abs(self.last - self.previous) <= EARLY_STOP_CHANGE and self.last <= EARLY_STOP_LOSS


def train_side_memory(model: nn.Module, hparams: WISEHyperParams, memory: SideMemory, rows: EditRows,
                      act: Activation, checked: dict) -> list[float]:
    """Train W' on ``rows`` (memory.weight is replaced); returns the loss of every step taken."""
    module = nethook.get_module(model, hparams.module_name)
    strategy = edit_forward(model, hparams, rows.batch, checked)
    real = rows.batch.attention_mask.bool()
    weight = memory.weight.detach().clone().requires_grad_(True)
    optimizer = torch.optim.SGD([weight], lr=hparams.edit_lr, weight_decay=hparams.weight_decay)
    meter, losses, seen = _StopMeter(), [], {}

    def side(inputs: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        seen["original"], seen["new"] = output.detach(), side_output(module, inputs, weight)
        return seen["new"].to(output.dtype)

    for i in range(hparams.n_iter):
        with watch_output(module, side):
            logits = logits_at(strategy, hparams)
        scores = row_scores(act, seen["original"], seen["new"], real)
        loss = wise_loss(rows, logits, scores, hparams)
        last = meter.stop() or i == hparams.n_iter - 1
        if last:
            memory.record_activation(float(scores[: rows.n_edit_rows].mean().detach()))
        if meter.stop():
            break
        optimizer.zero_grad()
        loss.backward()
        weight.grad *= memory.mask
        optimizer.step()
        meter.update(float(loss.detach()))
        losses.append(float(loss.detach()))
        with torch.no_grad():
            low, high = memory.original - hparams.norm_constraint, memory.original + hparams.norm_constraint
            weight.copy_(torch.maximum(torch.minimum(weight, high), low))
    memory.weight = weight.detach()
    return losses
