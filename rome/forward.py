"""Two ways to run the forward passes of a value optimisation, with identical results.

``FullForward`` is what the reference code does: every optimisation step runs the whole model and
projects every position onto the vocabulary. ``SuffixForward`` uses two facts: the residual
stream entering block l does not depend on a delta injected inside block l, so it is computed
once per edit (for every candidate block at once) and each step runs only blocks l..loss layer;
and the loss reads logits at a handful of positions, so the vocabulary projection is applied only
there. Block inputs are captured with forward pre-hooks (with kwargs), so the blocks are re-run
with exactly the masks and position embeddings the model itself gave them, for any architecture.
``SuffixForward.matches_full`` checks the equivalence on the live model before it is trusted.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from util import nethook
from util.scoring import lm_logits

LOG = logging.getLogger(__name__)
EditFn = Callable[[Any, str], Any]


@dataclasses.dataclass
class PromptBatch:
    """Right-padded prompts and the (row, position) pairs whose next-token logits the loss reads."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor


def _call_block(block: nn.Module, hidden: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
    out = block(hidden, *args[1:], **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


class FullForward:
    """Reference strategy: the whole model, all positions, every step."""

    def __init__(self, model: nn.Module, batch: PromptBatch, loss_layer_module: str, ln_f_module: str):
        self.model = model
        self.batch = batch
        self.loss_layer_module = loss_layer_module
        self.ln_f = nethook.get_module(model, ln_f_module)

    def logits(self, start_block: int, inject_module: str, edit_fn: EditFn) -> torch.Tensor:
        """Logits at the batch's read positions with ``edit_fn`` editing ``inject_module``'s output."""
        with nethook.TraceDict(self.model, [inject_module], retain_output=False, edit_output=edit_fn):
            with nethook.Trace(self.model, self.loss_layer_module) as tr:
                self.model(input_ids=self.batch.input_ids, attention_mask=self.batch.attention_mask, use_cache=False)
        hidden = self.ln_f(tr.first_output)
        full = lm_logits(self.model, hidden)
        return full[self.batch.rows, self.batch.cols]


class SuffixForward:
    """Fast strategy: cached block inputs, blocks start_block..loss block, logits at read positions."""

    def __init__(
        self,
        model: nn.Module,
        batch: PromptBatch,
        block_names: Sequence[str],
        loss_block: int,
        ln_f_module: str,
        first_block: int,
    ):
        self.model = model
        self.batch = batch
        self.blocks = [nethook.get_module(model, n) for n in block_names]
        self.loss_block = loss_block
        self.ln_f = nethook.get_module(model, ln_f_module)
        self.calls: dict[int, tuple[tuple, dict]] = {}
        self._capture(first_block)

    @torch.no_grad()
    def _capture(self, first_block: int) -> None:
        handles = []

        def make_hook(index: int):
            def hook(_module: nn.Module, args: tuple, kwargs: dict):
                self.calls[index] = (tuple(a.detach() if torch.is_tensor(a) else a for a in args), dict(kwargs))
                if index == self.loss_block:
                    raise nethook.StopForward()

            return hook

        try:
            for i in range(first_block, self.loss_block + 1):
                handles.append(self.blocks[i].register_forward_pre_hook(make_hook(i), with_kwargs=True))
            try:
                self.model(input_ids=self.batch.input_ids, attention_mask=self.batch.attention_mask, use_cache=False)
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

    def logits(self, start_block: int, inject_module: str, edit_fn: EditFn) -> torch.Tensor:
        if start_block not in self.calls:
            raise ValueError(f"block {start_block} is below the first captured block {min(self.calls)}")
        hidden = self.calls[start_block][0][0]
        with nethook.TraceDict(self.model, [inject_module], retain_output=False, edit_output=edit_fn):
            for i in range(start_block, self.loss_block + 1):
                args, kwargs = self.calls[i]
                hidden = _call_block(self.blocks[i], hidden, args, kwargs)
        picked = hidden[self.batch.rows, self.batch.cols]
        return lm_logits(self.model, self.ln_f(picked))

    @torch.no_grad()
    def matches_full(self, full: FullForward, start_block: int, inject_module: str, rtol: float = 1e-4) -> bool:
        """Whether this strategy reproduces the full pass on the live model (no edit applied)."""

        def identity(out: Any, _name: str) -> Any:
            return out

        a = self.logits(start_block, inject_module, identity)
        b = full.logits(start_block, inject_module, identity)
        scale = b.abs().max().clamp_min(1e-6)
        return bool(((a - b).abs().max() / scale) < rtol)


def verified_forward(
    implementation: str,
    model: nn.Module,
    batch: PromptBatch,
    layer_module_tmp: str,
    n_layers: int,
    loss_layer: int,
    ln_f_module: str,
    first_block: int,
    probe_module: Optional[str] = None,
    checked: Optional[dict] = None,
) -> FullForward | SuffixForward:
    """The forward strategy for ``implementation``; the suffix pass only once it matches the full one.

    The check runs once per model (``checked`` remembers the verdict by model identity); if the
    suffix pass disagrees (an architecture whose blocks need more than their captured call), the
    full pass is used and a warning says so.
    """
    full = FullForward(model, batch, layer_module_tmp.format(loss_layer), ln_f_module)
    if implementation == "reference":
        return full
    block_names = [layer_module_tmp.format(i) for i in range(n_layers)]
    suffix = SuffixForward(model, batch, block_names, loss_layer, ln_f_module, first_block)
    ok = checked.get(id(model)) if checked is not None else None
    if ok is None:
        ok = suffix.matches_full(full, first_block, probe_module or layer_module_tmp.format(first_block))
        if checked is not None:
            checked[id(model)] = ok
        if not ok:
            LOG.warning("suffix forward disagrees with the full forward on %s; using the full forward", type(model).__name__)
    return suffix if ok else full
