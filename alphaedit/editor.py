"""AlphaEdit as a run's editor: MEMIT's batches, projected updates, and the keys of earlier edits as state.

The null spaces are cut once, when the editor is built: the run builds it on the freshly loaded
model, before any edit or restored checkpoint changes it, so a resumed run projects with the same P
(read back from the cache beside the statistics). K_p K_p^T is the editor's state: the run saves it
with every weight checkpoint (``state_dict``) and restores it on resume (``load_state_dict``).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from alphaedit.alphaedit_hparams import AlphaEditHyperParams
from alphaedit.alphaedit_main import execute_alphaedit
from alphaedit.projection import ProjectorCache
from editing.editor import EditOutcome, apply_with_editor
from editing.resources import EditResources, default_resources
from memit.editor import MomentsEditor


class AlphaEditEditor(MomentsEditor):
    batch_edits = True

    def __init__(self, model: nn.Module, tok: PreTrainedTokenizerBase, hparams: Any, resources: Any,
                 cache_template: Optional[str] = None):
        super().__init__(model, tok, hparams, resources or default_resources(model), cache_template)
        self.null_spaces = ProjectorCache(self.resources).null_spaces(model, tok, hparams, self.module_names)
        self.resources.release(hparams, self.module_names)  # the solve reads P, never C0 again

    def edit(self, requests: Sequence[dict]) -> EditOutcome:
        update = execute_alphaedit(self.model, self.tok, list(requests), self.hparams, self.null_spaces,
                                   self.moments, self.resources, self.cache_template)
        self.moments.add(update)
        dims = {str(l): self.null_spaces[n].dim for l, n in zip(self.hparams.layers, self.module_names)}
        return self.apply(update, {"null_space_dims": dims, "accumulated_keys": self.moments.n_keys})


def apply_alphaedit_to_model(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    requests: Sequence[dict],
    hparams: AlphaEditHyperParams,
    copy: bool = False,
    return_orig_weights: bool = False,
    cache_template: Optional[str] = None,
    resources: Optional[EditResources] = None,
    editor: Optional[AlphaEditEditor] = None,
) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """Edit ``model`` with all ``requests`` as one AlphaEdit batch; returns (model, original weights if asked).

    The editor holds K_p K_p^T (upstream returns and takes ``cache_c``) and the null spaces: pass the
    ``editor`` of the earlier calls to continue a sequence (``AlphaEditEditor(model, tok, hparams,
    resources)``); without it the batch is edited as the first of its run. The null spaces come from
    the statistics of the unedited model, so a first call on an already edited model must find them
    cached. ``cache_template`` reuses MEMIT's z cache."""
    return apply_with_editor(AlphaEditEditor, model, tok, requests, hparams, copy, return_orig_weights, resources,
                             editor, cache_template=cache_template)
