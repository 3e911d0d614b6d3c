"""The one place that knows each architecture's module names.

Adding a model family is one ``ArchSpec`` entry keyed by ``config.model_type``. Editing code reads
module names from hparams (as ROME does); ``check_hparams_against_model`` verifies them against
this table and the loaded model, so a GPT-2 hparams file given to a Llama model fails on load
with a message naming the file and field.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import nn

from util.hparams import HParamsError


@dataclasses.dataclass(frozen=True)
class ArchSpec:
    """Module-name templates for one architecture; ``{}`` is the block index."""

    layer_module_tmp: str  # a whole block (its output is the residual stream)
    mlp_module_tmp: str  # the MLP
    rewrite_module_tmp: str  # the MLP's output projection W_l (the matrix ROME edits)
    attn_module_tmp: str
    ln_f_module: str
    lm_head_module: str
    embed_module: str
    layers_container: str  # the ModuleList that holds the blocks
    position_embed_module: Optional[str] = None  # learned absolute positions (GPT-2)
    # a norm between the MLP's output and the residual add (Gemma 2 and 3's post_feedforward_layernorm):
    # the MLP's output then reaches the residual stream only through a scale-invariant map
    mlp_output_norm_tmp: Optional[str] = None


ARCHITECTURES: dict[str, ArchSpec] = {
    "gpt2": ArchSpec(
        layer_module_tmp="transformer.h.{}",
        mlp_module_tmp="transformer.h.{}.mlp",
        rewrite_module_tmp="transformer.h.{}.mlp.c_proj",
        attn_module_tmp="transformer.h.{}.attn",
        ln_f_module="transformer.ln_f",
        lm_head_module="lm_head",
        embed_module="transformer.wte",
        layers_container="transformer.h",
        position_embed_module="transformer.wpe",
    ),
    "gptj": ArchSpec(
        layer_module_tmp="transformer.h.{}",
        mlp_module_tmp="transformer.h.{}.mlp",
        rewrite_module_tmp="transformer.h.{}.mlp.fc_out",
        attn_module_tmp="transformer.h.{}.attn",
        ln_f_module="transformer.ln_f",
        lm_head_module="lm_head",
        embed_module="transformer.wte",
        layers_container="transformer.h",
    ),
    "gpt_neox": ArchSpec(
        layer_module_tmp="gpt_neox.layers.{}",
        mlp_module_tmp="gpt_neox.layers.{}.mlp",
        rewrite_module_tmp="gpt_neox.layers.{}.mlp.dense_4h_to_h",
        attn_module_tmp="gpt_neox.layers.{}.attention",
        ln_f_module="gpt_neox.final_layer_norm",
        lm_head_module="embed_out",
        embed_module="gpt_neox.embed_in",
        layers_container="gpt_neox.layers",
    ),
}

_LLAMA_LIKE = ArchSpec(
    layer_module_tmp="model.layers.{}",
    mlp_module_tmp="model.layers.{}.mlp",
    rewrite_module_tmp="model.layers.{}.mlp.down_proj",
    attn_module_tmp="model.layers.{}.self_attn",
    ln_f_module="model.norm",
    lm_head_module="lm_head",
    embed_module="model.embed_tokens",
    layers_container="model.layers",
)
for _name in ("llama", "qwen2", "mistral", "gemma"):
    ARCHITECTURES[_name] = _LLAMA_LIKE
for _name in ("gemma3_text", "gemma2"):
    ARCHITECTURES[_name] = dataclasses.replace(_LLAMA_LIKE, mlp_output_norm_tmp="model.layers.{}.post_feedforward_layernorm")

# hparams fields that hold module templates, and the ArchSpec attribute each must equal.
TEMPLATE_FIELDS = (
    "layer_module_tmp",
    "mlp_module_tmp",
    "rewrite_module_tmp",
    "attn_module_tmp",
    "ln_f_module",
    "lm_head_module",
)


class UnsupportedArchitectureError(ValueError):
    pass


class ResidualTargetsError(HParamsError):
    """A method that writes residual-stream targets through the MLP's output, on a model whose MLP
    output passes through a norm first (``check_residual_targets``). ``fix`` says what to do instead."""

    fix = "choose ROME, r-ROME, WilKE, UltraEdit, FT, KN, GRACE or WISE for this model"

    def __init__(self, message: str, fix: Optional[str] = None):
        super().__init__(message)
        if fix is not None:
            self.fix = fix


def arch_of(model: nn.Module) -> ArchSpec:
    model_type = getattr(model.config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"model_type {model_type!r} has no entry in util/architectures.py ARCHITECTURES "
            f"(known: {', '.join(sorted(ARCHITECTURES))}); add one ArchSpec for it"
        )
    return ARCHITECTURES[model_type]


def text_config(model: nn.Module):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def num_layers(model: nn.Module) -> int:
    cfg = text_config(model)
    for attr in ("num_hidden_layers", "n_layer", "num_layers"):
        if hasattr(cfg, attr):
            return int(getattr(cfg, attr))
    raise UnsupportedArchitectureError(f"cannot read the number of layers from {type(cfg).__name__}")


def mlp_activation(model: nn.Module) -> str:
    """The name of the MLP's activation function in the model's config (a transformers ACT2FN key)."""
    cfg = text_config(model)
    for attr in ("hidden_activation", "hidden_act", "activation_function"):
        if getattr(cfg, attr, None):
            return str(getattr(cfg, attr))
    raise UnsupportedArchitectureError(f"cannot read the MLP activation from {type(cfg).__name__}")


def context_length(model: nn.Module) -> int:
    cfg = text_config(model)
    for attr in ("max_position_embeddings", "n_positions", "n_ctx"):
        if getattr(cfg, attr, None):
            return int(getattr(cfg, attr))
    return 2048


def is_transposed(module: nn.Module) -> bool:
    """GPT-2's Conv1D stores W as (in, out); nn.Linear as (out, in)."""
    return type(module).__name__ == "Conv1D"


