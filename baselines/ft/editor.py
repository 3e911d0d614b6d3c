"""FT / FT-L as a run's editor: fine-tune hparams.layers on a batch of requests."""
from __future__ import annotations

from typing import Sequence

from baselines.ft.ft_main import apply_deltas, execute_ft
from editing.editor import Editor, EditOutcome


class FTEditor(Editor):
    batch_edits = True

    def edit(self, requests: Sequence[dict]) -> EditOutcome:
        update = execute_ft(self.model, self.tok, list(requests), self.hparams)
        weights: dict = {}
        apply_deltas(self.model, update, weights)
        details = {
            "layers": list(self.hparams.layers),
            "norm_constraint": self.hparams.norm_constraint,
            "epochs": update.epochs,
            "final_loss": update.final_loss,
            "max_abs_change": max(float(d.abs().max()) for d in update.deltas.values()),
        }
        return EditOutcome(weights, details)
