"""A layer's key second moment C = E[k k^T], factorised once and solved with, never inverted.

ROME's left vector needs C^{-1} k*; MEMIT's update needs (lambda C + K K^T)^{-1} K, so it keeps the
matrix itself. Both are float64, on the device the statistics were moved to (the edited layer's).
"""
from __future__ import annotations

import logging

import torch

LOG = logging.getLogger(__name__)


class FactorisedCovariance:
    """C = E[k k^T] of one layer's keys, held as its Cholesky factor (float64).

    A covariance from few samples (or keys confined to a subspace, as in tiny random models) can be
    singular. The reference inverts it anyway and gets whatever float32 gives; here the smallest
    diagonal jitter (1e-8, 1e-6 or 1e-4 of the mean variance) that makes it factorisable is added,
    with a warning, and a matrix beyond that is refused with advice.

    With ``keep_matrix`` (MEMIT, which solves with lambda C + K K^T, never with C alone) the matrix is
    held and the factor is made only if something asks C^{-1}: no factorisation is paid for, or
    refused, that no edit uses.
    """

    JITTERS = (1e-8, 1e-6, 1e-4)

    def __init__(self, mom2: torch.Tensor, keep_matrix: bool = False, name: str = "covariance"):
        c = mom2.to(torch.float64)
        if not bool(torch.isfinite(c).all()):
            raise ValueError(f"{name}: the second-moment statistics contain NaN or inf; delete and recollect them")
        self.name = name
        self.matrix = c if keep_matrix else None
        self._factor = None if keep_matrix else self._cholesky(c)

    def _cholesky(self, c: torch.Tensor) -> torch.Tensor:
        factor, info = torch.linalg.cholesky_ex(c)
        scale = c.diagonal().mean().clamp_min(torch.finfo(torch.float64).tiny)
        for relative in self.JITTERS:
            if int(info) == 0:
                break
            jitter = relative * scale
            LOG.warning("%s is not positive definite; adding %.3g (%.0e of its mean variance) to its diagonal",
                        self.name, float(jitter), relative)
            factor, info = torch.linalg.cholesky_ex(c + jitter * torch.eye(c.shape[0], dtype=c.dtype, device=c.device))
        if int(info) != 0:
            raise ValueError(f"{self.name} is singular even with {self.JITTERS[-1]:g} of its mean variance on the "
                             "diagonal; collect statistics from more samples (mom2_n_samples) or edit without "
                             "mom2_adjustment")
        return factor

    @property
    def factor(self) -> torch.Tensor:
        if self._factor is None:
            self._factor = self._cholesky(self.matrix)
        return self._factor

    def solve(self, rhs: torch.Tensor) -> torch.Tensor:
        """C^{-1} rhs for a vector or a matrix of column vectors, in rhs's dtype."""
        b = rhs.to(torch.float64, copy=False)
        col = b.dim() == 1
        x = torch.cholesky_solve(b[:, None] if col else b, self.factor)
        return (x[:, 0] if col else x).to(rhs.dtype)

    @property
    def nbytes(self) -> int:
        held = [t for t in (self._factor, self.matrix) if t is not None]
        return sum(t.numel() * t.element_size() for t in held)
