"""Checkpoints of a lifelong run's edited weights, so a killed run resumes with the state it had.

Edits accumulate (nothing is ever restored from a copy), so resuming at edit n needs the weights
as they were after edit n-1. A checkpoint stores, for every weight the run has changed so far,
its delta against the freshly loaded model (safetensors, written to a temporary file and renamed).

Restoring must be bit-exact, or the replayed edits drift from the killed run: ``base + (w - base)``
is not always ``w`` in floating point, so the few entries where it is not are stored exactly
beside the delta ("fix" index/value pairs) and written back after the addition.

``WeightLedger`` remembers the fresh value of every weight the first time an edit changes it
(``EditOutcome.orig_weights`` of that edit), on the CPU, so no full copy of the model is kept.

The editor's own state (``Editor.state_dict``: AlphaEdit's accumulated keys, say) is stored in the
same file under ``editor/<key>``, so weights and state are always from the same step.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from util import nethook
from util.atomic_files import atomic_path

LOG = logging.getLogger(__name__)

CHECKPOINT_FILE = "weights_checkpoint.safetensors"
FORMAT_VERSION = "1"
EDITOR_PREFIX = "editor/"


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model it is restored into."""


class WeightLedger:
    """Fresh (as loaded) values of every weight the run has changed, kept on the CPU."""

    def __init__(self) -> None:
        self.base: dict[str, torch.Tensor] = {}

    def note(self, orig_weights: dict[str, torch.Tensor]) -> None:
        """Record weights an edit is about to have changed; only the first sighting is the fresh value."""
        for name, tensor in orig_weights.items():
            if name not in self.base:
                self.base[name] = tensor.detach().to("cpu", copy=True)


def exact_delta(base: torch.Tensor, current: torch.Tensor) -> dict[str, torch.Tensor]:
    """``delta`` = current - base, plus the flat indices/values where base + delta != current."""
    delta = current - base
    wrong = ((base + delta) != current).flatten().nonzero().flatten()
    parts = {"delta": delta.contiguous()}
    if wrong.numel():
        parts["fix_index"] = wrong.contiguous()
        parts["fix_value"] = current.flatten()[wrong].contiguous()
    return parts


def apply_exact_delta(base: torch.Tensor, parts: dict[str, torch.Tensor]) -> torch.Tensor:
    restored = base + parts["delta"]
    if "fix_index" in parts:
        restored.view(-1)[parts["fix_index"]] = parts["fix_value"]
    return restored


def _write_atomic(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: Path) -> None:
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


@torch.no_grad()
def save_checkpoint(path: Path, model: nn.Module, ledger: WeightLedger, step: int,
                    editor_state: Optional[dict[str, torch.Tensor]] = None) -> None:
    """The deltas of every changed weight (and the editor's state) after ``step`` protocol steps
    (edits, or batches of edits), replacing any older checkpoint."""
    tensors: dict[str, torch.Tensor] = {}
    n_fixed = 0
    for name, base in sorted(ledger.base.items()):
        parts = exact_delta(base, nethook.get_parameter(model, name).detach().to("cpu"))
        n_fixed += parts["fix_index"].numel() if "fix_index" in parts else 0
        tensors.update({f"{kind}/{name}": t for kind, t in parts.items()})
    state = {k: v.detach().to("cpu").contiguous() for k, v in (editor_state or {}).items()}
    tensors.update({f"{EDITOR_PREFIX}{k}": v for k, v in state.items()})
    metadata = {"format": FORMAT_VERSION, "edit_index": str(step), "weights": json.dumps(sorted(ledger.base)),
                "editor_state": json.dumps(sorted(state))}
    _write_atomic(tensors, metadata, path)
    LOG.info("checkpoint after step %d: %d changed weight(s), %d entries stored exactly, %d editor tensor(s), %s",
             step, len(ledger.base), n_fixed, len(state), path.name)


def checkpoint_index(path: Path) -> Optional[int]:
    """How many protocol steps the checkpoint at ``path`` holds, or None when there is none."""
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as f:
        return int(f.metadata()["edit_index"])


def load_editor_state(path: Path) -> dict[str, torch.Tensor]:
    """The editor state stored with the checkpoint (empty for stateless editors and older files)."""
    with safe_open(str(path), framework="pt") as f:
        names = json.loads(f.metadata().get("editor_state", "[]"))
        return {name: f.get_tensor(f"{EDITOR_PREFIX}{name}") for name in names}


@torch.no_grad()
def load_checkpoint(path: Path, model: nn.Module, ledger: WeightLedger) -> int:
    """Add the stored deltas to a freshly loaded ``model``; returns the checkpoint's step."""
    params = dict(model.named_parameters())
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        if meta.get("format") != FORMAT_VERSION:
            raise CheckpointError(f"{path}: checkpoint format {meta.get('format')!r}, expected {FORMAT_VERSION}")
        names = json.loads(meta["weights"])
        keys = set(f.keys())
        for name in names:
            if name not in params:
                raise CheckpointError(f"{path}: weight {name!r} is not a parameter of this model")
            param = nethook.get_parameter(model, name)  # offloaded weights: their storage
            ledger.note({name: param})
            parts = {kind: f.get_tensor(f"{kind}/{name}") for kind in ("delta", "fix_index", "fix_value") if f"{kind}/{name}" in keys}
            if parts["delta"].shape != param.shape:
                raise CheckpointError(f"{path}: {name} has shape {tuple(parts['delta'].shape)}, the model {tuple(param.shape)}")
            param.copy_(apply_exact_delta(ledger.base[name], parts).to(param.device))
    return int(meta["edit_index"])
