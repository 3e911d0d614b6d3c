"""A toy editor that keeps state between edits, for the resume tests of stateful methods.

Each edit adds a rank-one change to one MLP output projection whose direction is the running mean
of the embeddings of every subject edited so far: the update depends on all earlier edits, so a
resumed run that lost the state writes different results. ``--alg_name Toy`` is registered with
``register()`` (the tests call it in-process, and in a subprocess through ``python -m tests.toy_editor``).
"""
from __future__ import annotations

import dataclasses
import sys
import time
from typing import Sequence

import torch

from editing.editor import Editor, EditOutcome, snapshot_weights
from util import nethook
from util.architectures import update_to_weight_shape
from util.hparams import HyperParams


@dataclasses.dataclass(frozen=True)
class ToyHyperParams(HyperParams):
    layer: int
    scale: float
    rewrite_module_tmp: str
    seconds_per_edit: float = 0.0  # lets a test signal a run while it edits


class ToyEditor(Editor):
    batch_edits = True

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.key_sum = torch.zeros(self._in_width(), dtype=torch.float64)
        self.count = torch.zeros((), dtype=torch.int64)

    def module_name(self) -> str:
        return self.hparams.rewrite_module_tmp.format(self.hparams.layer)

    def weight(self) -> torch.Tensor:
        return nethook.get_module(self.model, self.module_name()).weight

    def transposed(self) -> bool:
        return type(nethook.get_module(self.model, self.module_name())).__name__ == "Conv1D"

    def _in_width(self) -> int:
        w = self.weight()
        return w.shape[0] if self.transposed() else w.shape[1]

    def subject_vector(self, request: dict) -> torch.Tensor:
        """A fixed vector per subject (seeded by its characters), in the key space."""
        seed = sum(ord(c) * (i + 1) for i, c in enumerate(request["subject"])) % 2**31
        return torch.randn(self._in_width(), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)

    @torch.no_grad()
    def edit(self, requests: Sequence[dict]) -> EditOutcome:
        time.sleep(self.hparams.seconds_per_edit)
        for request in requests:
            self.key_sum += self.subject_vector(request)
            self.count += 1
        module = nethook.get_module(self.model, self.module_name())
        orig: dict = {}
        snapshot_weights(self.model, [f"{self.module_name()}.weight"], orig)
        direction = (self.key_sum / self.count.item()).to(module.weight.dtype)
        out_width = module.weight.shape[1] if self.transposed() else module.weight.shape[0]
        value = torch.ones(out_width, dtype=module.weight.dtype) * self.hparams.scale
        module.weight.add_(update_to_weight_shape(torch.outer(value, direction), module))
        return EditOutcome(orig, {"count": int(self.count), "direction_norm": float(direction.norm())})

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"key_sum": self.key_sum.clone(), "count": self.count.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.key_sum, self.count = state["key_sum"].clone(), state["count"].clone()


def register() -> None:
    from experiments.algorithms import ALGORITHMS, Algorithm

    ALGORITHMS["Toy"] = Algorithm("Toy", "tests.toy_editor:ToyHyperParams", "tests.toy_editor:ToyEditor")


if __name__ == "__main__":
    register()
    from experiments.evaluate import cli

    sys.exit(cli(sys.argv[1:]))
