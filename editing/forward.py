"""Three ways to run the forward passes of a value optimisation, with identical results.

``FullForward`` is what the reference code does: every optimisation step runs the whole model and
projects every position onto the vocabulary. ``SuffixForward`` uses two facts: the residual
stream entering block l does not depend on a delta injected inside block l, so it is computed
once per edit (for every candidate block at once) and each step runs only blocks l..loss layer;
and the loss reads logits at a handful of positions, so the vocabulary projection is applied only
there. ``PrefixCachedForward`` adds a third: with causal attention, no position before the fact
token can see the delta, so those positions are computed once (their keys and values cached per
block) and each step recomputes only the fact token and what follows it, about a fifth of the
tokens of a CounterFact batch. Block inputs are captured with forward pre-hooks (with kwargs), so
the blocks are re-run with exactly the masks and position embeddings the model itself gave them,
for any architecture; ``verified_forward`` (editing/forward_choice.py) checks a strategy against the
full pass, with a probe delta injected, before it is trusted. ``PrefixCachedForward`` is in
editing/forward_prefix.py.

A batched optimisation (``editing.value_optimisation``) runs several optimisations as row groups
of one batch, each injecting its own delta; the groups may inject at different blocks (WilKE's
candidate layers). ``Entries`` says which block each group's rows enter at: the strategies that
run from captured block inputs run a row only from its block up, starting it from the residual
captured there, so a batch costs what its groups cost one by one; the full pass runs every row
through every block, with nothing injected below a row's block.
"""
from __future__ import annotations

import copy
import dataclasses
import inspect
import logging
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from util import nethook
from util.nethook import EditFn
from util.scoring import lm_logits

LOG = logging.getLogger(__name__)
Positions = tuple[torch.Tensor, torch.Tensor]


