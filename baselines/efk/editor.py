"""KE as a run's editor: MEND's trained-editor machinery with the KE network."""
from __future__ import annotations

from baselines.mend.editor import TrainedEditor


class KEEditor(TrainedEditor):
    kind = "KE"
