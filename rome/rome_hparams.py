"""ROME hyperparameters: the shared locate-then-edit fields (editing/hparams.py), field for field as in
ROME's JSON files, plus r-ROME's choice of key in the rank-one solve."""
from __future__ import annotations

import dataclasses

from editing.hparams import LocateEditHyperParams


@dataclasses.dataclass(frozen=True, kw_only=True)
class ROMEHyperParams(LocateEditHyperParams):
    consistent_keys: bool = False  # r-ROME: use the template-averaged key k* in the rank-one solve
