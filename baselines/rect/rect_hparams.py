"""RECT hyperparameters: MEMIT's, plus the share of each update's entries that is kept.

AlphaEdit's RECT baseline (``memit/memit_rect_main.py``, alg ``MEMIT_rect``) runs on MEMIT's hparams
files with k = 40 and eps = 1e-8 written into its code; here they are fields, defaulting to those
values. The official RECT code (JasonForJoy/Model-Editing-Hurt, ROME only, commented out) keeps 20%.
"""
from __future__ import annotations

import dataclasses

from memit.memit_hparams import MEMITHyperParams
from util.hparams import HParamsError


@dataclasses.dataclass(frozen=True, kw_only=True)
class RECTHyperParams(MEMITHyperParams):
    keep_percent: float = 40.0  # k: the top k% of entries by relative change |Delta / (W + eps)| survive
    epsilon: float = 1e-8  # added to the signed weight in the relative change, as AlphaEdit's baseline does

    def validate(self) -> None:
        super().validate()
        if not 0 < self.keep_percent <= 100:
            raise HParamsError(f"field 'keep_percent' is {self.keep_percent}; expected a share in (0, 100]")
        if self.epsilon < 0:
            raise HParamsError("field 'epsilon' must not be negative")
