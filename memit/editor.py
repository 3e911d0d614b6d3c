"""MEMIT as a run's editor: a batch of requests, one update spread over the fixed layer range."""
from __future__ import annotations

from typing import Sequence

from editing.editor import EditOutcome, LocateEditEditor
from memit.memit_main import apply_deltas, execute_memit


class MEMITEditor(LocateEditEditor):
    batch_edits = True

    def edit(self, requests: Sequence[dict]) -> EditOutcome:
        update = execute_memit(self.model, self.tok, list(requests), self.hparams, self.resources)
        weights: dict = {}
        apply_deltas(self.model, update, weights)
        return EditOutcome(weights, self.details(update))

    def details(self, update) -> dict:
        single = update.zs.shape[1] == 1
        return {
            "layers": list(self.hparams.layers),
            # one request: its own numbers (the roll-back protocol's files); a batch: one per request
            "z_steps": update.z_steps[0] if single else list(update.z_steps),
            "z_final_loss": update.z_losses[0] if single else list(update.z_losses),
            "layer_update_norms": {str(d.layer): d.norm for d in update.deltas.values()},
            "z_errors": {str(d.layer): d.z_error for d in update.deltas.values()},
        }