@dataclasses.dataclass
class PromptBatch:
    """Padded prompts and the (row, position) pairs whose next-token logits the loss reads."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor
    position_ids: Optional[torch.Tensor] = None  # needed when rows are left-padded

    def tiled(self, copies: int) -> "PromptBatch":
        """``copies`` copies of the batch, one after another (read rows offset accordingly)."""
        n = self.input_ids.shape[0]
        rows = torch.cat([self.rows + k * n for k in range(copies)])
        positions = None if self.position_ids is None else self.position_ids.repeat(copies, 1)
        return PromptBatch(self.input_ids.repeat(copies, 1), self.attention_mask.repeat(copies, 1), rows,
                           self.cols.repeat(copies), positions)

    def run(self, model: nn.Module) -> Any:
        extra = {} if self.position_ids is None else {"position_ids": self.position_ids}
        return model(input_ids=self.input_ids, attention_mask=self.attention_mask, use_cache=False, **extra)


def _call_block(block: nn.Module, hidden: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
    out = block(hidden, *args[1:], **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


@dataclasses.dataclass(frozen=True)
class Entries:
    """The block at which each row of a batch enters the optimised part of the forward pass.

    Rows are ordered by entry block: rows ``ends[k-1] <= r < ends[k]`` enter at ``blocks[k]``
    (ascending). Below its entry block a row is the clean residual, which a strategy running from
    captured block inputs takes from the capture instead of computing it.
    """

    blocks: tuple[int, ...]
    ends: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.blocks or len(self.blocks) != len(self.ends):
            raise ValueError("Entries needs one row end per entry block")
        if list(self.blocks) != sorted(set(self.blocks)) or list(self.ends) != sorted(set(self.ends)):
            raise ValueError(f"entry blocks {self.blocks} and row ends {self.ends} must both increase")

    def rows_at(self, block: int) -> int:
        """How many leading rows run ``block``."""
        return max((e for b, e in zip(self.blocks, self.ends) if b <= block), default=0)


Start = int | Entries  # a block every row enters at, or per-row entry blocks


def _entries(start: Start, n_rows: int) -> Entries:
    if not isinstance(start, Entries):
        return Entries((start,), (n_rows,))
    if start.ends[-1] != n_rows:
        raise ValueError(f"entries cover {start.ends[-1]} rows; the batch has {n_rows}")
    return start


def _modules(inject: str | Sequence[str]) -> list[str]:
    return [inject] if isinstance(inject, str) else list(inject)


def _map_rows(value: Any, n_rows: int, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """A block argument with ``fn`` applied to its per-row tensors (first dimension ``n_rows``, at
    least two dimensions: a broadcast (1, ...) table or a 1-D position list is left alone), in caches
    and nested containers too."""
    if torch.is_tensor(value):
        return fn(value) if value.dim() >= 2 and value.shape[0] == n_rows else value
    if isinstance(value, _PrefixCache):
        return _PrefixCache(fn(value.keys), fn(value.values))
    if isinstance(value, (tuple, list)):
        return type(value)(_map_rows(v, n_rows, fn) for v in value)
    if isinstance(value, dict):
        return {k: _map_rows(v, n_rows, fn) for k, v in value.items()}
    return value


def _first_rows(value: Any, n_rows: int, n: int) -> Any:
    """A block argument cut to the first ``n`` of its ``n_rows`` rows."""
    return _map_rows(value, n_rows, lambda t: t[:n])


def _tiled(value: Any, n_rows: int, copies: int) -> Any:
    """A block argument of ``n_rows`` rows for ``copies`` copies of its batch, one after another."""
    return _map_rows(value, n_rows, lambda t: torch.cat([t] * copies))


def _run_blocks(
    blocks: Sequence[nn.Module],
    entries: Entries,
    last_block: int,
    clean_input: Callable[[int], torch.Tensor],
    block_call: Callable[[int], tuple[tuple, dict]],
    n_rows: int,
) -> torch.Tensor:
    """Blocks ``entries.blocks[0]``..``last_block``, each on the rows entered by then; a row enters
    with ``clean_input(block)``, its captured input at its entry block."""
    hidden: Optional[torch.Tensor] = None
    running = 0
    for i in range(entries.blocks[0], last_block + 1):
        n = entries.rows_at(i)
        if n > running:
            joining = clean_input(i)[running:n]
            hidden = joining if hidden is None else torch.cat([hidden, joining])
            running = n
        args, kwargs = block_call(i)
        if n < n_rows:
            args, kwargs = _first_rows(args, n_rows, n), _first_rows(kwargs, n_rows, n)
        hidden = _call_block(blocks[i], hidden, args, kwargs)
    return hidden


class FullForward:
    """Reference strategy: the whole model, all positions, every step."""

    def __init__(self, model: nn.Module, batch: PromptBatch, loss_layer_module: str, ln_f_module: str):
        self.model = model
        self.batch = batch
        self.loss_layer_module = loss_layer_module
        self.ln_f = nethook.get_module(model, ln_f_module)

    def positions(self, rows: torch.Tensor, cols: torch.Tensor) -> Positions:
        """Where (row, col) of the right-padded prompts sits in this strategy's hidden states."""
        return rows, cols

    def tiled(self, copies: int) -> "FullForward":
        """This strategy for ``copies`` copies of its batch (PromptBatch.tiled)."""
        out = copy.copy(self)
        out.batch = self.batch.tiled(copies)
        return out

    def logits(self, start: Start, inject_module: str | Sequence[str], edit_fn: EditFn) -> torch.Tensor:
        """Logits at the batch's read positions with ``edit_fn`` editing the injected modules' outputs.

        Every row runs every block; ``start`` matters only to the faster strategies."""
        with nethook.TraceDict(self.model, _modules(inject_module), retain_output=False, edit_output=edit_fn):
            with nethook.Trace(self.model, self.loss_layer_module) as tr:
                self.batch.run(self.model)
        hidden = self.ln_f(tr.first_output)
        full = lm_logits(self.model, hidden)
        return full[self.batch.rows, self.batch.cols]


