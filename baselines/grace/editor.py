"""GRACE as a run's editor: the codebook is the editor's state; no weight ever changes.

``for_evaluation`` switches the codebook on; an edit switches it on for its own check and training
(upstream's adaptor is always in the model). Outside both the model is the unedited one.
Roll-back is the harness's default, an edit with the targets swapped, and GRACE's own rule decides
what it does: the roll-back query equals the edit's key, its label conflicts, so the key's radius is
split at distance 0: the edit's key is retired (radius -1e-5) and the new key, radius 0, answers
only that exact query, trained towards the true target. Nothing is restored from a copy.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any, Optional

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from baselines.grace.codebook import Codebook
from baselines.grace.grace_hparams import GRACEHyperParams
from baselines.grace.grace_main import execute_grace, routing
from editing.editor import Editor, EditOutcome
from editing.memory_layer import edit_in_turn
from editing.resources import EditResources, default_resources
from util import nethook
from util.architectures import weight_out_in
from util.placement import module_device


class GRACEEditor(Editor):
    def __init__(self, model: nn.Module, tok: PreTrainedTokenizerBase, hparams: Any, resources: Any):
        super().__init__(model, tok, hparams, resources or default_resources(model))
        module = nethook.get_module(model, hparams.module_name)
        d_out, d_in = weight_out_in(module).shape
        self.codebook = Codebook.empty(d_in, d_out, module_device(module))

    def edit(self, requests: Sequence[dict]) -> EditOutcome:
        details = execute_grace(self.model, self.tok, self._one_request(requests), self.hparams, self.codebook,
                                self.resources)
        return EditOutcome({}, details)

    @contextlib.contextmanager
    def for_evaluation(self) -> Iterator[None]:
        with routing(self.model, self.hparams, self.codebook):
            yield

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.codebook.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.codebook.load_state_dict(state)


def apply_grace_to_model(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    requests: Sequence[dict],
    hparams: GRACEHyperParams,
    copy: bool = False,
    return_orig_weights: bool = False,
    resources: EditResources | None = None,
    editor: Optional[GRACEEditor] = None,
) -> tuple[nn.Module, dict[str, torch.Tensor], GRACEEditor]:
    """Edit with each request in turn; returns (model, {} since no weight changes, the editor).

    The edits live in the editor's codebook: evaluate inside ``with editor.for_evaluation():``, and
    pass ``editor`` back to continue a sequence (then ``copy`` must be False).
    """
    return edit_in_turn(GRACEEditor, model, tok, requests, hparams, copy, resources, editor)
