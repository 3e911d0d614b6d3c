"""Applying a trained editor to a model: ROME's ``MendRewriteExecutor``/``EfkRewriteExecutor`` API.

``apply_to_model(model, tok, request(s), hparams, copy=False, return_orig_weights=False)`` ->
``(model, weights_copy)``, as the ROME baselines. For each request the edit input is
prompt.format(subject) + " " + target_new; one forward/backward pass gives the gradient factors of
the edited weights, the editor turns them into updates, and the updates are added in place. The
reference executors also add a [PAD] token to the tokenizer and resize the model's embeddings;
that changes the model being evaluated, so it is not done here (edits use one unpadded sequence).
"""
from __future__ import annotations

import copy as copy_module
import dataclasses
import logging
from typing import Optional, Sequence

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from baselines.mend.batches import make_batch, request_example, segments_of
from baselines.mend.checkpoints import load_editor
from baselines.mend.editor_hparams import EditorHyperParams
from baselines.mend.functional import (
    RunnerFactory,
    current_weights,
    edited_weights,
    gradient_factors,
    inner_params,
    token_nll,
)
from editing.editor import snapshot_weights
from util import nethook
from util.scoring import model_device

LOG = logging.getLogger(__name__)


@dataclasses.dataclass
class EditResult:
    updates: dict[str, torch.Tensor]  # parameter layout
    pre_nll: float  # mean NLL of the new target's tokens before the edit
    post_nll: float  # ... after it (computed functionally, before the weights change)

    def details(self) -> dict:
        return {
            "pre_edit_target_nll": self.pre_nll,
            "post_edit_target_nll": self.post_nll,
            "update_norms": {k: float(v.norm()) for k, v in self.updates.items()},
        }


def compute_edit(model: nn.Module, tok: PreTrainedTokenizerBase, editor: nn.Module, request: dict,
                 hparams: EditorHyperParams, runners: RunnerFactory) -> EditResult:
    """The updates the editor makes for one request; the model is left unchanged."""
    params = inner_params(model, hparams.inner_params)
    batch = make_batch(tok, segments_of(request_example(request), False, False), model_device(model))
    runner = runners(model, batch, min(p.block for p in params))
    factors, _, pre_loss = gradient_factors(runner, params)
    with torch.no_grad():
        updates = editor.updates(factors, condition=batch.sequence_ids(0))
        post = token_nll(runner.logits(edited_weights(current_weights(model, params), updates)), batch, batch.positions_of("inner"))
    return EditResult({k: v.detach() for k, v in updates.items()}, float(pre_loss), float(post))


class EditorExecutor:
    """Holds one loaded editor and applies it; reloads when the model or the hparams change."""

    method_name = "editor"

    def __init__(self, kind: str):
        self.kind = kind
        self.editor: Optional[nn.Module] = None
        self.archive: Optional[str] = None
        self._key: Optional[tuple] = None
        self.runners = RunnerFactory()

    def init_model(self, model: nn.Module, tok: PreTrainedTokenizerBase, hparams: EditorHyperParams) -> None:
        path = hparams.archive_path()
        stat = path.stat() if path is not None and path.is_file() else None
        key = (id(model), str(path), stat and (stat.st_mtime_ns, stat.st_size), repr(hparams.to_dict()))
        if key == self._key:
            return
        self.editor, _ = load_editor(self.kind, model, hparams)
        if hasattr(self.editor, "lr_scale"):
            self.editor.lr_scale = hparams.lr_scale
        self.archive, self._key = str(path), key
        self.runners = RunnerFactory(hparams.implementation)

    def reset_model(self) -> None:
        self.editor, self._key = None, None

    def edit(self, model: nn.Module, tok: PreTrainedTokenizerBase, request: dict, hparams: EditorHyperParams) -> EditResult:
        """Compute and apply one edit in place."""
        self.init_model(model, tok, hparams)
        result = compute_edit(model, tok, self.editor, request, hparams, self.runners)
        with torch.no_grad():
            for name, update in result.updates.items():
                p = nethook.get_parameter(model, name)
                p.add_(update.to(p.dtype))
        LOG.info("%s edit: target NLL %.3f -> %.3f", self.kind, result.pre_nll, result.post_nll)
        return result

    def apply_to_model(
        self,
        model: nn.Module,
        tok: PreTrainedTokenizerBase,
        requests: dict | Sequence[dict],
        hparams: EditorHyperParams,
        copy: bool = False,
        return_orig_weights: bool = False,
    ) -> tuple[nn.Module, dict[str, torch.Tensor]]:
        if copy:
            model = copy_module.deepcopy(model)
        weights_copy: dict[str, torch.Tensor] = {}
        for request in [requests] if isinstance(requests, dict) else requests:
            if return_orig_weights:
                snapshot_weights(model, hparams.inner_params, weights_copy)
            self.edit(model, tok, request, hparams)
        return model, weights_copy


class MendRewriteExecutor(EditorExecutor):
    method_name = "MEND"

    def __init__(self) -> None:
        super().__init__("MEND")