class SuffixForward:
    """Fast strategy: cached block inputs, blocks start_block..loss block, logits at read positions.

    ``cache_for(i)``, when given, is handed to block i as its key/value cache during the capture
    pass, which then runs the loss block too: PrefixCachedForward records the prefix's keys and
    values in the same pass that captures the block inputs.
    """

    def __init__(
        self,
        model: nn.Module,
        batch: PromptBatch,
        block_names: Sequence[str],
        loss_block: int,
        ln_f_module: str,
        first_block: int,
        cache_for: Optional[Callable[[int], Any]] = None,
    ):
        self.model = model
        self.batch = batch
        self.blocks = [nethook.get_module(model, n) for n in block_names]
        self.loss_block = loss_block
        self.ln_f = nethook.get_module(model, ln_f_module)
        self.calls: dict[int, tuple[tuple, dict]] = {}
        self._capture(first_block, cache_for)

    @torch.no_grad()
    def _capture(self, first_block: int, cache_for: Optional[Callable[[int], Any]]) -> None:
        handles = []

        def make_hook(index: int):
            def hook(module: nn.Module, args: tuple, kwargs: dict):
                self.calls[index] = (tuple(a.detach() if torch.is_tensor(a) else a for a in args), dict(kwargs))
                if cache_for is not None:
                    return (args[0],), {**_as_keywords(module, args, kwargs), _cache_argument(module): cache_for(index)}
                if index == self.loss_block:
                    raise nethook.StopForward()
                return None

            return hook

        def stop(*_args: Any) -> None:
            raise nethook.StopForward()

        try:
            for i in range(first_block, self.loss_block + 1):
                handles.append(self.blocks[i].register_forward_pre_hook(make_hook(i), with_kwargs=True))
            if cache_for is not None:
                handles.append(self.blocks[self.loss_block].register_forward_hook(stop))
            try:
                self.batch.run(self.model)
            except nethook.StopForward:
                pass
        finally:
            for h in handles:
                h.remove()
        for args, kwargs in self.calls.values():
            kwargs.pop("past_key_values", None)
            kwargs.pop("layer_past", None)
            if "use_cache" in kwargs:
                kwargs["use_cache"] = False

    def positions(self, rows: torch.Tensor, cols: torch.Tensor) -> Positions:
        return rows, cols

    def tiled(self, copies: int) -> "SuffixForward":
        """This strategy for ``copies`` copies of its batch, from the block inputs captured once: what
        a batch of one request's optimisations at several layers needs."""
        out = copy.copy(self)
        n = self.batch.input_ids.shape[0]
        out.batch = self.batch.tiled(copies)
        out.calls = {i: _tiled(call, n, copies) for i, call in self.calls.items()}
        return out

    def check_start(self, entries: Entries) -> None:
        if entries.blocks[0] not in self.calls:
            raise ValueError(f"block {entries.blocks[0]} is below the first captured block {min(self.calls)}")

    def logits(self, start: Start, inject_module: str | Sequence[str], edit_fn: EditFn) -> torch.Tensor:
        entries = _entries(start, self.batch.input_ids.shape[0])
        self.check_start(entries)
        with nethook.TraceDict(self.model, _modules(inject_module), retain_output=False, edit_output=edit_fn):
            hidden = _run_blocks(self.blocks, entries, self.loss_block, lambda i: self.calls[i][0][0],
                                 self.calls.__getitem__, self.batch.input_ids.shape[0])
        picked = hidden[self.batch.rows, self.batch.cols]
        return lm_logits(self.model, self.ln_f(picked))


class _RecordingCache:
    """Stands in for a KV cache in one block call and keeps the keys/values of the first positions."""

    def __init__(self, n_prefix: int, key_mask: torch.Tensor):
        self.n_prefix = n_prefix
        self.key_mask = key_mask  # (rows, n_prefix): 0 at padding, whose values must not leak as NaN
        self.keys: Optional[torch.Tensor] = None
        self.values: Optional[torch.Tensor] = None

    def update(self, keys: torch.Tensor, values: torch.Tensor, *_args: Any, **_kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        keep = self.key_mask[:, None, :, None].to(keys.dtype)
        self.keys = keys[:, :, : self.n_prefix].detach() * keep
        self.values = values[:, :, : self.n_prefix].detach() * keep
        return keys, values


class _PrefixCache:
    """A read-only KV cache: the prefix's keys/values, then the recomputed positions' own."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        self.keys, self.values = keys, values

    def update(self, keys: torch.Tensor, values: torch.Tensor, *_args: Any, **_kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.cat([self.keys, keys], dim=2), torch.cat([self.values, values], dim=2)


def _cache_argument(block: nn.Module) -> Optional[str]:
    params = inspect.signature(block.forward).parameters
    return next((name for name in ("past_key_values", "layer_past") if name in params), None)


def _slice_positions(value: Any, length: int, start: int) -> Any:
    """The part of a per-position block argument (position ids, rotary tables) from ``start`` on."""
    if torch.is_tensor(value):
        if value.dim() >= 2 and value.shape[1] == length:
            return value[:, start:]
        if value.dim() == 1 and value.shape[0] == length:
            return value[start:]
        return value
    if isinstance(value, (tuple, list)):
        return type(value)(_slice_positions(v, length, start) for v in value)
    return value


def _as_keywords(block: nn.Module, args: tuple, kwargs: dict) -> dict:
    """A block call's arguments after the hidden states, all by name (GPT-2 passes some by position)."""
    signature = inspect.signature(block.forward)
    bound = signature.bind_partial(*args, **kwargs).arguments
    out: dict = {}
    for i, (name, value) in enumerate(bound.items()):
        if i == 0:
            continue  # the hidden states
        if signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        elif signature.parameters[name].kind is not inspect.Parameter.VAR_POSITIONAL:
            out[name] = value
    return out
