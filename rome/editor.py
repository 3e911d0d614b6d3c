"""ROME as a run's editor: one rank-one update per request, always at hparams.layers[0]."""
from __future__ import annotations

from typing import Sequence

from editing.editor import EditOutcome, LocateEditEditor
from rome.rome_main import apply_rome_to_model


class ROMEEditor(LocateEditEditor):
    def edit(self, requests: Sequence[dict]) -> EditOutcome:
        request = self._one_request(requests)
        _, weights = apply_rome_to_model(
            self.model, self.tok, [request], self.hparams, return_orig_weights=True, resources=self.resources
        )
        return EditOutcome(weights, {"layer": self.hparams.layers[0]})
