"""MEMIT as an editor: a batch of requests, one update spread over the fixed layer range; and
``apply_memit_to_model``, MEMIT's apply contract over this editor."""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from editing.editor import EditOutcome, LocateEditEditor, apply_with_editor
from editing.resources import EditResources
from memit.key_moments import KeyMoments
from memit.memit_hparams import MEMITHyperParams
from memit.memit_main import MEMITUpdate, apply_deltas, execute_memit
from util import nethook
from util.architectures import check_residual_targets
from util.placement import module_device


class MEMITEditor(LocateEditEditor):
    batch_edits = True

    def __init__(self, model: nn.Module, tok: PreTrainedTokenizerBase, hparams: MEMITHyperParams, resources: Any,
                 cache_template: Optional[str] = None):
        super().__init__(model, tok, hparams, resources)
        check_residual_targets(hparams, model, type(hparams).__name__)
        # MEMIT's z cache (e.g. "cache/memit_z_{layer}_{clamp_norm_factor}_{case_id}.npz"): only sound when
        # every edit starts from the same model, never in a lifelong run
        self.cache_template = cache_template

    def edit(self, requests: Sequence[dict]) -> EditOutcome:
        update = execute_memit(self.model, self.tok, list(requests), self.hparams, self.resources, self.cache_template)
        return self.apply(update)

    def apply(self, update: MEMITUpdate, details: Optional[dict] = None) -> EditOutcome:
        """Add ``update``'s deltas; the outcome with MEMIT's details (and ``details``, a subclass's own)."""
        weights: dict = {}
        apply_deltas(self.model, update, weights)
        return EditOutcome(weights, {**self.details(update), **(details or {})})

    def details(self, update: MEMITUpdate) -> dict:
        single = update.zs.shape[1] == 1
        return {
            "layers": list(self.hparams.layers),
            # one request: its own numbers (the roll-back protocol's files); a batch: one per request
            "z_steps": update.z_steps[0] if single else list(update.z_steps),
            "z_final_loss": update.z_losses[0] if single else list(update.z_losses),
            "layer_update_norms": {str(d.layer): d.norm for d in update.deltas.values()},
            "z_errors": {str(d.layer): d.z_error for d in update.deltas.values()},
            "value_norms": update.value_norms,  # one per request (None where its z came from the cache)
        }


class MomentsEditor(MEMITEditor):
    """A MEMIT-family editor that keeps the keys of earlier edits (AlphaEdit, ENCORE): saved with the
    weight checkpoints and restored on resume."""

    def __init__(self, model: nn.Module, tok: PreTrainedTokenizerBase, hparams: MEMITHyperParams, resources: Any,
                 cache_template: Optional[str] = None):
        super().__init__(model, tok, hparams, resources, cache_template)
        self.module_names = [hparams.rewrite_module_tmp.format(l) for l in hparams.layers]
        self.moments = KeyMoments()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.moments.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.moments.load_state_dict(state, {n: module_device(nethook.get_module(self.model, n)) for n in self.module_names})


def apply_memit_to_model(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    requests: Sequence[dict],
    hparams: MEMITHyperParams,
    copy: bool = False,
    return_orig_weights: bool = False,
    cache_template: Optional[str] = None,
    resources: Optional[EditResources] = None,
) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """Edit ``model`` with all ``requests`` at once; returns (model, original weights if asked)."""
    return apply_with_editor(MEMITEditor, model, tok, requests, hparams, copy, return_orig_weights, resources,
                             cache_template=cache_template)
