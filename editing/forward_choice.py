"""Which forward strategy a value optimisation runs: the fastest one that agrees with the full pass.

``verified_forward`` builds the strategies of editing/forward.py and editing/forward_prefix.py from
the fastest down and checks each against the reference's full pass, with a probe delta injected,
once per model and strategy (the verdict is kept in the run's resources); "reference" hparams take
the full pass itself.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Optional

import torch
from torch import nn

from editing.forward import FullForward, Positions, PromptBatch, SuffixForward
from editing.forward_prefix import PrefixCachedForward
from util.nethook import EditFn
from util.placement import HALF_DTYPES

LOG = logging.getLogger(__name__)


Strategy = FullForward | SuffixForward | PrefixCachedForward


@torch.no_grad()
def agrees_with_full(
    strategy: Strategy,
    full: FullForward,
    start_block: int,
    inject_module: str,
    probe: Optional[Positions] = None,
    rtol: float = 1e-4,
) -> bool:
    """Whether ``strategy`` reproduces the full pass on the live model.

    With ``probe`` (positions in the right-padded prompts), a fixed random delta scaled to the
    hidden state is injected there in both passes, so the check also covers where deltas land
    and how the edited positions are seen by the rest of the sequence.
    """
    def make_edit(positions: Optional[Positions]) -> EditFn:
        def edit(out: Any, _name: str) -> Any:
            if positions is None:
                return out
            hidden = out[0] if isinstance(out, (tuple, list)) else out
            rows, cols = positions
            noise = torch.randn(hidden.shape[-1], generator=torch.Generator().manual_seed(0)).to(hidden)
            hidden = hidden.clone()
            hidden[rows, cols] = hidden[rows, cols] + hidden[rows, cols].std() * noise
            return (hidden,) + tuple(out[1:]) if isinstance(out, tuple) else hidden

        return edit

    a = strategy.logits(start_block, inject_module, make_edit(strategy.positions(*probe) if probe else None))
    b = full.logits(start_block, inject_module, make_edit(full.positions(*probe) if probe else None))
    if a.shape != b.shape or not bool(torch.isfinite(a).all()):
        return False
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
    anchor_cols: Optional[torch.Tensor] = None,
) -> Strategy:
    """The fastest strategy for ``implementation`` that matches the full pass on this model.

    ``anchor_cols`` (one per row: where the delta enters) allows the prefix-cached strategy. Each
    strategy is checked once per model (``checked`` remembers verdicts by model identity and
    strategy); one that disagrees (an architecture whose blocks need more than their captured
    call) is dropped with a warning, down to the full pass.
    """
    full = FullForward(model, batch, layer_module_tmp.format(loss_layer), ln_f_module)
    if implementation == "reference":
        return full
    block_names = [layer_module_tmp.format(i) for i in range(n_layers)]
    probe_module = probe_module or layer_module_tmp.format(first_block)
    candidates: list[tuple[str, Callable[[], Strategy]]] = []
    if anchor_cols is not None:
        why_not = PrefixCachedForward.applicable(model, batch, anchor_cols, block_names[first_block : loss_layer + 1])
        if why_not is None:
            candidates.append(("prefix", lambda: PrefixCachedForward(
                model, batch, anchor_cols, block_names, loss_layer, ln_f_module, first_block)))
        else:
            LOG.debug("prefix-cached forward not used: %s", why_not)
    candidates.append(("suffix", lambda: SuffixForward(model, batch, block_names, loss_layer, ln_f_module, first_block)))
    probe = (torch.arange(len(anchor_cols), device=batch.rows.device), anchor_cols) if anchor_cols is not None else None
    for kind, build in candidates:
        key = (id(model), kind)
        ok = checked.get(key) if checked is not None else None
        if ok is False:
            continue
        strategy = build()
        if ok is None:
            # a misplaced delta changes logits by O(1); half precision reorders rounding at ~1e-2
            rtol = 3e-2 if next(model.parameters()).dtype in HALF_DTYPES else 1e-4
            ok = agrees_with_full(strategy, full, first_block, probe_module, probe, rtol)
            if checked is not None:
                checked[key] = ok
            if not ok:
                LOG.warning("%s forward disagrees with the full forward on %s; not used", kind, type(model).__name__)
        if ok:
            return strategy
    return full