def weight_out_in(module: nn.Module) -> torch.Tensor:
    """The module's weight viewed as (out_features, in_features), sharing storage (offloaded
    weights included: util/placement.py)."""
    from util.placement import stored_tensor

    w = stored_tensor(module, "weight")
    return w.T if is_transposed(module) else w


def update_to_weight_shape(update_out_in: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """An (out, in) update laid out like ``module.weight``."""
    return update_out_in.T if is_transposed(module) else update_out_in


def check_hparams_against_model(hparams, model: nn.Module, source: str = "hparams") -> None:
    """Every module template in hparams must match the model's architecture and exist in it."""
    spec = arch_of(model)
    names = {n for n, _ in model.named_modules()}
    n_layers = num_layers(model)
    for field in TEMPLATE_FIELDS:
        value = getattr(hparams, field, None)
        if value is None:
            continue
        expected = getattr(spec, field)
        tied_head = field == "lm_head_module" and value == spec.embed_module  # ROME's GPT-2 files
        if value != expected and not tied_head:
            raise HParamsError(
                f"{source}: field {field!r} is {value!r} but this {model.config.model_type} model "
                f"uses {expected!r}; the hparams file is for another architecture"
            )
        probe = value.format(0) if "{}" in value else value
        if probe not in names:
            raise HParamsError(f"{source}: field {field!r}: module {probe!r} not found in the model")
    for field in ("layers",):
        for layer in getattr(hparams, field, ()) or ():
            if not 0 <= layer < n_layers:
                raise HParamsError(
                    f"{source}: field {field!r} has layer {layer}, but the model has layers 0..{n_layers - 1}"
                )
    _check_watched_module(hparams, model, names, n_layers, source)
    check_residual_targets(hparams, model, source)
    for field in ("v_loss_layer", "scanning_ceiling"):
        value = getattr(hparams, field, None)
        limit = n_layers + 1 if field == "scanning_ceiling" else n_layers
        if value is not None and not 0 <= value < limit:
            raise HParamsError(
                f"{source}: field {field!r} is {value}, but the model has layers 0..{n_layers - 1}"
            )


def check_residual_targets(hparams, model: nn.Module, source: str = "hparams") -> None:
    """Residual-stream targets written through the MLP's output need that output added to the residual
    as it is. Behind a norm (Gemma 2 and 3) it is not (docs/fidelity.md), so two things are refused there:
    - methods whose hparams say ``writes_residual_targets`` (MEMIT and the methods built on its z's):
      their targets, residual deltas hundreds of times the MLP output's norm on Gemma-3-270m, would be
      written as if the output were added directly;
    - NAS (``value_norm_anchor``) for any method: its reference norm r is MEMIT's v*, the MLP output plus
      a delta optimised on the residual stream, so on Gemma-3-270m r is 178 where ROME's own v* are 12-19,
      and anchoring to it makes each update 14x larger (edit 1: ||Delta|| 67.7 against 4.7)."""
    spec = ARCHITECTURES.get(getattr(model.config, "model_type", None))
    if spec is None or spec.mlp_output_norm_tmp is None:
        return
    norm = f"{spec.mlp_output_norm_tmp.format('L')!r}"
    if getattr(hparams, "writes_residual_targets", False):
        raise ResidualTargetsError(
            f"{source}: this {model.config.model_type} model passes each MLP's output through {norm} before the "
            f"residual add, so the residual-stream targets of MEMIT, AlphaEdit, ENCORE, RECT and PRUNE cannot be "
            f"written into {hparams.rewrite_module_tmp.format('L')!r} (docs/fidelity.md, 'Gemma 2 and 3'); "
            f"{ResidualTargetsError.fix}")
    if getattr(hparams, "value_norm_anchor", False):
        fix = "set value_norm_anchor to false (NAS does not apply to this model), or edit another model with NAS"
        raise ResidualTargetsError(
            f"{source}: value_norm_anchor (NAS) is on, but this {model.config.model_type} model passes each MLP's "
            f"output through {norm} before the residual add: NAS's reference norm is MEMIT's v* (the MLP output "
            f"plus a residual-stream delta), not a norm of the MLP output the method writes "
            f"(docs/fidelity.md, 'Gemma 2 and 3'); {fix}", fix)


def _check_watched_module(hparams, model: nn.Module, names: set[str], n_layers: int, source: str) -> None:
    """The one module a memory editor (GRACE, WISE) watches: ``edit_module_tmp`` at ``layer``, a 2-D weight."""
    layer, template = getattr(hparams, "layer", None), getattr(hparams, "edit_module_tmp", None)
    if not isinstance(layer, int) or template is None:
        return
    if not 0 <= layer < n_layers:
        raise HParamsError(f"{source}: field 'layer' is {layer}, but the model has layers 0..{n_layers - 1}")
    name = template.format(layer)
    if name not in names:
        raise HParamsError(f"{source}: field 'edit_module_tmp': module {name!r} not found in the model")
    weight = getattr(model.get_submodule(name), "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise HParamsError(f"{source}: field 'edit_module_tmp': {name!r} is not a Linear/Conv1D layer with a 2-D weight")
