"""Trace and edit the inputs and outputs of named submodules.

A small baukit-style toolkit. Every context manager removes its hooks on exit, even when the
forward pass raises, so a failed optimisation step never leaves a stray hook in the model.
Hugging Face blocks often return tuples: retained outputs are cloned element-wise, so a caller
that keeps a retained tuple never aliases a tensor that a later in-place edit changes.
"""
from __future__ import annotations

import contextlib
from collections import OrderedDict
from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn

EditFn = Callable[[Any, Optional[str]], Any]  # (output, layer name) -> the output to use


class StopForward(Exception):
    """Raised by a hook to stop the forward pass once the traced layer has run."""


def _recursive_copy(x: Any, clone: bool, detach: bool, retain_grad: bool) -> Any:
    if isinstance(x, torch.Tensor):
        if detach:
            x = x.detach()
        if clone:
            x = x.clone()
        if retain_grad:
            if not x.requires_grad:
                x.requires_grad_(True)
            x.retain_grad()
        return x
    if isinstance(x, (tuple, list)):
        return type(x)(_recursive_copy(v, clone, detach, retain_grad) for v in x)
    if isinstance(x, dict):
        return type(x)({k: _recursive_copy(v, clone, detach, retain_grad) for k, v in x.items()})
    return x


def _first_tensor(x: Any) -> Any:
    """The main tensor of a module input/output (blocks return (hidden, extras...))."""
    if isinstance(x, (tuple, list)) and len(x) > 0:
        return x[0]
    return x


class Trace(contextlib.AbstractContextManager):
    """Hook one module by dotted name.

    retain_output / retain_input keep copies in ``.output`` / ``.input`` (the main tensor
    of a tuple output is reached with ``first_output``); ``edit_output(output, layer_name)``
    may return a replacement output; ``stop=True`` raises StopForward after the module so
    that nothing above it is computed.
    """

    def __init__(
        self,
        module: nn.Module,
        layer: Optional[str] = None,
        retain_output: bool = True,
        retain_input: bool = False,
        clone: bool = False,
        detach: bool = False,
        retain_grad: bool = False,
        edit_output: Optional[EditFn] = None,
        stop: bool = False,
    ):
        self.layer = layer
        self.output: Any = None
        self.input: Any = None
        target = get_module(module, layer) if layer is not None else module

        def hook(_mod: nn.Module, inputs: tuple, output: Any) -> Any:
            if retain_input:
                inp = inputs[0] if len(inputs) == 1 else inputs
                self.input = _recursive_copy(inp, clone=clone, detach=detach, retain_grad=False)
            if edit_output is not None:
                output = edit_output(output, self.layer)
            if retain_output:
                self.output = _recursive_copy(output, clone=clone, detach=detach, retain_grad=retain_grad)
                if retain_grad:
                    output = self.output
            if stop:
                raise StopForward()
            return output

        self._handle = target.register_forward_hook(hook)

    @property
    def first_output(self) -> Any:
        return _first_tensor(self.output)

    def close(self) -> None:
        self._handle.remove()

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.close()
        return exc_type is not None and issubclass(exc_type, StopForward)


class TraceDict(OrderedDict, contextlib.AbstractContextManager):
    """Trace several modules at once; ``td[name]`` is that module's Trace.

    With ``stop=True`` the pass stops after the last listed module to run in forward order
    (the order of ``layers`` as given is assumed to be forward order).
    """

    def __init__(
        self,
        module: nn.Module,
        layers: Iterable[str],
        retain_output: bool = True,
        retain_input: bool = False,
        clone: bool = False,
        detach: bool = False,
        retain_grad: bool = False,
        edit_output: Optional[EditFn] = None,
        stop: bool = False,
    ):
        super().__init__()
        names = list(dict.fromkeys(layers))
        try:
            for i, name in enumerate(names):
                self[name] = Trace(
                    module,
                    name,
                    retain_output=retain_output,
                    retain_input=retain_input,
                    clone=clone,
                    detach=detach,
                    retain_grad=retain_grad,
                    edit_output=edit_output,
                    stop=stop and i == len(names) - 1,
                )
        except Exception:
            self.close()
            raise

    def close(self) -> None:
        for trace in self.values():
            trace.close()

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.close()
        return exc_type is not None and issubclass(exc_type, StopForward)


def get_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule with this dotted name, or a LookupError that lists near misses."""
    modules = dict(model.named_modules())
    if name in modules:
        return modules[name]
    prefix = name.rsplit(".", 1)[0]
    near = [n for n in modules if n.startswith(prefix)][:8]
    raise LookupError(f"model has no module named {name!r}; modules under {prefix!r}: {near}")


def get_parameter(model: nn.Module, name: str) -> torch.Tensor:
    """The tensor holding the values of the parameter with this dotted name (e.g.
    'model.layers.3.mlp.down_proj.weight'): the parameter itself, or its offloaded storage when
    accelerate keeps it off the module (util/placement.py)."""
    from util.placement import stored_tensor

    module_name, _, attr = name.rpartition(".")
    try:
        module = get_module(model, module_name) if module_name else model
    except LookupError:
        module = None
    if module is None or not isinstance(getattr(module, attr, None), torch.Tensor):
        raise LookupError(f"model has no parameter named {name!r}")
    return stored_tensor(module, attr)


def set_requires_grad(requires_grad: bool, *models: nn.Module | torch.Tensor) -> None:
    """Switch gradients on or off for whole modules or single parameters."""
    for m in models:
        if isinstance(m, nn.Module):
            for p in m.parameters():
                p.requires_grad_(requires_grad)
        elif isinstance(m, torch.Tensor):
            m.requires_grad_(requires_grad)
        else:
            raise TypeError(f"set_requires_grad expects modules or tensors, got {type(m).__name__}")
