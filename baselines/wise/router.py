"""WISE's memory routing: which memory answers a sequence, from activation scores at the watched layer.

For a memory M (the side memory W' or a stored shard) and a token with layer input a, the score is
||act(M a) - act(W a)||, act the model's MLP activation (upstream's ``euc``); a sequence's score is
the mean over its tokens (the largest, beyond 100 tokens). Upstream's ``WISEAdapter.forward``
(retrieve): W' answers when its score reaches act_ratio x its threshold; then each stored shard in
turn answers instead when its score exceeds both the best score so far (W''s counts even when W'
did not answer) and act_ratio x its own threshold; otherwise W. Upstream scores a whole batch as one
(the mean over the batch, then ``.item()``) and counts padding; here each sequence is routed alone,
over its real tokens (the attention mask, read from the model's call), as a batch of one is upstream.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.nn import functional as F

from baselines.wise.side_memory import SideMemory
from editing.memory_layer import watch_output
from util import nethook
from util.architectures import is_transposed

LONG_SEQUENCE = 100  # upstream: beyond this many positions a sequence's score is its largest token score
Activation = Callable[[torch.Tensor], torch.Tensor]
Observer = Callable[[torch.Tensor], None]


def side_output(module: nn.Module, inputs: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """What ``module`` would output with ``weight`` (laid out as its own) in place of its weight."""
    bias = getattr(module, "bias", None)
    if is_transposed(module):  # GPT-2's Conv1D: x W + b
        out = inputs @ weight
        return out if bias is None else out + bias
    return F.linear(inputs, weight, bias)


def token_scores(act: Activation, original: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """||act(other) - act(original)|| at every position, in float32."""
    return torch.norm(act(other.float()) - act(original.float()), dim=-1)


def sequence_scores(scores: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """One score per row: the mean over its real tokens, or their largest beyond LONG_SEQUENCE of them."""
    lengths = real.sum(dim=1)
    mean = (scores * real).sum(dim=1) / lengths.clamp(min=1)
    largest = scores.masked_fill(~real, float("-inf")).max(dim=1).values
    return torch.where(lengths > LONG_SEQUENCE, largest, mean)


def choose(memory: SideMemory, module: nn.Module, act: Activation, act_ratio: float, inputs: torch.Tensor,
           output: torch.Tensor, real: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(which candidate answers each row: 0 W, 1 W', 2.. the stored shards; the candidates' outputs)."""
    candidates = [output, side_output(module, inputs, memory.weight)]
    best = sequence_scores(token_scores(act, output, candidates[1]), real)
    choice = torch.where(best < memory.threshold * act_ratio, 0, 1)
    for weight, threshold in zip(memory.memories, memory.memory_thresholds):
        candidates.append(side_output(module, inputs, weight))
        score = sequence_scores(token_scores(act, output, candidates[-1]), real)
        take = (score > best) & (score > threshold * act_ratio)
        choice = torch.where(take, len(candidates) - 1, choice)
        best = torch.where(take, score, best)
    return choice, candidates


def route(memory: SideMemory, module: nn.Module, act: Activation, act_ratio: float, inputs: torch.Tensor,
          output: torch.Tensor, real: torch.Tensor, observe: Observer | None = None) -> torch.Tensor:
    """``output`` with each row replaced by the output of the memory that answers it (``observe`` is
    shown each forward pass's choices: 0 W, 1 W', 2.. the stored shards)."""
    choice, candidates = choose(memory, module, act, act_ratio, inputs, output, real)
    if observe is not None:
        observe(choice.detach())
    routed = output.clone()
    for k in range(1, len(candidates)):
        rows = choice == k
        routed[rows] = candidates[k][rows].to(output.dtype)
    return routed


def real_tokens(mask: torch.Tensor | None, output: torch.Tensor) -> torch.Tensor:
    """(batch, positions) bool: the attention mask's last positions (a KV-cached step sees only its own)."""
    batch, length = output.shape[0], output.shape[1]
    if mask is None or mask.dim() != 2 or mask.shape[0] != batch or mask.shape[1] < length:
        return torch.ones(batch, length, dtype=torch.bool, device=output.device)
    return mask[:, -length:].to(output.device).bool()


@contextlib.contextmanager
def routing(model: nn.Module, module_name: str, memory: SideMemory, act: Activation, act_ratio: float,
            observe: Observer | None = None) -> Iterator[None]:
    """The model as WISE delivers it: each sequence answered by the memory its scores choose (``observe``:
    see ``route``; experiments.py.wise_routing counts the choices with it)."""
    seen: dict[str, torch.Tensor | None] = {"mask": None}

    def remember_mask(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        seen["mask"] = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)

    module = nethook.get_module(model, module_name)
    handle = model.base_model.register_forward_pre_hook(remember_mask, with_kwargs=True)
    try:
        with watch_output(module, lambda x, out: route(memory, module, act, act_ratio, x, out, real_tokens(seen["mask"], out),
                                                           observe)):
            yield
    finally:
        handle.remove()
