"""WISE as a run's editor: the side memory and its shards are the editor's state; no weight changes.

The context templates (greedy, so the same on a resumed run) and the unrelated rows are read once,
when the run builds the editor on the fresh model. ``for_evaluation`` switches the router on; an
edit's own forward passes use W' at every position, as upstream's adaptor does while editing.
Roll-back is the harness's default, an edit with the targets swapped: W' is trained back towards the
true target in the same shard (and counts towards ``save_freq``); nothing is restored from a copy.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any, Optional

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase
from transformers.activations import ACT2FN

from baselines.wise.router import Observer, routing
from baselines.wise.side_memory import SideMemory
from baselines.wise.wise_hparams import WISEHyperParams
from baselines.wise.wise_main import execute_wise, unrelated_texts
from editing.editor import Editor, EditOutcome
from editing.memory_layer import edit_in_turn
from editing.resources import EditResources, default_resources
from util import nethook
from util.architectures import mlp_activation


class WISEEditor(Editor):
    def __init__(self, model: nn.Module, tok: PreTrainedTokenizerBase, hparams: Any, resources: Any):
        super().__init__(model, tok, hparams, resources or default_resources(model))
        self.unrelated = unrelated_texts(self.resources.paths, hparams.unrelated_file)
        self.memory = SideMemory(nethook.get_parameter(model, f"{hparams.module_name}.weight").detach())
        self.act = ACT2FN[mlp_activation(model)]
        self.templates = self.resources.context_templates(model, tok, hparams.template_spec)

    def edit(self, requests: Sequence[dict]) -> EditOutcome:
        details = execute_wise(self.model, self.tok, self._one_request(requests), self.hparams, self.memory,
                               self.templates, self.unrelated, self.act, self.resources)
        return EditOutcome({}, details)

    def for_evaluation(self) -> contextlib.AbstractContextManager[None]:
        return self.routed()

    @contextlib.contextmanager
    def routed(self, act_ratio: Optional[float] = None, observe: Optional[Observer] = None) -> Iterator[None]:
        """The model with the router on, at ``act_ratio`` (default the hparams'), ``observe`` shown each
        pass's choices: the evaluation's view, and a diagnostic's at any other ratio without editing again."""
        ratio = self.hparams.act_ratio if act_ratio is None else act_ratio
        with routing(self.model, self.hparams.module_name, self.memory, self.act, ratio, observe):
            yield

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.memory.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.memory.load_state_dict(state)


def apply_wise_to_model(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    requests: Sequence[dict],
    hparams: WISEHyperParams,
    copy: bool = False,
    return_orig_weights: bool = False,
    resources: EditResources | None = None,
    editor: Optional[WISEEditor] = None,
) -> tuple[nn.Module, dict[str, torch.Tensor], WISEEditor]:
    """Edit with each request in turn; returns (model, {} since no weight changes, the editor).

    The edits live in the editor's side memory: evaluate inside ``with editor.for_evaluation():``,
    and pass ``editor`` back to continue a sequence (then ``copy`` must be False).
    """
    return edit_in_turn(WISEEditor, model, tok, requests, hparams, copy, resources, editor)
