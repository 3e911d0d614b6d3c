"""The MEND editor: gradient factors of each edited weight -> a weight update.

For weight l with factors (x_i, delta_i): (x~_i, delta~_i) = g_l(x_i, delta_i) and
    W_l <- W_l - lr_scale * edit_lr_l * sum_i delta~_i x~_i^T,
the paper's update (a descent step with a learned per-weight lr). The reference code adds
``edit_lr * grad~`` instead and learns negative lrs; ``baselines.mend.official`` negates its
lrs when loading, so both describe the same edits.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from baselines.mend.functional import Factors, InnerParam, to_param_layout
from baselines.mend.mend_hparams import MENDHyperParams
from baselines.mend.mend_nets import GradientTransform


def shape_key(p: InnerParam) -> str:
    """The reference's key of a shared transform: str((x_dim, delta_dim))."""
    return str((p.in_features, p.out_features))


def param_key(p: InnerParam) -> str:
    return p.name.replace(".", "#")


class MendNetwork(nn.Module):
    kind = "MEND"

    def __init__(self, params: Sequence[InnerParam], hparams: MENDHyperParams):
        super().__init__()
        self.params = list(params)
        self.shared = hparams.shared
        self.lr_scale = hparams.lr_scale
        groups: dict[str, list[str]] = {}
        for p in self.params:
            groups.setdefault(self._key(p), []).append(p.name)
        # Mode = position among the weights sharing a transform, in inner_params order (as the reference).
        self.modes = {name: (names.index(name) if self.shared else None) for names in groups.values() for name in names}
        first: dict[str, InnerParam] = {}
        for p in self.params:
            first.setdefault(self._key(p), p)
        self.transforms = nn.ModuleDict({
            key: GradientTransform(
                p.in_features, p.out_features, hparams.n_hidden, hparams.rank,
                len(groups[key]) if self.shared else None, hparams.norm, hparams.combine,
            )
            for key, p in first.items()
        })
        self.edit_lrs = nn.Parameter(torch.full((len(self.params),), float(hparams.edit_lr)))

    def _key(self, p: InnerParam) -> str:
        return shape_key(p) if self.shared else param_key(p)

    def outer_param_groups(self, hparams: MENDHyperParams) -> list[dict]:
        """Adam groups: the networks at ``lr``, the learned edit lrs at ``lr_lr`` (as the reference's two optimisers)."""
        return [
            {"params": list(self.transforms.parameters()), "lr": hparams.lr},
            {"params": [self.edit_lrs], "lr": hparams.lr_lr},
        ]

    def updates(self, factors: dict[str, Factors], condition: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        """Weight updates in each parameter's own layout (``condition`` is KE's; MEND ignores it)."""
        out = {}
        for i, p in enumerate(self.params):
            f = factors[p.name]
            x_t, d_t = self.transforms[self._key(p)](f.x, f.delta, self.modes[p.name])
            step = d_t.T @ x_t  # (out, in): the transformed gradient
            out[p.name] = to_param_layout(-(self.lr_scale * self.edit_lrs[i]) * step, p)
        return out
