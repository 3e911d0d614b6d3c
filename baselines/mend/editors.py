"""The trained editors by name: how to build each for a model, and how to read its checkpoints.

``EDITORS`` is the one table the trainer, the executors and the checkpoint loader consult, with
exact keys ('MEND', 'KE') as the evaluate CLI's ``--alg_name``.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, Optional

from torch import nn

from baselines.mend.editor_hparams import EditorHyperParams
from baselines.mend.functional import InnerParam, inner_params


@dataclasses.dataclass(frozen=True)
class EditorKind:
    name: str
    hparams_class: str  # "module:Class"
    default_weights_dir: str  # where the README puts this editor's files
    build: Callable[[nn.Module, list[InnerParam], Any, Optional[dict]], nn.Module]
    is_official: Callable[[dict], bool]
    load_official: Callable[[nn.Module, list[InnerParam], Any, dict], nn.Module]

    def load_hparams_class(self) -> type:
        module, _, attr = self.hparams_class.partition(":")
        return getattr(importlib.import_module(module), attr)


def _build_mend(model: nn.Module, params: list[InnerParam], hparams, official: Optional[dict] = None) -> nn.Module:
    from baselines.mend.mend_network import MendNetwork

    return MendNetwork(params, hparams)


def _load_official_mend(model: nn.Module, params: list[InnerParam], hparams, state: dict) -> nn.Module:
    from baselines.mend.official import load_official_mend

    editor = _build_mend(model, params, hparams)
    load_official_mend(editor, state)
    return editor


def _is_official_mend(state: dict) -> bool:
    from baselines.mend.official import is_official_mend

    return is_official_mend(state)


def _build_ke(model: nn.Module, params: list[InnerParam], hparams, official: Optional[dict] = None) -> nn.Module:
    from baselines.efk.ke_network import KENetwork

    embedding = model.get_input_embeddings().weight.detach()
    vocab = embedding.shape[0]
    if official is not None:
        from baselines.efk.official import official_vocab_size

        vocab = max(vocab, official_vocab_size(official))
    return KENetwork(params, hparams, vocab, embedding.shape[1], embedding_init=embedding)


def _load_official_ke(model: nn.Module, params: list[InnerParam], hparams, state: dict) -> nn.Module:
    from baselines.efk.official import map_official_efk_state

    editor = _build_ke(model, params, hparams, official=state)
    editor.load_state_dict(map_official_efk_state(state), strict=True)
    return editor


def _is_official_ke(state: dict) -> bool:
    from baselines.efk.official import is_official_efk

    return is_official_efk(state)


EDITORS: dict[str, EditorKind] = {
    "MEND": EditorKind("MEND", "baselines.mend.mend_hparams:MENDHyperParams", "baselines/mend/weights",
                       _build_mend, _is_official_mend, _load_official_mend),
    "KE": EditorKind("KE", "baselines.efk.efk_hparams:KEHyperParams", "baselines/efk/weights",
                     _build_ke, _is_official_ke, _load_official_ke),
}


def get_editor_kind(name: str) -> EditorKind:
    if name not in EDITORS:
        raise KeyError(f"unknown editor {name!r}; choose one of: {', '.join(EDITORS)}")
    return EDITORS[name]


def build_editor(kind: str, model: nn.Module, hparams: EditorHyperParams) -> nn.Module:
    """A fresh (untrained) editor for this model, on the model's device."""
    params = inner_params(model, hparams.inner_params)
    editor = get_editor_kind(kind).build(model, params, hparams, None)
    return editor.to(next(model.parameters()).device)
