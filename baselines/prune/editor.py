"""PRUNE as a run's editor: sequential MEMIT edits; every evaluation sees the restrained model.

The original matrices W_0 are copied (to the CPU) when the editor is built, which the run does on the
freshly loaded model, before any edit or restored checkpoint: a resumed run restrains against the
same W_0 and needs no state of its own. ``apply_prune_to_model`` is one editor's edits, restrained for
good after the last (``restrain_for_good``), as the paper applies PRUNE. ``for_evaluation`` restrains the accumulated edit and puts
the edited weights back, bit for bit, on exit, so evaluating after edit n equals PRUNE applied once
after edit n, and the weight checkpoints hold the unrestrained edits.
"""
from __future__ import annotations

import contextlib
import copy as copy_module
from typing import Any, Iterator, Optional, Sequence

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from baselines.prune.prune_hparams import PRUNEHyperParams
from baselines.prune.prune_main import largest_singular_value, restrain_model
from editing.editor import apply_with_editor
from editing.resources import EditResources
from memit.editor import MEMITEditor
from util import nethook


class PRUNEEditor(MEMITEditor):
    batch_edits = True

    def __init__(self, model: nn.Module, tok: PreTrainedTokenizerBase, hparams: Any, resources: Any,
                 cache_template: Optional[str] = None):
        super().__init__(model, tok, hparams, resources, cache_template)
        names = [f"{hparams.rewrite_module_tmp.format(l)}.weight" for l in hparams.layers]
        self.originals = {n: nethook.get_parameter(model, n).detach().to("cpu", copy=True) for n in names}
        self.sigma_max = {n: largest_singular_value(w) for n, w in self.originals.items()}

    @contextlib.contextmanager
    def for_evaluation(self) -> Iterator[None]:
        edited = restrain_model(self.model, self.originals, self.sigma_max, self.hparams.log_base)
        try:
            yield
        finally:
            with torch.no_grad():
                for name, value in edited.items():
                    nethook.get_parameter(self.model, name).copy_(value)

    def restrain_for_good(self) -> None:
        """Restrain the accumulated edit in place, for a model delivered after its last edit."""
        restrain_model(self.model, self.originals, self.sigma_max, self.hparams.log_base)


def apply_prune_to_model(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    requests: Sequence[dict],
    hparams: PRUNEHyperParams,
    copy: bool = False,
    return_orig_weights: bool = False,
    cache_template: Optional[str] = None,
    resources: Optional[EditResources] = None,
) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """One MEMIT batch on the weights as given (W_0), then the accumulated edit restrained for good, as
    PRUNE delivers a model after its last edit; returns (model, original weights if asked). The model
    equals what a run's PRUNE editor evaluates after the same edits (its ``for_evaluation``)."""
    if copy:
        model = copy_module.deepcopy(model)
    editor = PRUNEEditor(model, tok, hparams, resources, cache_template)
    model, weights = apply_with_editor(PRUNEEditor, model, tok, requests, hparams, False, return_orig_weights,
                                       editor=editor)
    editor.restrain_for_good()
    return model, weights
