"""UltraEdit's lifelong normalisation: running mean and spread of z = [k; g], per weight shape, never reset.

Upstream (XiaojieGu/UltraEdit 0beb222, ``nets.py`` ``RunningMeanStd``; one per distinct (in, out)
shape of the edited weights, shared by every module of that shape, ``editor/ultraedit.py``) merges
each batch x of b rows into (n, mean, var), var being a sum of squared deviations:

    n' = n + b,  d = mean(x) - mean,  mean += b d / n',
    var += b * var_unbiased(x) + n b d^2 / n',   std = sqrt(var / (n' - 1 + eps)),

and normalises with (z - mean) / (std + eps), eps = float32's machine epsilon. This is Chan's merge
with ``b * var_unbiased(x)`` = b/(b-1) times the batch's own sum of squares in place of that sum, kept
here as upstream has it. It depends only on which rows were merged in which groups, not on the order
(up to rounding): a normaliser after n edits equals one recomputed from scratch over the same batches
(``from_batches``). Everything is float32 on the edited weights' device, as upstream.

One deviation: a batch of one row has no unbiased variance (upstream adds NaN, and every later
normalisation is NaN). Here its own spread counts as zero, which is what its sum of squares is.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch

EPS = torch.finfo(torch.float32).eps
STATE_PREFIX = "normaliser/"


class RunningNormaliser:
    """(n, mean, var) of the rows of every batch merged so far, for one feature width."""

    def __init__(self, width: int, device: torch.device | str = "cpu"):
        self.n = torch.zeros(1, dtype=torch.float32, device=device)
        self.mean = torch.zeros(width, dtype=torch.float32, device=device)
        self.var = torch.zeros(width, dtype=torch.float32, device=device)

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Merge a batch of rows (b x width)."""
        x = x.to(device=self.mean.device, dtype=torch.float32)
        b = x.shape[0]
        n = self.n + b
        delta = x.mean(0) - self.mean
        self.mean += b * delta / n
        spread = x.var(0) if b > 1 else torch.zeros_like(self.var)
        self.var += b * spread + self.n * b * delta.pow(2) / n
        self.n = n

    @property
    def std(self) -> torch.Tensor:
        return (self.var / (self.n - 1 + EPS)).sqrt()

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        """(z - mean) / (std + eps)."""
        return (z - self.mean) / (self.std + EPS)

    @classmethod
    def from_batches(cls, batches: Iterable[torch.Tensor], width: int) -> "RunningNormaliser":
        """Recomputed from scratch: n, the mean of every row, and var = sum_b b var_unbiased(x_b) + the
        between-batch sum of squares (sum_b b ||mean_b - mean||^2), in float64, then stored in float32."""
        batches = [b.to(torch.float64) for b in batches]
        rows = torch.cat(batches)
        mean = rows.mean(0)
        var = sum(b.shape[0] * (b.var(0) if b.shape[0] > 1 else torch.zeros_like(mean)) +
                  b.shape[0] * (b.mean(0) - mean).pow(2) for b in batches)
        made = cls(width, rows.device)
        made.n = torch.tensor([float(rows.shape[0])])
        made.mean, made.var = mean.to(torch.float32), var.to(torch.float32)
        return made


def shape_key(shape: Sequence[int]) -> str:
    """The (in, out) shape as upstream keys its normalisers, e.g. "576x1536"."""
    return "x".join(str(int(s)) for s in shape)


class NormaliserBank:
    """One ``RunningNormaliser`` per (in, out) shape of the edited weights: UltraEdit's editor state."""

    def __init__(self, shapes: dict[str, tuple[int, int]], devices: dict[str, torch.device]):
        """``shapes``/``devices``: the (in, out) shape and device of every edited module."""
        self.key_of = {name: shape_key(shape) for name, shape in shapes.items()}
        self.normalisers: dict[str, RunningNormaliser] = {}
        for name, shape in shapes.items():
            if self.key_of[name] not in self.normalisers:
                self.normalisers[self.key_of[name]] = RunningNormaliser(sum(shape), devices[name])

    def __getitem__(self, module_name: str) -> RunningNormaliser:
        return self.normalisers[self.key_of[module_name]]

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {}
        for key, norm in self.normalisers.items():
            for field in ("n", "mean", "var"):
                state[f"{STATE_PREFIX}{key}/{field}"] = getattr(norm, field)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what ``state_dict`` saved; the state must hold exactly this bank's shapes."""
        want = set(self.state_dict())
        if set(state) != want:
            raise ValueError(f"UltraEdit state does not fit this run's edited weights: it holds {sorted(state)}, "
                             f"this run needs {sorted(want)}")
        for key, norm in self.normalisers.items():
            for field in ("n", "mean", "var"):
                setattr(norm, field, state[f"{STATE_PREFIX}{key}/{field}"].to(device=norm.mean.device,
                                                                               dtype=torch.float32).clone())
