"""AlphaEdit hyperparameters: MEMIT's, plus the null-space threshold and the L2 term of its solve.

AlphaEdit's JSON files (jianghoucheng/AlphaEdit ``hparams/AlphaEdit/*.json``) are MEMIT's fields plus
``nullspace_threshold`` (2e-2 in every file) and ``L2`` (10). Its code never reads
``mom2_update_weight`` or ``mom2_adjustment``: the statistics enter only through the projector P.
The files here keep both with the reference values, so they read field for field as the paper's;
``model_name`` and ``layer_selection`` (read by nothing) are left out, as in MEMIT's files.
"""
from __future__ import annotations

import dataclasses

from memit.memit_hparams import MEMITHyperParams
from util.hparams import HParamsError


@dataclasses.dataclass(frozen=True, kw_only=True)
class AlphaEditHyperParams(MEMITHyperParams):
    # P projects onto the eigenvectors of E[k k^T] whose eigenvalue is below this (absolute) threshold
    nullspace_threshold: float
    # the ridge term of (P (K_p K_p^T + K K^T) + L2 I) X = P K R^T
    L2: float

    def validate(self) -> None:
        super().validate()
        if self.nullspace_threshold <= 0:
            raise HParamsError("field 'nullspace_threshold' must be positive (an eigenvalue bound of E[k k^T])")
        if self.L2 <= 0:
            raise HParamsError("field 'L2' must be positive: without it the projected system is singular")
