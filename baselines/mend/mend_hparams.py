"""MEND hyperparameters: the editor network of the MEND code base (its ``mend:`` config block)
plus the learned per-weight edit learning rates, on top of the shared editor fields."""
from __future__ import annotations

import dataclasses

from baselines.mend.editor_hparams import EditorHyperParams
from util.hparams import HParamsError


@dataclasses.dataclass(frozen=True)
class MENDHyperParams(EditorHyperParams):
    # Editor network (MEND defaults: one hidden layer, rank 1920, identity init, shared per shape)
    n_hidden: int = 1
    rank: int = 1920
    norm: bool = True  # normalise (x, delta) with running mean/std, as in the paper
    combine: bool = True  # one MLP on [x; delta] rather than one per factor
    shared: bool = True  # one MLP per weight shape, with per-weight scale/shift ("modes")

    # Learned edit step: W <- W - lr_scale * edit_lr_l * delta~^T x~ (edit_lr_l trained with lr_lr)
    edit_lr: float = 1e-4
    lr_lr: float = 1e-4
    lr_scale: float = 1.0  # multiplies the learned lrs at edit time (ROME's MEND hparam)

    def validate(self) -> None:
        super().validate()
        if self.n_hidden < 0:
            raise HParamsError("field 'n_hidden' must be >= 0")
        if self.rank < 1:
            raise HParamsError("field 'rank' must be at least 1")

    def architecture(self) -> dict:
        return {
            **super().architecture(),
            **{k: getattr(self, k) for k in ("n_hidden", "rank", "norm", "combine", "shared")},
        }
