"""ENCORE as a run's editor: MEMIT's batches, MPES-stopped values, the Frobenius-norm solve, and the
keys of earlier edits as state; and ``apply_encore_to_model``, the apply contract over this editor.

K_p K_p^T (upstream's ``SEQ_CACHE``) starts empty when the editor is built and grows with every
batch; the run saves it with every weight checkpoint (``state_dict``) and restores it on resume
(``load_state_dict``), so a resumed run solves exactly as the uninterrupted one. The statistics C0
stay loaded: every batch's solve reads them.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from editing.editor import EditOutcome, apply_with_editor
from editing.resources import EditResources
from encore.encore_hparams import ENCOREHyperParams
from encore.encore_main import execute_encore
from memit.editor import MomentsEditor


class ENCOREEditor(MomentsEditor):
    batch_edits = True

    def __init__(self, model: nn.Module, tok: PreTrainedTokenizerBase, hparams: ENCOREHyperParams, resources: Any,
                 cache_template: Optional[str] = None):
        super().__init__(model, tok, hparams, resources, cache_template)  # NAS's reference norms when asked

    def edit(self, requests: Sequence[dict]) -> EditOutcome:
        update = execute_encore(self.model, self.tok, list(requests), self.hparams, self.moments, self.resources,
                                self.cache_template)
        self.moments.add(update)
        return self.apply(update, {"accumulated_keys": self.moments.n_keys})


def apply_encore_to_model(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    requests: Sequence[dict],
    hparams: ENCOREHyperParams,
    copy: bool = False,
    return_orig_weights: bool = False,
    cache_template: Optional[str] = None,
    resources: Optional[EditResources] = None,
    editor: Optional[ENCOREEditor] = None,
) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """Edit ``model`` with all ``requests`` as one ENCORE batch; returns (model, original weights if asked).

    The editor holds K_p K_p^T (upstream's module-level ``SEQ_CACHE``): pass the ``editor`` of the
    earlier calls to continue a sequence; without it the batch is edited as the first of its run.
    ``cache_template`` reuses MEMIT's z cache (only sound when every edit starts from the same model)."""
    return apply_with_editor(ENCOREEditor, model, tok, requests, hparams, copy, return_orig_weights, resources,
                             editor, cache_template=cache_template)
