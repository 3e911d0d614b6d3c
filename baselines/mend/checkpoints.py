"""Editor checkpoints: native ones (written atomically by the trainer, resumable) and official ones.

A native checkpoint is a dict of tensors and plain values, loadable with ``weights_only=True``:
    {"format": FORMAT, "editor": "MEND"|"KE", "model_name", "architecture": hparams.architecture(),
     "state": editor state dict, "optimizer": Adam state, "step", "history": [validation dicts],
     "hparams": the full hparams dict}
Official files (the MEND code base's trainer archives) pickle a transformers config next to the
tensors; they are loaded with only transformers' config classes allowed, unless the hparams say
``trust_archive_pickle``.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from baselines.mend.editor_hparams import EditorHyperParams
from baselines.mend.editors import get_editor_kind
from baselines.mend.functional import inner_params
from util.atomic_files import atomic_path

LOG = logging.getLogger(__name__)
FORMAT = "wilke-editor-v1"


class EditorCheckpointMissingError(FileNotFoundError):
    """The hparams name an editor checkpoint that is not on disk."""


class EditorCheckpointMismatchError(ValueError):
    """The checkpoint was trained for another editor, model or architecture than the hparams describe."""


def missing_message(kind: str, hparams: EditorHyperParams, path: Optional[Path], source: str) -> str:
    where = f"editor checkpoint {path}" if path else "no editor checkpoint ('archive' is null)"
    msg = f"{kind}: {where} not found ({source})."
    if hparams.archive_url:
        msg += (f" The ROME README says to download it from {hparams.archive_url} into "
                f"{get_editor_kind(kind).default_weights_dir}/.")
    msg += (f" Or train one: python -m baselines.mend.train --editor {kind} --model_name {hparams.model_name} "
            f"--ds_name zsre (it is written to the hparams file's 'archive' path).")
    return msg


def save_atomic(path: Path, payload: dict) -> None:
    """torch.save to a temporary file in the same folder, then rename: never a half-written checkpoint."""
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def _allowed_config_classes(path: Path) -> list[type]:
    """The transformers config classes a file pickles (an official archive's 'model_config')."""
    import importlib

    from transformers import PretrainedConfig

    allowed = []
    for name in torch.serialization.get_unsafe_globals_in_checkpoint(str(path)):
        module, _, attr = name.rpartition(".")
        try:
            obj = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError):
            continue
        if isinstance(obj, type) and issubclass(obj, PretrainedConfig):
            allowed.append(obj)
    return allowed


def read_checkpoint(path: Path, trust_pickle: bool = False) -> dict:
    if trust_pickle:
        return torch.load(path, map_location="cpu", weights_only=False)
    try:
        with torch.serialization.safe_globals(_allowed_config_classes(path)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises UnpicklingError or RuntimeError here
        raise EditorCheckpointMismatchError(
            f"{path}: cannot be read with weights_only=True ({str(e).splitlines()[0]}); if you trust the "
            f"file, set \"trust_archive_pickle\": true in the hparams"
        ) from None


def check_native(raw: dict, kind: str, hparams: EditorHyperParams, path: Path) -> None:
    if raw.get("editor") != kind:
        raise EditorCheckpointMismatchError(f"{path}: a {raw.get('editor')} editor, not {kind}")
    saved, wanted = raw.get("architecture", {}), hparams.architecture()
    diff = {k: (saved.get(k), v) for k, v in wanted.items() if saved.get(k) != v}
    if diff:
        details = "; ".join(f"{k}: checkpoint {a!r}, hparams {b!r}" for k, (a, b) in diff.items())
        raise EditorCheckpointMismatchError(f"{path}: trained with another architecture than the hparams: {details}")


def load_editor(kind: str, model: nn.Module, hparams: EditorHyperParams, source: str = "hparams") -> tuple[nn.Module, dict]:
    """The trained editor the hparams name, on the model's device, in eval mode, and the raw checkpoint."""
    path = hparams.archive_path()
    if path is None or not path.is_file():
        raise EditorCheckpointMissingError(missing_message(kind, hparams, path, source))
    editor_kind = get_editor_kind(kind)
    raw = read_checkpoint(path, hparams.trust_archive_pickle)
    params = inner_params(model, hparams.inner_params, source=source)
    if raw.get("format") == FORMAT:
        check_native(raw, kind, hparams, path)
        editor = editor_kind.build(model, params, hparams, None)
        editor.load_state_dict(raw["state"], strict=True)
    else:
        state = raw.get("model", raw)
        if not (isinstance(state, dict) and editor_kind.is_official(state)):
            raise EditorCheckpointMismatchError(f"{path}: neither a {FORMAT} checkpoint nor an official {kind} file")
        try:
            editor = editor_kind.load_official(model, params, hparams, state)
        except (RuntimeError, KeyError) as e:
            raise EditorCheckpointMismatchError(
                f"{path}: the official {kind} weights do not fit the editor described by {source} "
                f"(inner_params and network sizes must be the ones it was trained with): {e}"
            ) from None
        LOG.info("loaded the official %s editor %s (trained %s steps)", kind, path, raw.get("step", "?"))
    editor.to(next(model.parameters()).device).eval()
    for p in editor.parameters():
        p.requires_grad_(False)
    return editor, raw


def native_payload(kind: str, editor: nn.Module, hparams: EditorHyperParams, optimizer: Any, step: int,
                   history: list[dict]) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "editor": kind,
        "model_name": hparams.model_name,
        "architecture": hparams.architecture(),
        "state": {k: v.detach().cpu() for k, v in editor.state_dict().items()},
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "step": step,
        "history": history,
        "hparams": hparams.to_dict(),
    }
