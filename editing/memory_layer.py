"""What the memory-based editors (GRACE, WISE) share: one watched layer, no weight ever written.

Both keep their memory beside one module of one block (a Linear, or GPT-2's Conv1D), named by the
hparams as ``edit_module_tmp.format(layer)``. A forward hook sees that module's input and output and
may replace the output: at inference (the editor's ``for_evaluation``) and inside an edit's
optimisation, whose forward passes start at that block (editing/forward.py strategies: the block's
input does not depend on the module's output, so it is computed once per edit).
"""
from __future__ import annotations

import contextlib
import copy as copy_module
import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from editing.editor import apply_with_editor
from editing.forward import PromptBatch
from editing.forward_choice import Strategy, verified_forward
from util import nethook
from util.architectures import num_layers
from util.hparams import HParamsError, HyperParams

IMPLEMENTATIONS = ("fast", "reference")
OutputFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclasses.dataclass(frozen=True, kw_only=True)
class MemoryLayerHyperParams(HyperParams):
    """The watched module and how an edit's forward passes run (fields every memory editor has)."""

    layer: int  # the block whose module is watched
    edit_module_tmp: str  # e.g. "model.layers.{}.mlp.down_proj" (upstream: ``inner_params``)
    layer_module_tmp: str  # the blocks, to start an edit's forward pass at ``layer``
    ln_f_module: str
    implementation: str = "fast"  # "reference" runs every forward pass of an edit through the whole model

    @property
    def module_name(self) -> str:
        return self.edit_module_tmp.format(self.layer)

    def validate(self) -> None:
        if self.layer < 0:
            raise HParamsError(f"field 'layer' is {self.layer}; expected a block index (0 or more)")
        for name in ("edit_module_tmp", "layer_module_tmp"):
            if "{}" not in getattr(self, name):
                raise HParamsError(f"field {name!r} must contain '{{}}' for the block index")
        if self.implementation not in IMPLEMENTATIONS:
            raise HParamsError(f"field 'implementation' is {self.implementation!r}; expected one of {IMPLEMENTATIONS}")


def positive(hparams: HyperParams, *names: str) -> None:
    """HParamsError naming the first of ``names`` that is not a positive number."""
    for name in names:
        value = getattr(hparams, name)
        if not value > 0:
            raise HParamsError(f"field {name!r} is {value!r}; expected a positive number")


@contextlib.contextmanager
def watch_output(module: nn.Module, fn: OutputFn) -> Iterator[None]:
    """While open, ``module``'s output is ``fn(its input, its output)``; the hook is always removed."""
    handle = module.register_forward_hook(lambda _m, inputs, output: fn(inputs[0], output))
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def module_io(model: nn.Module, module_name: str, batch: PromptBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(input, output) of the watched module for ``batch``; the pass stops right after it."""
    with nethook.Trace(model, module_name, retain_input=True, retain_output=True, detach=True, stop=True) as tr:
        batch.run(model)
    return tr.input, tr.output


def edit_forward(model: nn.Module, hparams: MemoryLayerHyperParams, batch: PromptBatch, checked: dict) -> Strategy:
    """The fastest forward strategy that matches the full pass, from the watched block to the logits."""
    n = num_layers(model)
    return verified_forward(hparams.implementation, model, batch, hparams.layer_module_tmp, n, n - 1,
                            hparams.ln_f_module, first_block=hparams.layer, checked=checked)


def logits_at(strategy: Strategy, hparams: MemoryLayerHyperParams) -> torch.Tensor:
    """Logits at the batch's read positions, with whatever hooks are open on the watched module."""
    return strategy.logits(hparams.layer, hparams.module_name, _unchanged)


def _unchanged(output: Any, _name: str) -> Any:
    return output


def edit_in_turn(editor_class: type, model: nn.Module, tok: Any, requests: Sequence[dict], hparams: Any, copy: bool,
                 resources: Any, editor: Any) -> tuple[nn.Module, dict[str, torch.Tensor], Any]:
    """The body of ``apply_grace_to_model`` / ``apply_wise_to_model``: ``apply_with_editor`` (a new
    editor, or ``editor`` to continue a sequence), and the editor itself, where the edits live (no
    weight changes); evaluate inside its ``for_evaluation``."""
    if copy:
        model = copy_module.deepcopy(model)
    editor = editor or editor_class(model, tok, hparams, resources)
    model, weights = apply_with_editor(editor_class, model, tok, requests, hparams, editor=editor)
    return model, weights, editor
