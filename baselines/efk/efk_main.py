"""ROME-style executor for KE: ``EfkRewriteExecutor().apply_to_model(model, tok, request, hparams)``."""
from __future__ import annotations

from baselines.mend.executor import EditorExecutor


class EfkRewriteExecutor(EditorExecutor):
    method_name = "KE"

    def __init__(self) -> None:
        super().__init__("KE")
