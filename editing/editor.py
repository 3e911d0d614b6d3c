"""The editor contract: one object per run and algorithm, which edits the model and keeps its state.

A run builds its editor once from (model, tokenizer, hparams, run resources), then calls
``edit(requests)`` for every batch and, under the roll-back protocol, ``rollback`` after each edit.
An editor that keeps something between edits (AlphaEdit's keys of earlier edits, a trained
network's state) exposes it through ``state_dict`` / ``load_state_dict``: the run saves it with the
weight checkpoints, so a resumed run continues exactly where the killed one stopped.

Adding a method is one package whose editor subclasses ``Editor``, one entry in
experiments/algorithms.py and its hparams files.
"""
from __future__ import annotations

import contextlib
import copy as copy_module
import dataclasses
from typing import Any, ClassVar, Iterator, Sequence

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from editing.norm_reference import prepare_norm_anchors
from editing.requests import swapped_request
from editing.resources import default_resources
from util import nethook
from util.placement import HALF_DTYPES


@dataclasses.dataclass
class EditOutcome:
    """What one ``edit`` did: the original value of every weight it changed, and JSON-ready details
    (WilKE: the chosen layer and every LA; MEMIT: per-layer norms). The run measures update norms
    from ``orig_weights``, so every method's files show a toxicity flash the same way."""

    orig_weights: dict[str, torch.Tensor]
    details: dict[str, Any]


class Editor:
    """Base class of every method's editor; subclasses implement ``edit``.

    ``batch_edits``: whether one ``edit`` call takes several requests at once (MEMIT's batches); a
    method that edits one fact at a time (ROME, WilKE) says False and the protocols never give it more.
    """

    batch_edits: ClassVar[bool] = False

    def __init__(self, model: nn.Module, tok: PreTrainedTokenizerBase, hparams: Any, resources: Any):
        self.model, self.tok, self.hparams, self.resources = model, tok, hparams, resources

    def edit(self, requests: Sequence[dict]) -> EditOutcome:
        raise NotImplementedError

    def rollback(self, requests: Sequence[dict], outcome: EditOutcome) -> EditOutcome:
        """Undo ``outcome`` the WilKE way: edit again with the targets swapped (weights never restored)."""
        return self.edit([swapped_request(r) for r in requests])

    @contextlib.contextmanager
    def for_evaluation(self) -> Iterator[None]:
        """The model as the method delivers it, while the protocol evaluates it.

        Most methods deliver the edited weights as they are. A method that post-processes the
        accumulated edit before use (PRUNE restrains it once, after the last edit) applies that here
        and undoes it on exit, so evaluating at several checkpoints equals post-processing after each.
        """
        yield

    def state_dict(self) -> dict[str, torch.Tensor]:
        """What the method keeps between edits (nothing, for most methods)."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state between edits, but a checkpoint holds {sorted(state)}")

    def _one_request(self, requests: Sequence[dict]) -> dict:
        if len(requests) != 1:
            raise ValueError(f"{type(self).__name__} edits one fact at a time; got a batch of {len(requests)}")
        return requests[0]


class LocateEditEditor(Editor):
    """The editor of a locate-then-edit method (ROME, WilKE, MEMIT and the methods built on it): run
    resources of its own when none are given, and NAS's reference norms (``value_norm_anchor``) made when
    it is built, which the run does on the freshly loaded model, before any edit or restored checkpoint."""

    def __init__(self, model: nn.Module, tok: PreTrainedTokenizerBase, hparams: Any, resources: Any):
        super().__init__(model, tok, hparams, resources or default_resources(model))
        prepare_norm_anchors(model, tok, hparams, self.resources)


def snapshot_weights(model: nn.Module, weight_names: Sequence[str], into: dict[str, torch.Tensor]) -> None:
    """Keep a copy of each named weight the first time it is about to change."""
    for name in weight_names:
        if name not in into:
            into[name] = nethook.get_parameter(model, name).detach().clone()


@torch.no_grad()
def update_norms(model: nn.Module, orig_weights: dict[str, torch.Tensor]) -> dict[str, Any]:
    """||W_new - W_old||_F per changed weight, their total, the total relative to ||W_old||, and each
    changed weight's own norm ||W_new||_F after the edit (NAS's growth of the edited layers)."""
    per, after = {}, {}
    total_sq, base_sq = 0.0, 0.0
    for name, old in orig_weights.items():
        new = nethook.get_parameter(model, name).detach().to(old.device)
        if old.dtype in HALF_DTYPES:  # norms of half-precision matrices are taken in float32
            new, old = new.float(), old.float()
        diff = float((new - old).norm())
        per[name] = diff
        after[name] = float(new.norm())
        total_sq += diff**2
        base_sq += float(old.norm()) ** 2
    total = total_sq**0.5
    return {"update_norm": total, "relative_update_norm": total / base_sq**0.5 if base_sq else 0.0, "per_weight": per,
            "weight_norms": after}


def apply_with_editor(
    editor_class: type[Editor],
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    requests: Sequence[dict],
    hparams: Any,
    copy: bool = False,
    return_orig_weights: bool = False,
    resources: Any = None,
    editor: Editor | None = None,
    **options: Any,
) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """ROME's and MEMIT's ``apply_<alg>_to_model`` contract over a method's editor: every method's apply
    function is this, so it edits exactly as a run does. ``requests`` go in one ``edit`` call when the
    method edits in batches, else one at a time; returns (model, the original of every changed weight
    if asked). ``copy`` edits a deep copy. A method that keeps state between edits (AlphaEdit's keys,
    UltraEdit's normaliser) continues a sequence when given the ``editor`` of the earlier calls;
    ``options`` go to the editor's constructor (e.g. ROME's and MEMIT's ``cache_template``)."""
    if editor is not None and copy:
        raise ValueError("copy=True makes a new model, but the given editor edits the one it was built on")
    if copy:
        model = copy_module.deepcopy(model)
    if editor is None:
        editor = editor_class(model, tok, hparams, resources or default_resources(model), **options)
    elif editor.model is not model:
        raise ValueError("the given editor edits another model than the one given")
    weights: dict[str, torch.Tensor] = {}
    for batch in [list(requests)] if editor.batch_edits else [[r] for r in requests]:
        for name, original in editor.edit(batch).orig_weights.items():
            weights.setdefault(name, original)
    return model, weights if return_orig_weights else {}
