"""The official MEND checkpoints (``mend-10tok-gpt2-xl.pt``, ``mend-10tok-gpt-j-6b.pt``) as a MendNetwork.

Their layout is the MEND code base's trainer archive: ``{"model": state, "opt", "lr_opt", "val_stats",
"step", ...}`` where ``state`` is the MEND wrapper's state dict without the language model's weights
(plus a pickled ``model_config``). Transforms live under ``mend.<key>.`` (``gtn.`` in older files),
with ``<key>`` = ``str((x_dim, delta_dim))`` when transforms are shared per weight shape, and hold
    mlp.layers.<i>.{u, v, bias, mode_scale.weight, mode_shift.weight}   (mlp1/mlp2 without combine)
    u_mean, u_std, u_s, v_mean, v_std, v_s, k                            (running statistics of x / delta)
and ``edit_lrs`` holds one learned lr per inner param in the config's inner_params order. The
reference adds lr * grad~ to the weights; MendNetwork subtracts, so the lrs are negated here.
"""
from __future__ import annotations

import re

import torch

from baselines.mend.mend_network import MendNetwork

_STAT_NAMES = {
    "u_mean": "x_norm.mean", "u_std": "x_norm.std", "u_s": "x_norm.m2",
    "v_mean": "delta_norm.mean", "v_std": "delta_norm.std", "v_s": "delta_norm.m2",
}
_MLP_NAMES = {"mlp": "mlp", "mlp1": "x_mlp", "mlp2": "delta_mlp"}
_LAYER_RE = re.compile(r"^(mlp|mlp1|mlp2)\.layers\.(\d+)\.(u|v|bias|mode_scale\.weight|mode_shift\.weight)$")


def is_official_mend(state: dict) -> bool:
    return "edit_lrs" in state and any(k.startswith(("mend.", "gtn.")) for k in state)


def _split_transform_key(key: str) -> tuple[str, str]:
    """'mend.(1600, 6400).mlp.layers.0.u' -> ('(1600, 6400)', 'mlp.layers.0.u'); names use '#' for dots."""
    rest = key.split(".", 1)[1]
    if rest.startswith("("):
        close = rest.index(")")
        return rest[: close + 1], rest[close + 2 :]
    name, _, sub = rest.partition(".")
    return name, sub


def map_official_mend_state(state: dict) -> dict[str, torch.Tensor]:
    """The official state dict renamed to MendNetwork's names, lrs negated; unknown keys raise."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key == "model_config" or key.startswith("model."):
            continue
        if key == "edit_lrs":
            out["edit_lrs"] = -value.detach().float()
            continue
        if not key.startswith(("mend.", "gtn.")):
            raise KeyError(f"unexpected key {key!r} in an official MEND state dict")
        transform, sub = _split_transform_key(key)
        prefix = f"transforms.{transform}."
        if sub in _STAT_NAMES:
            out[prefix + _STAT_NAMES[sub]] = value.float()
        elif sub == "k":
            out[prefix + "x_norm.count"] = value.float().reshape(1)
            out[prefix + "delta_norm.count"] = value.float().reshape(1)
        else:
            match = _LAYER_RE.match(sub)
            if match is None:
                raise KeyError(f"unexpected key {key!r} in an official MEND state dict")
            mlp, index, leaf = match.groups()
            out[f"{prefix}{_MLP_NAMES[mlp]}.layers.{index}.{leaf.replace('.weight', '')}"] = value.float()
    return out


def load_official_mend(editor: MendNetwork, state: dict) -> None:
    mapped = map_official_mend_state(state)
    editor.load_state_dict(mapped, strict=True)
