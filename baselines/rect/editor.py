"""RECT as a run's editor: MEMIT's batch update, only the top k% of each matrix's entries added."""
from __future__ import annotations

from typing import Sequence

from baselines.rect.rect_main import apply_sparse_deltas
from editing.editor import EditOutcome
from memit.editor import MEMITEditor
from memit.memit_main import execute_memit


class RECTEditor(MEMITEditor):
    batch_edits = True

    def edit(self, requests: Sequence[dict]) -> EditOutcome:
        update = execute_memit(self.model, self.tok, list(requests), self.hparams, self.resources)
        weights: dict = {}
        kept = apply_sparse_deltas(self.model, update, self.hparams.keep_percent, self.hparams.epsilon, weights)
        shares = {str(d.layer): kept[d.weight_name] for d in update.deltas.values()}
        details = {**self.details(update), "kept_share": shares}
        return EditOutcome(weights, details)
