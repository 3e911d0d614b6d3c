"""What UltraEdit reads from the model: each edited module's input k and loss gradient g at the answer.

Upstream (XiaojieGu/UltraEdit 0beb222, ``data/base.py``, ``data/zsre.py``, ``editor/ultraedit.py``
``cache``, ``util.py`` ``Tracer``): a row is the prompt (with the tokenizer's special tokens) followed
by the answer's tokens but its last, " " + answer tokenized without special tokens; the labels are
the answer's tokens, placed at the last prompt token and the answer positions before the last
(``token: ans``). A turn's edits are sorted by length, longest first (a stable sort), and cut into
sub-batches of ``sub_batch_size``, right-padded. Per sub-batch: one forward, the cross-entropy over
every answer token of the sub-batch (the mean), one backward; at each labelled position k = the
module's input and g = the gradient of that loss w.r.t. the module's output, in float32.

Upstream takes g from a full backward hook with the edited weights set to require gradients (the
weights' gradients are computed and never read). Here a zero tensor that requires gradients is added
to each edited module's output and g is the loss's gradient w.r.t. it: the same number, no weight
gradients. The loss is taken in float32 (upstream: in the model's dtype, bfloat16 in its runs).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedTokenizerBase

from util import nethook
from util.scoring import pad_right, pad_token_id, prompt_ids, target_ids


@dataclasses.dataclass
class SubBatch:
    """Right-padded rows of some edits, and the (row, position, label) of every answer token."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor
    labels: torch.Tensor


def edit_row(tok: PreTrainedTokenizerBase, request: dict) -> tuple[list[int], list[int]]:
    """(input ids, the answer's ids): prompt + answer[:-1]; position len(prompt) - 1 + j predicts answer[j]."""
    prompt = prompt_ids(tok, request["prompt"].format(request["subject"]))
    answer = target_ids(tok, request["target_new"]["str"])
    return prompt + answer[:-1], answer


def turn_sub_batches(tok: PreTrainedTokenizerBase, requests: Sequence[dict], size: int,
                     device: torch.device) -> list[SubBatch]:
    """The turn's edits, longest first (stable), in sub-batches of ``size`` (upstream's collate_fn)."""
    made = [edit_row(tok, r) for r in requests]
    made = sorted(made, key=lambda row: len(row[0]), reverse=True)
    batches = []
    for start in range(0, len(made), size):
        chunk = made[start:start + size]
        ids, mask = pad_right([ids for ids, _ in chunk], pad_token_id(tok), device)
        rows, cols, labels = [], [], []
        for i, (ids_i, answer) in enumerate(chunk):
            last_prompt = len(ids_i) - len(answer)  # the position that predicts answer[0]
            rows += [i] * len(answer)
            cols += range(last_prompt, last_prompt + len(answer))
            labels += answer
        as_t = lambda xs: torch.tensor(xs, dtype=torch.long, device=device)  # noqa: E731
        batches.append(SubBatch(ids, mask, as_t(rows), as_t(cols), as_t(labels)))
    return batches


def keys_and_gradients(model: nn.Module, batch: SubBatch, module_names: Sequence[str]
                       ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(k, g) of every module at the sub-batch's answer positions, rows in (row, position) order, float32."""
    probes: dict[str, torch.Tensor] = {}

    def probe(out: Any, name: str) -> Any:
        probes[name] = torch.zeros_like(out, requires_grad=True)
        return out + probes[name]

    with torch.enable_grad(), nethook.TraceDict(model, module_names, retain_input=True, retain_output=False,
                                                edit_output=probe) as traces:
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
        answer_logits = logits[batch.rows.to(logits.device), batch.cols.to(logits.device)].float()
        loss = F.cross_entropy(answer_logits, batch.labels.to(logits.device))
        grads = torch.autograd.grad(loss, [probes[name] for name in module_names])
    out = {}
    for name, grad in zip(module_names, grads):
        inp = traces[name].input
        rows, cols = batch.rows.to(inp.device), batch.cols.to(inp.device)
        out[name] = (inp[rows, cols].detach().float(), grad[rows, cols].detach().float())
    return out

