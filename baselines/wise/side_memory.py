"""WISE's memory: the side copy W' of one FFN matrix being trained, and the shards stored before it.

One shard is ``save_freq`` edits, trained into W' through one random mask (knowledge sharding);
its threshold is the smallest in-scope activation score any of its edits ended with (upstream's
``EditingMeanAct.min_act``). When a shard is full, W' is stored with its threshold and a fresh
W' = W starts; every ``merge_freq`` edits the last merge_freq / save_freq stored shards are merged
(TIES) into one memory whose threshold is the smallest of theirs (WISE-Retrieve).
"""
from __future__ import annotations

import torch

from baselines.wise.merging import ties_merge
from baselines.wise.wise_hparams import WISEHyperParams

NO_THRESHOLD = 1e9  # upstream's starting minimum: a side memory without edits is never used


class SideMemory:
    def __init__(self, original: torch.Tensor):
        self.original = original  # W, laid out as the module's weight (never changes)
        self.weight = original.detach().clone()  # W'
        self.mask = torch.zeros_like(original, dtype=torch.bool)
        self.threshold = NO_THRESHOLD
        self.memories: list[torch.Tensor] = []
        self.memory_thresholds: list[float] = []
        self.n_edits = 0
        self.n_merges = 0

    def start_edit(self, hparams: WISEHyperParams) -> None:
        """A new shard draws its mask: each entry trainable with probability ``mask_ratio`` (seeded)."""
        if self.n_edits % hparams.save_freq == 0:
            generator = torch.Generator().manual_seed(hparams.seed + self.n_edits)
            draw = torch.rand(self.original.shape, generator=generator)
            self.mask = (draw < hparams.mask_ratio).to(self.original.device)

    def record_activation(self, score: float) -> None:
        self.threshold = min(self.threshold, score)

    def finish_edit(self, hparams: WISEHyperParams) -> list[str]:
        """Count the edit; store the shard and merge when their turn comes. Returns what was done."""
        self.n_edits += 1
        done = []
        if self.n_edits % hparams.save_freq == 0:
            self.memories.append(self.weight)
            self.memory_thresholds.append(self.threshold)
            self.weight, self.threshold = self.original.detach().clone(), NO_THRESHOLD
            done.append("stored")
        if self.n_edits % hparams.merge_freq == 0:
            k = hparams.merge_freq // hparams.save_freq
            merged = ties_merge(self.original, self.memories[-k:], [hparams.weights / k] * k, hparams.densities)
            threshold = min(self.memory_thresholds[-k:])
            del self.memories[-k:], self.memory_thresholds[-k:]
            self.memories.append(merged)
            self.memory_thresholds.append(threshold)
            self.n_merges += 1
            done.append("merged")
        return done

    def state_dict(self) -> dict[str, torch.Tensor]:
        stored = torch.stack(self.memories) if self.memories else self.original.new_zeros((0, *self.original.shape))
        return {"side_weight": self.weight, "mask": self.mask, "threshold": torch.tensor(self.threshold, dtype=torch.float64),
                "memories": stored, "memory_thresholds": torch.tensor(self.memory_thresholds, dtype=torch.float64),
                "n_edits": torch.tensor(self.n_edits), "n_merges": torch.tensor(self.n_merges)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        expected = set(self.state_dict())
        if set(state) != expected:
            raise ValueError(f"WISE state holds {sorted(state)}, expected {sorted(expected)}")
        if state["side_weight"].shape != self.original.shape:
            raise ValueError(f"WISE side memory of shape {tuple(state['side_weight'].shape)} does not fit this "
                             f"layer's weight {tuple(self.original.shape)}")
        like = {"device": self.original.device, "dtype": self.original.dtype}
        self.weight = state["side_weight"].to(**like)
        self.mask = state["mask"].to(self.original.device, torch.bool)
        self.threshold = float(state["threshold"])
        self.memories = [m.to(**like) for m in state["memories"]]
        self.memory_thresholds = [float(t) for t in state["memory_thresholds"]]
        self.n_edits, self.n_merges = int(state["n_edits"]), int(state["n_merges"])

    @property
    def nbytes(self) -> int:
        """Bytes the memory holds: W', its mask and the stored shards."""
        return sum(t.numel() * t.element_size() for t in self.state_dict().values())
