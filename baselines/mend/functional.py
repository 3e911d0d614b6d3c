"""The edited model as a function of the edited weights, and the gradient factors an edit starts from.

Both editors map the fine-tuning gradient of each edited weight to an update. For a Linear/Conv1D
weight that gradient is sum_i delta_i x_i^T, with x_i the layer input at token i and delta_i the
gradient of the loss w.r.t. the layer output there; ``gradient_factors`` returns the pairs
(x_i, delta_i) from one forward/backward pass (MEND's hooks do the same with backward hooks).

``EditRunner`` evaluates the model on one ``EditBatch`` with replacement weights through
``torch.func.functional_call``, so a loss after the edit is differentiable w.r.t. the editor that
produced the update (MEND's training needs this; the reference uses ``higher``'s monkey-patching).
The fast strategy reuses ``editing.forward.SuffixForward``'s captured block inputs: an edit of
blocks l..L-1 cannot change the residual stream entering block l, so that prefix is computed once
per batch and every pass re-runs only the edited blocks and the vocabulary projection at the read
positions. The reference strategy runs the whole model each time; the two are compared once per model.
"""
from __future__ import annotations

import dataclasses
import logging
import re
from typing import Any, Optional, Sequence

import torch
from torch import nn
from torch.func import functional_call

from baselines.mend.batches import INNER, EditBatch
from editing.forward import SuffixForward
from util import nethook
from util.architectures import arch_of, is_transposed, num_layers, weight_out_in
from util.scoring import lm_logits

LOG = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class InnerParam:
    """One edited weight: its name, module, block index and (out, in) shape."""

    name: str
    module_name: str
    block: int
    out_features: int
    in_features: int
    transposed: bool  # GPT-2 Conv1D stores W as (in, out)


@dataclasses.dataclass
class Factors:
    x: torch.Tensor  # (rows, in): layer inputs
    delta: torch.Tensor  # (rows, out): dLoss/d(layer output)

    def gradient(self) -> torch.Tensor:
        """The weight gradient in (out, in) layout."""
        return self.delta.T @ self.x


def block_of(model: nn.Module, module_name: str) -> int:
    tmp = arch_of(model).layer_module_tmp
    pattern = "^" + re.escape(tmp).replace(r"\{\}", r"(\d+)") + r"\."
    match = re.match(pattern, module_name)
    if match is None:
        raise ValueError(f"{module_name!r} is not inside a block {tmp!r}: editors edit weights inside blocks")
    return int(match.group(1))


def inner_params(model: nn.Module, names: Sequence[str], source: str = "hparams") -> list[InnerParam]:
    """Resolve and check the edited weights (each must be a 2-D Linear/Conv1D weight in a block)."""
    params = dict(model.named_parameters())
    out = []
    for name in names:
        if name not in params:
            near = [n for n in params if n.rsplit(".", 3)[-2:] == name.rsplit(".", 3)[-2:]][:4]
            raise ValueError(f"{source}: inner param {name!r} is not a parameter of this model (similar: {near})")
        module_name = name[: -len(".weight")]
        module = nethook.get_module(model, module_name)
        if params[name].dim() != 2:
            raise ValueError(f"{source}: inner param {name!r} is not a 2-D weight")
        w = weight_out_in(module)
        out.append(InnerParam(name, module_name, block_of(model, module_name), w.shape[0], w.shape[1], is_transposed(module)))
    return out


def to_param_layout(update_out_in: torch.Tensor, param: InnerParam) -> torch.Tensor:
    return update_out_in.T if param.transposed else update_out_in


def _grad_leaf(output: Any, _name: str) -> Any:
    """Make a layer output differentiable when nothing before it is (model weights are frozen)."""
    if torch.is_tensor(output) and not output.requires_grad:
        return output.detach().requires_grad_(True)
    return output


