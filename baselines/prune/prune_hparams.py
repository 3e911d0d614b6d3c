"""PRUNE hyperparameters: MEMIT's (the edits are plain sequential MEMIT), plus the log base of the restraint.

The official code picks the base with ``--reduce_type`` (``log``: e; ``log2``, ``log1_5``, ``log1_2``:
2, 1.5, 1.2) and the paper tunes it per method, model and data set; AlphaEdit's PRUNE baseline uses
the natural log, the default here.
"""
from __future__ import annotations

import dataclasses
import math

from memit.memit_hparams import MEMITHyperParams
from util.hparams import HParamsError


@dataclasses.dataclass(frozen=True, kw_only=True)
class PRUNEHyperParams(MEMITHyperParams):
    log_base: float = math.e  # alpha of F(s) = log_alpha(s) - log_alpha(sigma_max) + sigma_max

    def validate(self) -> None:
        super().validate()
        if self.log_base <= 1:
            raise HParamsError(f"field 'log_base' is {self.log_base}; a restraint needs a base above 1")
