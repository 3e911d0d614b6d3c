"""MEMIT hyperparameters: the shared locate-then-edit fields (editing/hparams.py: ROME's z optimisation,
key and statistics fields) plus the update weight.

MEMIT's reference JSON files are ROME's fields plus ``mom2_update_weight`` (lambda of the
regularised least-squares update) and a ``layer_selection`` that its code never reads (left out).
Its context templates are not ROME's: one continuation of 10 tokens after each of "The",
"Therefore", "Because", "I", "You" (``[[10, 5]]`` in the JSON: 5 samples of 10 tokens, 5 // 5 per
prompt; ``context_template_prompts`` defaults to those five prompts here).

lambda is not scale-free: with C = E[k k^T], a key's k^T C^{-1} k grows with the MLP width d, and
the share of the residual one layer absorbs for a lone edit is m / (lambda + m), m = k^T C^{-1} k.
The small models' files scale GPT-J's 15000 by d / 16384 (SmolLM2 1536 -> 1500, Gemma 2048 -> 2000);
on SmolLM2 15000 absorbed too little (z error 93 -> 78 over six layers) and missed edits.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar, Optional

from editing.context_templates import MEMIT_PROMPTS
from editing.hparams import LocateEditHyperParams
from util.hparams import HParamsError


@dataclasses.dataclass(frozen=True, kw_only=True)
class MEMITHyperParams(LocateEditHyperParams):
    # lambda in Delta = R K^T (lambda C + K K^T)^{-1}; gpt2-xl 20000, gpt-j 15000
    mom2_update_weight: float
    context_template_prompts: Optional[tuple[str, ...]] = MEMIT_PROMPTS
    # z is a residual-stream target spread over the layers through the MLP outputs, which assumes each
    # MLP's output is added to the residual as it is (util/architectures.py check_residual_targets)
    writes_residual_targets: ClassVar[bool] = True

    def validate(self) -> None:
        super().validate()
        if list(self.layers) != sorted(set(self.layers)):
            raise HParamsError(f"field 'layers' must be strictly increasing, got {list(self.layers)}")
        if self.mom2_update_weight <= 0:
            raise HParamsError("field 'mom2_update_weight' must be positive")
        if self.v_loss_layer < self.layers[-1]:
            raise HParamsError(
                f"field 'v_loss_layer' is {self.v_loss_layer}, below the last edited layer {self.layers[-1]}"
            )

    @property
    def z_layer(self) -> int:
        """The layer whose block output z is optimised: the last of the range."""
        return self.layers[-1]

    @property
    def norm_anchor_layers(self) -> list[int]:
        return [self.z_layer]  # upstream NAS calls compute_z(..., layer=z_layer)
