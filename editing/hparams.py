"""The hyperparameters every locate-then-edit method shares, typed once for ``editing/``.

ROME, MEMIT and the methods built on them (WilKE, AlphaEdit, RECT, PRUNE) read the same fields: the
module templates of the edited architecture, the fact token, ROME's value optimisation, the context
templates and the second-moment statistics. They live here, below every method package, so that
``editing/`` (value optimisation, resources, statistics) types what it reads instead of reaching
into ``rome/`` or reading ``Any`` through ``getattr``; ``rome/`` and ``memit/`` each add only what is
theirs (ROME's rank-one rule, MEMIT's update weight).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from editing.context_templates import TemplateSpec
from editing.corpus_sample import ROME_SAMPLE_SEED
from util.hparams import HParamsError, HyperParams

DEFAULT_VALUE_BATCH_TOKENS = 4096
FACT_TOKEN_STRATEGIES = ("subject_last", "subject_first", "last")
IMPLEMENTATIONS = ("fast", "reference")
MODULE_TEMPLATES = ("rewrite_module_tmp", "layer_module_tmp", "mlp_module_tmp", "attn_module_tmp")


@dataclasses.dataclass(frozen=True)
class LocateEditHyperParams(HyperParams):
    # Method
    layers: tuple[int, ...]
    fact_token: str
    v_num_grad_steps: int
    v_lr: float
    v_loss_layer: int
    v_weight_decay: float
    clamp_norm_factor: float
    kl_factor: float
    mom2_adjustment: bool
    context_template_length_params: tuple[tuple[int, int], ...]

    # Module templates (checked against util/architectures.py when the model is known)
    rewrite_module_tmp: str
    layer_module_tmp: str
    mlp_module_tmp: str
    attn_module_tmp: str
    ln_f_module: str
    lm_head_module: str

    # Statistics
    mom2_dataset: str
    mom2_n_samples: int
    mom2_dtype: str

    # Beyond the reference (defaults keep the reference behaviour)
    mom2_max_length: Optional[int] = None  # truncate statistics samples (None: the model's context)
    # ROME's seeded sample of the corpus (tally(..., random_sample=1)); None: the corpus's first texts
    mom2_sample_seed: Optional[int] = ROME_SAMPLE_SEED
    context_template_seed: int = 0  # the reference samples templates unseeded
    # None: ROME's templates, sampled from the start token; MEMIT's hparams sample after its five prompts
    context_template_prompts: Optional[tuple[str, ...]] = None
    v_early_stop_loss: float = 5e-2
    # ENCORE's most-probable early stopping (MPES; upstream ``prob_cutoff``, same sign): -n stops a value
    # optimisation at the n-th pass on which the target is the argmax on every prefixed rewriting prompt
    # (editing/value_optimisation.py); 0 is off (the reference methods)
    mpes_prob_cutoff: int = 0
    # padded prompt positions per batch of value optimisations (0: one after another, as the papers' code);
    # the values are the same either way, within float rounding (editing/value_optimisation.py)
    v_batch_tokens: int = DEFAULT_VALUE_BATCH_TOKENS
    implementation: str = "fast"  # "reference" reruns every forward in full, as the papers' code

    # NAS (Liu et al. 2026, "Norm Anchors Make Model Edits Last"; editing/norm_anchor.py): rescale each
    # solved value vector to the unedited model's mean ||v*||. Off by default: the reference methods.
    value_norm_anchor: bool = False
    value_norm_anchor_samples: int = 1000  # upstream nas_restart: the rewrites the mean ||v*|| is taken over
    value_norm_anchor_seed: int = 0  # upstream _NAS_SEED: random.Random(seed).sample of the rewrites
    # the rewrites' dataset (dsets/registry.py name); upstream multi_counterfact, which is not offline here
    value_norm_anchor_dataset: str = "counterfact_full"

    def validate(self) -> None:
        if not self.layers:
            raise HParamsError("field 'layers' must name at least one layer")
        if self.fact_token not in FACT_TOKEN_STRATEGIES:
            raise HParamsError(f"field 'fact_token' is {self.fact_token!r}; expected one of {FACT_TOKEN_STRATEGIES}")
        if self.mom2_dtype not in ("float32", "float64"):
            raise HParamsError(f"field 'mom2_dtype' is {self.mom2_dtype!r}; expected 'float32' or 'float64'")
        if self.implementation not in IMPLEMENTATIONS:
            raise HParamsError(f"field 'implementation' is {self.implementation!r}; expected one of {IMPLEMENTATIONS}")
        if self.v_num_grad_steps < 1:
            raise HParamsError("field 'v_num_grad_steps' must be at least 1")
        if self.mpes_prob_cutoff > 0:
            raise HParamsError("field 'mpes_prob_cutoff' must be 0 (off) or negative (-n: stop at the n-th pass where "
                               "the target is the most probable token); upstream's positive prob_cutoff (a mean "
                               "probability threshold) is in none of ENCORE's files and not implemented")
        if self.v_batch_tokens < 0:
            raise HParamsError("field 'v_batch_tokens' must be 0 (no batching) or a positive token budget")
        for name in MODULE_TEMPLATES:
            if "{}" not in getattr(self, name):
                raise HParamsError(f"field {name!r} must contain '{{}}' for the layer index")
        if self.value_norm_anchor_samples < 1:
            raise HParamsError("field 'value_norm_anchor_samples' must be at least 1")

    @property
    def template_spec(self) -> TemplateSpec:
        return TemplateSpec(self.context_template_length_params, self.context_template_seed, self.context_template_prompts)

    @property
    def statistics_layers(self) -> list[int]:
        """The layers whose key statistics a run of this method loads (WilKE: every candidate)."""
        return list(self.layers)

    @property
    def norm_anchor_layers(self) -> list[int]:
        """The layers whose value vectors NAS rescales (MEMIT: the z layer; WilKE: every candidate)."""
        return list(self.layers)

    @property
    def norm_anchor_variants(self) -> list["LocateEditHyperParams"]:
        """The optimisation settings those values are solved with (WilKE's approximate scan: two)."""
        return [self]
