"""KN as a run's editor: locate the request's knowledge neurons and edit them."""
from __future__ import annotations

import collections
from typing import Sequence

from baselines.kn.kn_main import apply_update, execute_kn
from editing.editor import Editor, EditOutcome


class KNEditor(Editor):
    def edit(self, requests: Sequence[dict]) -> EditOutcome:
        update = execute_kn(self.model, self.tok, self._one_request(requests), self.hparams, self.resources)
        weights: dict = {}
        apply_update(self.model, update, weights)
        details = {
            "n_neurons": len(update.neurons),
            "neurons": [list(n) for n in update.neurons],
            "neurons_per_layer": {str(l): c for l, c in sorted(collections.Counter(l for l, _ in update.neurons).items())},
            "n_prompts": update.n_prompts,
            "coarse_per_prompt": update.n_coarse,
            "old_token": update.old_token,
            "new_token": update.new_token,
        }
        return EditOutcome(weights, details)
