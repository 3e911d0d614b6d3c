"""Knowledge Neurons hyperparameters (ROME's KN file: steps, batch_size, adaptive_threshold, p, refine)."""
from __future__ import annotations

import dataclasses
from typing import Optional

from editing.context_templates import TemplateSpec
from util.hparams import HParamsError, HyperParams

OLD_TOKENS = ("target_true", "argmax")


@dataclasses.dataclass(frozen=True)
class KNHyperParams(HyperParams):
    # Attribution (integrated gradients over the inputs of each MLP output projection)
    steps: int  # points of the Riemann sum from 0 to the actual activation
    batch_size: int  # rows per forward pass; must divide steps (as in the KN code)
    adaptive_threshold: float  # coarse neurons: score > adaptive_threshold * max score of the prompt
    p: float  # refined neurons: coarse in more than p * n_prompts prompts
    refine: bool  # False: keep every coarse neuron of every prompt (ROME's gpt2-xl file)

    # Module templates (checked against util/architectures.py when the model is known)
    rewrite_module_tmp: str
    layer_module_tmp: str
    ln_f_module: str
    lm_head_module: str

    # Prompts: the request's prompt under each context template (["{}"] + samples as ROME's)
    context_template_length_params: tuple[tuple[int, int], ...] = ()
    context_template_seed: int = 0

    # The edit: each neuron's value vector += edit_scale * (E[new] - E[old]) (KN code: 2)
    edit_scale: float = 2.0
    old_token: str = "target_true"  # "argmax": the model's current prediction, as the KN code

    layers: Optional[tuple[int, ...]] = None  # attributed layers (None: every layer)
    implementation: str = "fast"  # "reference": every attribution pass runs the whole model

    @property
    def template_spec(self) -> TemplateSpec:
        return TemplateSpec(self.context_template_length_params, self.context_template_seed)

    def validate(self) -> None:
        if self.steps < 2:
            raise HParamsError("field 'steps' must be at least 2")
        if self.batch_size < 1 or self.steps % self.batch_size:
            raise HParamsError(f"field 'batch_size' ({self.batch_size}) must divide 'steps' ({self.steps})")
        if not 0.0 < self.adaptive_threshold <= 1.0:
            raise HParamsError("field 'adaptive_threshold' must be in (0, 1]")
        if not 0.0 <= self.p < 1.0:
            raise HParamsError("field 'p' must be in [0, 1)")
        if self.old_token not in OLD_TOKENS:
            raise HParamsError(f"field 'old_token' is {self.old_token!r}; expected one of {OLD_TOKENS}")
        if self.implementation not in ("fast", "reference"):
            raise HParamsError(f"field 'implementation' is {self.implementation!r}; expected 'fast' or 'reference'")
        if self.layers is not None and not self.layers:
            raise HParamsError("field 'layers' must name at least one layer, or be null for every layer")
        for name in ("rewrite_module_tmp", "layer_module_tmp"):
            if "{}" not in getattr(self, name):
                raise HParamsError(f"field {name!r} must contain '{{}}' for the layer index")
