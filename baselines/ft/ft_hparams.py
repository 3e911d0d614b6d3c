"""Fine-tuning baseline hyperparameters (ROME's FT / FT-L), field for field, plus documented extras."""
from __future__ import annotations

import dataclasses
from typing import Optional

from util.hparams import HParamsError, HyperParams


@dataclasses.dataclass(frozen=True)
class FTHyperParams(HyperParams):
    # Method
    layers: tuple[int, ...]
    num_steps: int  # epochs over the requests
    lr: float
    weight_decay: float
    kl_factor: float  # 0 in every reference file (its code ignores it); > 0 adds KL on "{} is a"
    # FT-L: every entry of the changed weights stays within +-norm_constraint of its original value
    # (an L-infinity ball, as in ROME's code); None (the reference's false) is plain FT.
    norm_constraint: Optional[float]

    # Module templates (checked against util/architectures.py when the model is known)
    rewrite_module_tmp: str
    layer_module_tmp: str
    mlp_module_tmp: str
    attn_module_tmp: str
    ln_f_module: str
    lm_head_module: str

    batch_size: int = 128
    early_stop_loss: float = 1e-2  # skip a step below it; stop once an epoch's mean loss is below it

    def validate(self) -> None:
        if not self.layers:
            raise HParamsError("field 'layers' must name at least one layer")
        if self.num_steps < 1:
            raise HParamsError("field 'num_steps' must be at least 1")
        if self.batch_size < 1:
            raise HParamsError("field 'batch_size' must be at least 1")
        if self.norm_constraint is not None and self.norm_constraint <= 0:
            raise HParamsError("field 'norm_constraint' must be positive, or null for unconstrained FT")
        if self.kl_factor < 0:
            raise HParamsError("field 'kl_factor' must not be negative")
        if "{}" not in self.rewrite_module_tmp:
            raise HParamsError("field 'rewrite_module_tmp' must contain '{}' for the layer index")
