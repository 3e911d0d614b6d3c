"""WilKE as a run's editor: the argmin-LA layer per edit; the roll-back edits that same layer again."""
from __future__ import annotations

import logging
from typing import Optional, Sequence

from editing.editor import EditOutcome, LocateEditEditor
from editing.requests import swapped_request
from wilke.wilke_main import apply_wilke_to_model

LOG = logging.getLogger(__name__)


class WilKEEditor(LocateEditEditor):
    def edit(self, requests: Sequence[dict], layer: Optional[int] = None) -> EditOutcome:
        """Scan the candidate layers and edit the chosen one (or edit ``layer``, scanning nothing)."""
        request = self._one_request(requests)
        _, weights, result = apply_wilke_to_model(
            self.model, self.tok, [request], self.hparams, edited_layer=layer, return_orig_weights=True,
            resources=self.resources,
        )
        edit = result.edits[0]
        details = {
            "layer": edit.layer,
            "scan": edit.scan,
            "layer_adaptability": {str(k): v for k, v in sorted(edit.layer_adaptability.items())},
            "chosen_la": edit.update_norm / edit.weight_norm,
        }
        return EditOutcome(weights, details)

    def rollback(self, requests: Sequence[dict], outcome: EditOutcome) -> EditOutcome:
        """The paper's roll-back: the swapped request at the layer the edit chose."""
        undone = self.edit([swapped_request(r) for r in requests], layer=outcome.details["layer"])
        LOG.info("WilKE roll-back of case %s at layer %d (the layer its edit chose)", requests[0].get("case_id"),
                 outcome.details["layer"])
        return undone
