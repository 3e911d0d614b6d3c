"""Hyperparameters shared by the trained editors (MEND and KE): what they edit, where the editor
checkpoint lives, and how ``python -m baselines.mend.train`` trains one.

One file per model (``hparams/MEND/<model>.json``, ``hparams/KE/<model>.json``) describes the editor
architecture, names its checkpoint (``archive``, relative to the repository root unless absolute)
and holds the training settings, so the evaluate CLI and the trainer read the same file and a
checkpoint can always be matched against the architecture it was trained with.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

from util.globals import REPO_ROOT
from util.hparams import HParamsError, HyperParams

TRAIN_DATASETS = ("zsre", "counterfact")
IMPLEMENTATIONS = ("fast", "reference")


@dataclasses.dataclass(frozen=True)
class EditorHyperParams(HyperParams):
    # What is edited: full parameter names, in the order the editor's per-parameter state uses
    # (MEND's learned lrs and shared-MLP modes are indexed by this order, as in the MEND code base).
    model_name: str
    inner_params: tuple[str, ...]

    # The editor checkpoint: a native one written by baselines.mend.train, or the official file.
    archive: Optional[str] = None
    archive_url: Optional[str] = None  # where the README says the official file can be downloaded
    trust_archive_pickle: bool = False  # load official files that pickle more than tensors and configs

    # Training (python -m baselines.mend.train); MEND's names and defaults
    seed: int = 0
    train_ds: str = "zsre"
    lr: float = 1e-6  # the editor network's Adam learning rate
    c_edit: float = 0.1  # weight of the post-edit NLL of the new target
    c_loc: float = 1.0  # weight of the KL between pre- and post-edit predictions on unrelated inputs
    accumulate_bs: int = 10  # training steps (one edit each) per optimiser step
    grad_clip: float = 100.0
    train_steps: int = 100000
    val_interval: int = 1000  # training steps between validations (and checkpoints)
    val_records: int = 100  # held-out records per validation
    max_length: int = 64  # longest tokenised sequence used for training

    # "fast" re-runs only the blocks from the first edited one on cached block inputs;
    # "reference" runs the whole model every time (both are checked to agree once per model).
    implementation: str = "fast"

    def validate(self) -> None:
        if not self.inner_params:
            raise HParamsError("field 'inner_params' must name at least one weight")
        if len(set(self.inner_params)) != len(self.inner_params):
            raise HParamsError("field 'inner_params' names a weight twice")
        for name in self.inner_params:
            if not name.endswith(".weight"):
                raise HParamsError(f"field 'inner_params': {name!r} is not a weight (must end in '.weight')")
        if self.train_ds not in TRAIN_DATASETS:
            raise HParamsError(f"field 'train_ds' is {self.train_ds!r}; expected one of {TRAIN_DATASETS}")
        if self.implementation not in IMPLEMENTATIONS:
            raise HParamsError(f"field 'implementation' is {self.implementation!r}; expected one of {IMPLEMENTATIONS}")
        for name in ("accumulate_bs", "train_steps", "val_interval", "val_records", "max_length"):
            if getattr(self, name) < 1:
                raise HParamsError(f"field {name!r} must be at least 1")
        if self.val_interval % self.accumulate_bs:
            raise HParamsError(
                f"field 'val_interval' ({self.val_interval}) must be a multiple of 'accumulate_bs' "
                f"({self.accumulate_bs}): checkpoints are written only between optimiser steps"
            )

    def archive_path(self) -> Optional[Path]:
        if self.archive is None:
            return None
        path = Path(self.archive).expanduser()
        return path if path.is_absolute() else REPO_ROOT / path

    def architecture(self) -> dict:
        """The fields a checkpoint must agree with (subclasses add their network's)."""
        return {"inner_params": list(self.inner_params)}
