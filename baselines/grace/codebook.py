"""GRACE's codebook: keys (layer inputs), one value (layer output) and one deferral radius per key,
and the label (target tokens) each key was made for.

``place`` is upstream's codebook update (``GRACEAdapter.forward`` at iteration 0 of an edit, original
repository): with d the distance from the new query to its nearest key j,
- no key, or d > eps_init + eps_j: a new key with radius eps_init;
- within reach, another label: a new key, and the two radii split the distance: eps_j = d/2 - 1e-5,
  eps_new = d/2 (at d = 0, as when an edit is rolled back, key j is retired: its radius is negative);
- within reach, the same label: eps_j grows to d (``coverage``; ``moving_average`` also moves key j
  halfway to the query), or nothing changes when d <= eps_j already.
Distances are exact pairwise Euclidean distances in float32 (``torch.cdist`` without its
matrix-product shortcut, which upstream takes beyond 25 keys and which does not give 0 for a
query equal to a key). Ties go to the first key, as ``min`` does upstream.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

SPLIT_MARGIN = 1e-5
PAD_LABEL = -1


@dataclasses.dataclass
class Codebook:
    keys: torch.Tensor  # (n, d_in) float32
    values: torch.Tensor  # (n, d_out) float32
    epsilons: torch.Tensor  # (n,) float32
    labels: list[tuple[int, ...]]
    n_edits: int = 0  # edits made so far (a cold value is seeded by it)

    @classmethod
    def empty(cls, d_in: int, d_out: int, device: torch.device) -> Codebook:
        zeros = lambda *shape: torch.zeros(*shape, dtype=torch.float32, device=device)
        return cls(zeros(0, d_in), zeros(0, d_out), zeros(0), [])

    def __len__(self) -> int:
        return len(self.labels)

    def nearest(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(distance, index) of each query's nearest key; queries (N, d_in)."""
        q = queries.to(self.keys.device, torch.float32)
        dists = torch.cdist(q, self.keys, compute_mode="donot_use_mm_for_euclid_dist")
        return dists.min(dim=1)

    def lookup(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(hit, index): whether each query lies within its nearest key's radius, and that key."""
        if not len(self):
            n = queries.shape[0]
            return torch.zeros(n, dtype=torch.bool, device=queries.device), torch.zeros(n, dtype=torch.long, device=queries.device)
        dist, index = self.nearest(queries)
        return dist <= self.epsilons[index], index

    def place(self, query: torch.Tensor, label: tuple[int, ...], new_value: Callable[[], torch.Tensor],
              eps_init: float, expand: str) -> tuple[str, float | None]:
        """Upstream's update for an edit whose query is ``query`` (d_in,); returns (what happened, d)."""
        query = query.to(self.keys.device, torch.float32)
        if not len(self):
            self._add(query, label, new_value(), eps_init)
            return "added", None
        dist, index = self.nearest(query[None])
        d, j = dist[0], int(index[0])
        if d > eps_init + self.epsilons[j]:
            self._add(query, label, new_value(), eps_init)
            return "added", float(d)
        if label != self.labels[j]:
            self._add(query, label, new_value(), eps_init)
            self.epsilons[j] = d / 2 - SPLIT_MARGIN
            self.epsilons[-1] = d / 2
            return "split", float(d)
        if d <= self.epsilons[j]:
            return "covered", float(d)
        if expand == "moving_average":
            self.keys[j] = 0.5 * self.keys[j] + 0.5 * query
        self.epsilons[j] = d
        return "expanded", float(d)

    def _add(self, key: torch.Tensor, label: tuple[int, ...], value: torch.Tensor, eps: float) -> None:
        device = self.keys.device
        self.keys = torch.cat([self.keys, key[None]])
        self.values = torch.cat([self.values, value.to(device, torch.float32).reshape(1, -1)])
        self.epsilons = torch.cat([self.epsilons, torch.tensor([eps], dtype=torch.float32, device=device)])
        self.labels.append(tuple(label))

    def state_dict(self) -> dict[str, torch.Tensor]:
        width = max((len(l) for l in self.labels), default=0)
        labels = torch.full((len(self), width), PAD_LABEL, dtype=torch.int64)
        for i, label in enumerate(self.labels):
            labels[i, : len(label)] = torch.tensor(label, dtype=torch.int64)
        return {"keys": self.keys, "values": self.values, "epsilons": self.epsilons, "labels": labels,
                "n_edits": torch.tensor(self.n_edits, dtype=torch.int64)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what ``state_dict`` saved (on this codebook's device; widths must match)."""
        expected = {"keys", "values", "epsilons", "labels", "n_edits"}
        if set(state) != expected:
            raise ValueError(f"GRACE state holds {sorted(state)}, expected {sorted(expected)}")
        keys, values = state["keys"], state["values"]
        if keys.shape[1:] != self.keys.shape[1:] or values.shape[1:] != self.values.shape[1:]:
            raise ValueError(f"GRACE state of keys {tuple(keys.shape)} / values {tuple(values.shape)} does not fit "
                             f"this layer's {self.keys.shape[1]} inputs / {self.values.shape[1]} outputs")
        device = self.keys.device
        self.keys, self.values = keys.to(device, torch.float32), values.to(device, torch.float32)
        self.epsilons = state["epsilons"].to(device, torch.float32)
        self.labels = [tuple(int(t) for t in row if t != PAD_LABEL) for row in state["labels"]]
        self.n_edits = int(state["n_edits"])

    @property
    def nbytes(self) -> int:
        """Bytes the memory holds (what grows with the edits)."""
        return sum(t.numel() * t.element_size() for t in self.state_dict().values())
