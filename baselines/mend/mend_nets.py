"""MEND's editor network (Mitchell et al. 2022, section 3 and appendix; the MEND code base's
``GradientTransform``, ``IDMLP`` and ``LRLinear``), written to reproduce its numbers exactly so that
the official trained editors load and behave as published.

- Inputs: the gradient factors (x_i, delta_i) of one weight, rows where either is all zero dropped.
- Normalisation: each factor is standardised with a running mean/std over every row seen while
  training (Welford's update; here in batches, which gives the same statistics as one row at a time).
- The MLP: ``n_hidden + 1`` low-rank residual layers h <- h + relu(scale_m * (U V h + b) + shift_m),
  with U initialised to zero (so the untrained editor is the identity) and, when weights of one shape
  share an MLP, a learned scale/shift per weight ("mode" m). As in the reference, every layer,
  the last one too, applies the ReLU: its ``relu`` flag is never read.
- ``combine``: one MLP over the concatenation [x; delta], split afterwards (the paper's default).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn


class LowRankResidual(nn.Module):
    """h + relu(scale_m * ((u @ v) h + bias) + shift_m), u: (dim, r), v: (r, dim), r = min(rank, dim)."""

    def __init__(self, dim: int, rank: int, n_modes: Optional[int]):
        super().__init__()
        mid = min(rank, dim)
        self.u = nn.Parameter(torch.zeros(dim, mid))
        self.v = nn.Parameter(torch.randn(mid, dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.n_modes = n_modes
        if n_modes is not None:
            self.mode_scale = nn.Parameter(torch.ones(n_modes, dim))
            self.mode_shift = nn.Parameter(torch.zeros(n_modes, dim))

    def forward(self, h: torch.Tensor, mode: Optional[int] = None) -> torch.Tensor:
        pre = (h @ self.v.T) @ self.u.T + self.bias
        if mode is not None:
            pre = pre * self.mode_scale[mode] + self.mode_shift[mode]
        return h + pre.clamp(min=0)  # clamp, not relu: the reference wants a nonzero gradient at 0


class ResidualMLP(nn.Module):
    def __init__(self, dim: int, n_hidden: int, rank: int, n_modes: Optional[int]):
        super().__init__()
        self.layers = nn.ModuleList(LowRankResidual(dim, rank, n_modes) for _ in range(n_hidden + 1))

    def forward(self, h: torch.Tensor, mode: Optional[int] = None) -> torch.Tensor:
        for layer in self.layers:
            h = layer(h, mode)
        return h


class RunningNorm(nn.Module):
    """Running mean and (unbiased) std of rows, updated in training mode only."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("m2", torch.zeros(dim))  # sum of squared deviations (the reference's *_s)
        self.register_buffer("std", torch.ones(dim))
        self.register_buffer("count", torch.zeros(1))

    @torch.no_grad()
    def update(self, rows: torch.Tensor) -> None:
        n_b = rows.shape[0]
        if n_b == 0:
            return
        rows = rows.to(self.mean.dtype)
        b_mean = rows.mean(0)
        b_m2 = ((rows - b_mean) ** 2).sum(0)
        n = float(self.count)
        total = n + n_b
        diff = b_mean - self.mean
        self.mean.add_(diff * (n_b / total))
        self.m2.add_(b_m2 + diff**2 * (n * n_b / total))
        self.count.fill_(total)
        if total >= 2:
            self.std.copy_((self.m2 / (total - 1)).sqrt())

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        return (rows - self.mean) / (self.std + 1e-7)


class GradientTransform(nn.Module):
    """Maps one weight's factors (x, delta) to transformed factors (x~, delta~)."""

    def __init__(self, x_dim: int, delta_dim: int, n_hidden: int, rank: int, n_modes: Optional[int],
                 norm: bool = True, combine: bool = True):
        super().__init__()
        self.x_dim, self.delta_dim = x_dim, delta_dim
        self.norm, self.combine = norm, combine
        self.x_norm = RunningNorm(x_dim)
        self.delta_norm = RunningNorm(delta_dim)
        if combine:
            self.mlp = ResidualMLP(x_dim + delta_dim, n_hidden, rank, n_modes)
        else:
            self.x_mlp = ResidualMLP(x_dim, n_hidden, rank, n_modes)
            self.delta_mlp = ResidualMLP(delta_dim, n_hidden, rank, n_modes)

    def forward(self, x: torch.Tensor, delta: torch.Tensor, mode: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.reshape(-1, self.x_dim).float()
        delta = delta.reshape(-1, self.delta_dim).float()
        keep = (x != 0).any(-1) & (delta != 0).any(-1)
        x, delta = x[keep], delta[keep]
        if self.training:
            self.x_norm.update(x)
            self.delta_norm.update(delta)
        if self.norm:
            x, delta = self.x_norm(x), self.delta_norm(delta)
        if self.combine:
            out = self.mlp(torch.cat((x, delta), -1), mode)
            return out[:, : self.x_dim], out[:, self.x_dim :]
        return self.x_mlp(x, mode), self.delta_mlp(delta, mode)
