"""The dispatch table of the evaluate CLI: exact algorithm names to hparams class and editor class.

Adding a method is one package (its math, its hparams dataclass, its ``Editor`` subclass), one
entry here, and its ``hparams/<ALG>/<model>.json`` files. Classes are named by "module:Class" and
imported on use, so running ROME never imports MEND.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Any


@dataclasses.dataclass(frozen=True)
class Algorithm:
    name: str
    hparams_class: str  # "module:Class", a util.hparams.HyperParams
    editor_class: str  # "module:Class", an editing.editor.Editor

    def load_hparams_class(self) -> type:
        return _load(self.hparams_class)

    def load_editor_class(self) -> type:
        return _load(self.editor_class)

    def make_editor(self, model: Any, tok: Any, hparams: Any, resources: Any) -> Any:
        return self.load_editor_class()(model, tok, hparams, resources)


def _load(ref: str) -> Any:
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


ALGORITHMS: dict[str, Algorithm] = {
    alg.name: alg
    for alg in (
        Algorithm("ROME", "rome.rome_hparams:ROMEHyperParams", "rome.editor:ROMEEditor"),
        Algorithm("WilKE", "wilke.wilke_hparams:WilKEHyperParams", "wilke.editor:WilKEEditor"),
        Algorithm("MEMIT", "memit.memit_hparams:MEMITHyperParams", "memit.editor:MEMITEditor"),
        Algorithm("FT", "baselines.ft.ft_hparams:FTHyperParams", "baselines.ft.editor:FTEditor"),
        Algorithm("KN", "baselines.kn.kn_hparams:KNHyperParams", "baselines.kn.editor:KNEditor"),
        Algorithm("MEND", "baselines.mend.mend_hparams:MENDHyperParams", "baselines.mend.editor:MENDEditor"),
        Algorithm("KE", "baselines.efk.efk_hparams:KEHyperParams", "baselines.efk.editor:KEEditor"),
        Algorithm("AlphaEdit", "alphaedit.alphaedit_hparams:AlphaEditHyperParams", "alphaedit.editor:AlphaEditEditor"),
        Algorithm("RECT", "baselines.rect.rect_hparams:RECTHyperParams", "baselines.rect.editor:RECTEditor"),
        Algorithm("PRUNE", "baselines.prune.prune_hparams:PRUNEHyperParams", "baselines.prune.editor:PRUNEEditor"),
        Algorithm("GRACE", "baselines.grace.grace_hparams:GRACEHyperParams", "baselines.grace.editor:GRACEEditor"),
        Algorithm("WISE", "baselines.wise.wise_hparams:WISEHyperParams", "baselines.wise.editor:WISEEditor"),
        Algorithm("UltraEdit", "ultraedit.ultraedit_hparams:UltraEditHyperParams", "ultraedit.editor:UltraEditEditor"),
        Algorithm("ENCORE", "encore.encore_hparams:ENCOREHyperParams", "encore.editor:ENCOREEditor"),
    )
}


def get_algorithm(name: str) -> Algorithm:
    if name not in ALGORITHMS:
        raise KeyError(f"unknown --alg_name {name!r}; choose one of: {', '.join(ALGORITHMS)}")
    return ALGORITHMS[name]
