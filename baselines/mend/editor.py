"""MEND as a run's editor (and the base of KE's): the trained network is loaded once per run and kept.

Loading an editor (hundreds of MB for the official GPT2-XL/GPT-J files) once per edit would dominate
a run, so the editor object holds one executor for the run's lifetime.
"""
from __future__ import annotations

from typing import ClassVar, Optional, Sequence

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from baselines.mend.executor import EditorExecutor
from baselines.mend.mend_hparams import MENDHyperParams
from editing.editor import Editor, EditOutcome, apply_with_editor, snapshot_weights
from editing.resources import EditResources


class TrainedEditor(Editor):
    kind: ClassVar[str]

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.executor = EditorExecutor(self.kind)

    def edit(self, requests: Sequence[dict]) -> EditOutcome:
        request = self._one_request(requests)
        orig: dict = {}
        snapshot_weights(self.model, self.hparams.inner_params, orig)
        result = self.executor.edit(self.model, self.tok, request, self.hparams)
        return EditOutcome(orig, {"editor": self.kind, "archive": self.executor.archive, **result.details()})


class MENDEditor(TrainedEditor):
    kind = "MEND"


def apply_mend_to_model(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    requests: Sequence[dict],
    hparams: MENDHyperParams,
    copy: bool = False,
    return_orig_weights: bool = False,
    cache_template: Optional[str] = None,
    resources: Optional[EditResources] = None,
) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """Edit ``model`` with each request in turn through the trained MEND network (loaded once);
    returns (model, original weights if asked). ``cache_template`` is accepted for ROME's apply
    signature and unused."""
    return apply_with_editor(MENDEditor, model, tok, requests, hparams, copy, return_orig_weights, resources)
