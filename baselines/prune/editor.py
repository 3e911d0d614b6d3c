"""PRUNE as a run's editor: sequential MEMIT edits; every evaluation sees the restrained model.

The original matrices W_0 are copied (to the CPU) when the editor is built, which the run does on the
freshly loaded model, before any edit or restored checkpoint: a resumed run restrains against the
same W_0 and needs no state of its own. ``for_evaluation`` restrains the accumulated edit and puts
the edited weights back, bit for bit, on exit, so evaluating after edit n equals PRUNE applied once
after edit n, and the weight checkpoints hold the unrestrained edits.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from baselines.prune.prune_main import largest_singular_value, restrain_model
from memit.editor import MEMITEditor
from util import nethook


class PRUNEEditor(MEMITEditor):
    batch_edits = True

    def __init__(self, model: nn.Module, tok: PreTrainedTokenizerBase, hparams: Any, resources: Any):
        super().__init__(model, tok, hparams, resources)
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
