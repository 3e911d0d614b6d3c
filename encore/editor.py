"""ENCORE as a run's editor: MEMIT's batches, MPES-stopped values, the Frobenius-norm solve, and the
keys of earlier edits as state.

K_p K_p^T (upstream's ``SEQ_CACHE``) starts empty when the editor is built and grows with every
batch; the run saves it with every weight checkpoint (``state_dict``) and restores it on resume
(``load_state_dict``), so a resumed run solves exactly as the uninterrupted one. The statistics C0
stay loaded: every batch's solve reads them.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from alphaedit.alphaedit_main import KeyMoments
from editing.editor import EditOutcome
from encore.update import execute_encore
from memit.editor import MEMITEditor
from memit.memit_main import apply_deltas
from util import nethook
from util.placement import module_device


class ENCOREEditor(MEMITEditor):
    batch_edits = True

    def __init__(self, model: nn.Module, tok: PreTrainedTokenizerBase, hparams: Any, resources: Any):
        super().__init__(model, tok, hparams, resources)  # run resources, NAS's reference norms when asked
        self.moments = KeyMoments()

    def edit(self, requests: Sequence[dict]) -> EditOutcome:
        update = execute_encore(self.model, self.tok, list(requests), self.hparams, self.moments, self.resources)
        weights: dict = {}
        apply_deltas(self.model, update, weights)
        self.moments.add(update)
        return EditOutcome(weights, {**self.details(update), "accumulated_keys": self.moments.n_keys})

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.moments.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        names = [self.hparams.rewrite_module_tmp.format(l) for l in self.hparams.layers]
        self.moments.load_state_dict(state, {n: module_device(nethook.get_module(self.model, n)) for n in names})
