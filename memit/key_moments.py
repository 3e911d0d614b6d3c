"""K_p K_p^T: the keys of every earlier edit, per edited layer, as a method of MEMIT's family keeps them.

AlphaEdit adds them to its projected solve (upstream's ``cache_c``), ENCORE to its Frobenius-norm
constrained one (upstream's ``SEQ_CACHE``). They are the editor's state: saved with every weight
checkpoint and restored on resume (``MomentsEditor`` in memit/editor.py).
"""
from __future__ import annotations

import torch

from memit.memit_main import MEMITUpdate

STATE_PREFIX = "key_moment/"


class KeyMoments:
    """K_p K_p^T per edited module: the sum of k k^T over the keys of every earlier edit (float64)."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.n_keys = 0  # keys (requests) accumulated, the same at every layer

    def get(self, module_name: str, dim: int, device: torch.device) -> torch.Tensor:
        """The layer's sum, zeros before its first edit."""
        if module_name not in self.sums:
            return torch.zeros(dim, dim, dtype=torch.float64, device=device)
        return self.sums[module_name].to(device)

    @torch.no_grad()
    def add(self, update: MEMITUpdate) -> None:
        """Accumulate one batch's keys at every layer it edited."""
        n = 0
        for delta in update.deltas.values():
            k = delta.keys.to(torch.float64)
            self.sums[delta.module_name] = self.get(delta.module_name, k.shape[0], k.device) + k @ k.T
            n = k.shape[1]
        self.n_keys += n

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"{STATE_PREFIX}{name}": s for name, s in self.sums.items()}
        state["n_keys"] = torch.tensor(self.n_keys, dtype=torch.int64)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor], devices: dict[str, torch.device]) -> None:
        """Restore what ``state_dict`` saved; ``devices`` maps each edited module to the device it computes on."""
        sums = {k[len(STATE_PREFIX):]: v for k, v in state.items() if k.startswith(STATE_PREFIX)}
        unknown = sorted(set(sums) - set(devices))
        if unknown or "n_keys" not in state:
            raise ValueError(f"the saved keys of earlier edits do not fit this run's layers {sorted(devices)}: "
                             f"it holds {sorted(state)}")
        self.sums = {name: s.to(device=devices[name], dtype=torch.float64) for name, s in sums.items()}
        self.n_keys = int(state["n_keys"])
