"""The fastest forward strategy: only the positions from each row's fact token on are recomputed.

With causal attention no position before the fact token can see a delta injected there, so those
positions' keys and values at every block are recorded once, in the pass that captures the block
inputs, and each optimisation step runs the blocks on the later positions only, attending to that
cached prefix (editing/forward.py has the other strategies and the pieces they share).
"""
from __future__ import annotations

import copy
import inspect
from typing import Optional, Sequence

import torch
from torch import nn

from editing.forward import (
    Positions,
    PromptBatch,
    Start,
    SuffixForward,
    _as_keywords,
    _cache_argument,
    _entries,
    _modules,
    _PrefixCache,
    _RecordingCache,
    _run_blocks,
    _slice_positions,
    _tiled,
)
from util import nethook
from util.nethook import EditFn
from util.scoring import lm_logits


class PrefixCachedForward:
    """Fastest strategy: recompute only the positions from each row's fact token on.

    Rows are re-laid so every row's anchor (its fact token, where the delta enters) sits at the
    same column F: left padding before, right padding after, explicit position ids so positions
    are those of the unpadded prompt. Positions < F cannot see the delta (causal attention), so
    their keys and values at every block are taken once from a clean pass and each optimisation
    step runs the blocks on positions >= F only, attending to that cached prefix.
    """

    def __init__(
        self,
        model: nn.Module,
        batch: PromptBatch,
        anchor_cols: torch.Tensor,
        block_names: Sequence[str],
        loss_block: int,
        ln_f_module: str,
        first_block: int,
    ):
        device = batch.input_ids.device
        lengths = batch.attention_mask.sum(1)
        self.anchor = anchor_cols.to(device)
        self.n_prefix = int(self.anchor.max())
        n_rows = batch.input_ids.shape[0]
        n_suffix = int((lengths - self.anchor).max())
        total = self.n_prefix + n_suffix
        ids = torch.zeros(n_rows, total, dtype=batch.input_ids.dtype, device=device)
        mask = torch.zeros(n_rows, total, dtype=batch.attention_mask.dtype, device=device)
        for r in range(n_rows):
            shift, n = self.n_prefix - int(self.anchor[r]), int(lengths[r])
            ids[r, shift : shift + n] = batch.input_ids[r, :n]
            mask[r, shift : shift + n] = 1
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        read_rows, read_cols = self.positions(batch.rows, batch.cols)
        aligned = PromptBatch(ids, mask, read_rows, read_cols, positions)
        self.model = model
        self.total = total
        recorders: dict[int, _RecordingCache] = {}
        record = lambda i: recorders.setdefault(i, _RecordingCache(self.n_prefix, mask[:, : self.n_prefix]))  # noqa: E731
        self.suffix = SuffixForward(model, aligned, block_names, loss_block, ln_f_module, first_block, cache_for=record)
        self.read_rows, self.read_cols = read_rows, read_cols
        self.attention_bias = self._attention_bias(mask, next(model.parameters()).dtype)
        self.block_kwargs = self._block_kwargs(recorders)

    @staticmethod
    def applicable(model: nn.Module, batch: PromptBatch, anchor_cols: torch.Tensor, block_names: Sequence[str]) -> Optional[str]:
        """Why this strategy cannot serve ``batch`` (None when it can)."""
        anchor = anchor_cols.to(batch.cols.device)
        if bool((batch.cols < anchor[batch.rows]).any()):
            return "a read position precedes its row's fact token"
        blocks = [nethook.get_module(model, n) for n in block_names]
        if any(_cache_argument(b) is None for b in blocks):
            return "the blocks take no key/value cache argument"
        if any("attention_mask" not in inspect.signature(b.forward).parameters for b in blocks):
            return "the blocks take no attention_mask argument"
        window = getattr(getattr(model, "config", None), "sliding_window", None)
        length = int(anchor.max() + (batch.attention_mask.sum(1) - anchor).max())
        if isinstance(window, int) and window < length:
            return f"prompts ({length} positions) are longer than the sliding window ({window})"
        return None

    def positions(self, rows: torch.Tensor, cols: torch.Tensor) -> Positions:
        local = cols - self.anchor[rows]
        if bool((local < 0).any()):
            raise ValueError("PrefixCachedForward only reaches positions at or after each row's fact token")
        return rows, local

    def _attention_bias(self, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Additive mask (rows, 1, suffix, total): causal, and no attention to padding."""
        query = torch.arange(self.n_prefix, self.total, device=mask.device)[:, None]
        key = torch.arange(self.total, device=mask.device)[None, :]
        allowed = (key <= query)[None] & mask.bool()[:, None, :]
        bias = torch.zeros(allowed.shape, dtype=dtype, device=mask.device)
        return bias.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]

    def _block_kwargs(self, recorders: dict[int, _RecordingCache]) -> dict[int, dict]:
        """Per block: the captured arguments cut to positions >= F, with the prefix's keys/values (recorded
        in the capture pass) as cache."""
        out = {}
        for i, (args, kwargs) in self.suffix.calls.items():
            block = self.suffix.blocks[i]
            cache_name = _cache_argument(block)
            kwargs = _as_keywords(block, args, kwargs)
            recorder = recorders[i]
            cut = {k: _slice_positions(v, self.total, self.n_prefix) for k, v in kwargs.items()}
            # always an explicit mask: with fewer queries than keys, an implicit causal mask would misalign
            cut["attention_mask"] = self.attention_bias
            cut[cache_name] = _PrefixCache(recorder.keys, recorder.values)
            out[i] = cut
        return out

    def tiled(self, copies: int) -> "PrefixCachedForward":
        """This strategy for ``copies`` copies of its batch, from the keys and values cached once."""
        out = copy.copy(self)
        n = self.suffix.batch.input_ids.shape[0]
        out.suffix = self.suffix.tiled(copies)
        out.anchor = self.anchor.repeat(copies)
        out.read_rows, out.read_cols = out.suffix.batch.rows, out.suffix.batch.cols
        out.attention_bias = _tiled(self.attention_bias, n, copies)
        out.block_kwargs = {i: _tiled(kwargs, n, copies) for i, kwargs in self.block_kwargs.items()}
        return out

    def logits(self, start: Start, inject_module: str | Sequence[str], edit_fn: EditFn) -> torch.Tensor:
        entries = _entries(start, self.suffix.batch.input_ids.shape[0])
        self.suffix.check_start(entries)
        with nethook.TraceDict(self.model, _modules(inject_module), retain_output=False, edit_output=edit_fn):
            hidden = _run_blocks(self.suffix.blocks, entries, self.suffix.loss_block,
                                 lambda i: self.suffix.calls[i][0][0][:, self.n_prefix :],
                                 lambda i: ((), self.block_kwargs[i]), self.suffix.batch.input_ids.shape[0])
        picked = hidden[self.read_rows, self.read_cols]
        return lm_logits(self.model, self.suffix.ln_f(picked))
