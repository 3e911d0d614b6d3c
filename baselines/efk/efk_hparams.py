"""KE hyperparameters (De Cao et al. 2021; 'efk' in the MEND code base): the sizes of its
LSTM conditioner and per-weight hyper-networks, on top of the shared editor fields."""
from __future__ import annotations

import dataclasses

from baselines.mend.editor_hparams import EditorHyperParams
from util.hparams import HParamsError


@dataclasses.dataclass(frozen=True)
class KEHyperParams(EditorHyperParams):
    hidden_dim: int = 512  # LSTM width (each direction) and hyper-network hidden width
    condition_dim: int = 768  # the condition vector fed to every hyper-network
    max_scale: float = 1.0  # the update is max_scale * sigmoid(.) * (grad * A + B)

    def validate(self) -> None:
        super().validate()
        if self.hidden_dim < 1 or self.condition_dim < 1:
            raise HParamsError("fields 'hidden_dim' and 'condition_dim' must be at least 1")

    def architecture(self) -> dict:
        return {**super().architecture(), **{k: getattr(self, k) for k in ("hidden_dim", "condition_dim", "max_scale")}}
