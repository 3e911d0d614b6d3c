"""ENCORE hyperparameters: MEMIT's, plus the Frobenius-norm weight and the switch for earlier edits' keys.

Upstream's JSON files (scalable-model-editing/encore ``hparams/ENCORE/{gpt2-xl,llama3-8b}.json``) are
MEMIT's fields plus, read by ``encore_main.py``: ``update_norm_lambda`` (alpha, the Frobenius-norm
term), ``add_prev_edits`` (add the keys of earlier batches to the solve) and ``prob_cutoff`` (MPES;
here the shared field ``mpes_prob_cutoff``, same value, read by editing/value_optimisation.py).
``mom2_update_weight`` is lambda_p. Fields upstream declares but ENCORE's code never reads
(``emmet_lambda``, ``norm_control``, ``dynamic_multiplier``, ``random_vector_preservation``,
``calculate_objective_value``: distance diagnostics only, ``layer_selection``) are left out, as MEMIT's
files here leave out ``layer_selection``.
"""
from __future__ import annotations

import dataclasses

from memit.memit_hparams import MEMITHyperParams
from util.hparams import HParamsError


@dataclasses.dataclass(frozen=True, kw_only=True)
class ENCOREHyperParams(MEMITHyperParams):
    # alpha in Delta = R K^T (lambda_p C0 + alpha I + K_p K_p^T + K K^T)^{-1}; gpt2-xl 10, llama3-8b 20
    update_norm_lambda: float
    # add K_p K_p^T, the keys of every earlier batch (upstream's SEQ_CACHE), to the solve
    add_prev_edits: bool = True

    def validate(self) -> None:
        super().validate()
        if self.update_norm_lambda < 0:
            raise HParamsError("field 'update_norm_lambda' must be 0 or positive (the weight of ||Delta||_F^2)")
