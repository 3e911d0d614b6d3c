"""GRACE hyperparameters (Hartvigsen et al., NeurIPS 2023): the watched layer, the codebook's radius
rule and how a value is trained.

Upstream names (Thartvigsen/GRACE ``config/editor/grace.yaml``; EasyEdit ``hparams/GRACE``):
``eps`` the initial deferral radius, ``eps_expand`` the rule for a same-label key within reach,
``val_init`` cold (uniform random) or warm (the layer's current output), ``edit_lr``/``n_iter`` Adam on
the value. ``inner_params`` ("transformer.h[35].mlp.c_fc.weight") is ``edit_module_tmp`` + ``layer``
here. Upstream fields its code never reads (``dist_fn``: always Euclidean; ``val_reg``, ``reg``,
``dropout``, ``num_pert`` with ``val_train`` "sgd") are left out, and so is ``replacement``: this
harness replaces at every position whose query lies in a radius (grace_main.py says why).
"""
from __future__ import annotations

import dataclasses

from editing.memory_layer import MemoryLayerHyperParams, positive
from util.hparams import HParamsError

VALUE_INITS = ("cold", "warm")
EXPANSIONS = ("coverage", "moving_average")


@dataclasses.dataclass(frozen=True, kw_only=True)
class GRACEHyperParams(MemoryLayerHyperParams):
    eps: float  # radius of a new key (a Euclidean distance between layer inputs)
    edit_lr: float
    n_iter: int
    val_init: str = "cold"
    eps_expand: str = "coverage"
    seed: int = 0  # seeds the cold values (upstream draws them from the global RNG)

    def validate(self) -> None:
        super().validate()
        positive(self, "eps", "edit_lr", "n_iter")
        if self.val_init not in VALUE_INITS:
            raise HParamsError(f"field 'val_init' is {self.val_init!r}; expected one of {VALUE_INITS}")
        if self.eps_expand not in EXPANSIONS:
            raise HParamsError(f"field 'eps_expand' is {self.eps_expand!r}; expected one of {EXPANSIONS}")
