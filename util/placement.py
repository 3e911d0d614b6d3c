"""Where a model's tensors live and in what precision: devices per module, offloaded weights, and
the working precision of the editing math.

Models larger than one GPU are loaded through accelerate's big-model dispatch (``device_map``):
blocks sit on different devices, and offloaded modules keep their weights in a CPU map while the
module's own parameter is an empty "meta" tensor, filled by accelerate's hook for each forward
pass. Editing code therefore never reads ``module.weight`` for values: ``stored_weight`` returns
the tensor that really holds them (the parameter, or the hook's map entry), and ``module_device``
says where the module computes, so keys, covariances and updates of a layer live on its device.

Half-precision models (``--dtype bfloat16|float16``) run their forward passes in that dtype, but
keys, the v*/z optimisation and the solves run in ``working_dtype`` (float32 or wider) and an
update is cast once, when it is added to the weight.
"""
from __future__ import annotations

import torch
from torch import nn

HALF_DTYPES = (torch.float16, torch.bfloat16)


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for a half-precision dtype, the dtype itself otherwise."""
    return torch.float32 if dtype in HALF_DTYPES else dtype


def as_working(t: torch.Tensor) -> torch.Tensor:
    """``t`` in its working precision (a copy only when the dtype changes)."""
    return t.to(working_dtype(t.dtype))


def _hook(module: nn.Module):
    return getattr(module, "_hf_hook", None)


def stored_tensor(module: nn.Module, name: str = "weight") -> torch.Tensor:
    """The tensor holding ``module.<name>``'s values: the parameter itself, or, when accelerate has
    offloaded it (a meta parameter), the entry of the hook's weights map that the hook copies in."""
    tensor = getattr(module, name)
    if tensor.device.type != "meta":
        return tensor
    weights_map = getattr(_hook(module), "weights_map", None)
    if weights_map is None:
        raise ValueError(f"{type(module).__name__}.{name} is offloaded without a weights map: it cannot be read or edited")
    return weights_map[name]


def module_device(module: nn.Module) -> torch.device:
    """Where ``module`` computes: its hook's execution device, else its first parameter's device."""
    execution = getattr(_hook(module), "execution_device", None)
    if execution is not None:
        return torch.device(execution) if not isinstance(execution, int) else torch.device("cuda", execution)
    for p in module.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def synchronize(module: nn.Module) -> None:
    """Wait for the work queued on ``module``'s device, so that wall-clock timings include it (any
    accelerator through its torch device module; a no-op on CPU)."""
    device = module_device(module)
    torch.get_device_module(device).synchronize(device)


def device_name(module: nn.Module) -> str:
    """The name of the device ``module`` computes on, as its torch device module reports it (e.g. the
    GPU's model), else the device type ("cpu")."""
    device = module_device(module)
    named = getattr(torch.get_device_module(device), "get_device_name", None)
    return named(device) if named is not None else device.type
