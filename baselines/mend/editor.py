"""MEND as a run's editor (and the base of KE's): the trained network is loaded once per run and kept.

Loading an editor (hundreds of MB for the official GPT2-XL/GPT-J files) once per edit would dominate
a run, so the editor object holds one executor for the run's lifetime.
"""
from __future__ import annotations

from typing import ClassVar, Sequence

from baselines.mend.executor import EditorExecutor
from editing.editor import Editor, EditOutcome, snapshot_weights


class TrainedEditor(Editor):
    kind: ClassVar[str]

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.executor = EditorExecutor(self.kind)

    def edit(self, requests: Sequence[dict]) -> EditOutcome:
        request = self._one_request(requests)
        orig: dict = {}
        snapshot_weights(self.model, self.hparams.inner_params, orig)
        result = self.executor.edit(self.model, self.tok, request, self.hparams)
        return EditOutcome(orig, {"editor": self.kind, "archive": self.executor.archive, **result.details()})


class MENDEditor(TrainedEditor):
    kind = "MEND"