class EditRunner:
    """Logits at an EditBatch's read positions, optionally with replaced weights."""

    def __init__(self, model: nn.Module, batch: EditBatch, first_block: int, implementation: str = "fast"):
        self.model, self.batch = model, batch
        spec = arch_of(model)
        self.ln_f = nethook.get_module(model, spec.ln_f_module)
        self.last_block = num_layers(model) - 1
        self.first_block = first_block
        self.suffix: Optional[SuffixForward] = None
        if implementation == "fast":
            names = [spec.layer_module_tmp.format(i) for i in range(num_layers(model))]
            self.suffix = SuffixForward(model, batch.prompt, names, self.last_block, spec.ln_f_module, first_block)
            self.block_prefix = {i: names[i] + "." for i in range(first_block, self.last_block + 1)}

    def logits(self, weights: Optional[dict[str, torch.Tensor]] = None) -> torch.Tensor:
        weights = weights or {}
        if self.suffix is None:
            return self._full(weights)
        calls = self.suffix.calls
        hidden = calls[self.first_block][0][0]
        for i in range(self.first_block, self.last_block + 1):
            args, kwargs = calls[i]
            block = self.suffix.blocks[i]
            prefix = self.block_prefix[i]
            local = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
            call_args = (hidden, *args[1:])
            out = functional_call(block, local, call_args, kwargs) if local else block(*call_args, **kwargs)
            hidden = out[0] if isinstance(out, (tuple, list)) else out
        picked = hidden[self.batch.prompt.rows, self.batch.prompt.cols]
        return lm_logits(self.model, self.ln_f(picked))

    def _full(self, weights: dict[str, torch.Tensor]) -> torch.Tensor:
        last = arch_of(self.model).layer_module_tmp.format(self.last_block)
        p = self.batch.prompt
        kwargs = {"input_ids": p.input_ids, "attention_mask": p.attention_mask, "use_cache": False}
        with nethook.Trace(self.model, last) as tr:
            functional_call(self.model, weights, (), kwargs)
        picked = tr.first_output[p.rows, p.cols]
        return lm_logits(self.model, self.ln_f(picked))

    @torch.no_grad()
    def matches_full(self, rtol: float = 1e-4) -> bool:
        """Whether the fast strategy reproduces the whole-model pass (no edit applied)."""
        if self.suffix is None:
            return True
        a, b = self.logits(), self._full({})
        return bool(((a - b).abs().max() / b.abs().max().clamp_min(1e-6)) < rtol)


def token_nll(logits: torch.Tensor, batch: EditBatch, mask: torch.Tensor) -> torch.Tensor:
    """Mean NLL of the gold tokens at the masked read positions."""
    logp = torch.log_softmax(logits[mask].float(), dim=-1)
    return -logp.gather(1, batch.gold[mask][:, None]).mean()


def gradient_factors(
    runner: EditRunner, params: Sequence[InnerParam], kinds: Sequence[str] = (INNER,)
) -> tuple[dict[str, Factors], torch.Tensor, torch.Tensor]:
    """(x_i, delta_i) per edited weight for the NLL of the targets of ``kinds`` sequences.

    Returns the factors (rows of padding and of other sequences carry delta = 0), the pre-edit
    logits at every read position (detached) and the pre-edit loss.
    """
    batch = runner.batch
    modules = [p.module_name for p in params]
    with torch.enable_grad():
        with nethook.TraceDict(runner.model, modules, retain_input=True, retain_output=True, edit_output=_grad_leaf) as td:
            logits = runner.logits()
        loss = token_nll(logits, batch, batch.positions_of(*kinds))
        outputs = [td[m].output for m in modules]
        grads = torch.autograd.grad(loss, outputs, allow_unused=True)
    factors = {}
    for p, out, g in zip(params, outputs, grads):
        x = td[p.module_name].input.detach()
        g = torch.zeros_like(out) if g is None else g
        factors[p.name] = Factors(x.reshape(-1, x.shape[-1]), g.detach().reshape(-1, g.shape[-1]))
    return factors, logits.detach(), loss.detach()


def current_weights(model: nn.Module, params: Sequence[InnerParam]) -> dict[str, torch.Tensor]:
    """The edited weights' tensors, looked up once (a parameter scan per step is measurable on CPU)."""
    named = dict(model.named_parameters())
    return {p.name: named[p.name] for p in params}


def edited_weights(current: dict[str, torch.Tensor], updates: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{name: W + update} (updates in parameter layout), for functional evaluation."""
    return {name: w + updates[name].to(w.dtype) for name, w in current.items()}


class RunnerFactory:
    """Makes EditRunners and checks once per model that the fast strategy equals the full pass."""

    def __init__(self, implementation: str = "fast"):
        self.implementation = implementation
        self._verified: dict[int, bool] = {}

    def __call__(self, model: nn.Module, batch: EditBatch, first_block: int) -> EditRunner:
        if self.implementation == "fast":
            key = id(model)
            if key not in self._verified:
                self._verified[key] = EditRunner(model, batch, first_block, "fast").matches_full()
                if not self._verified[key]:
                    LOG.warning("fast suffix pass disagrees with the full pass on %s; using the full pass", type(model).__name__)
            if self._verified[key]:
                return EditRunner(model, batch, first_block, "fast")
        return EditRunner(model, batch, first_block, "reference")
