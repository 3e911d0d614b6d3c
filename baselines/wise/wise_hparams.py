"""WISE hyperparameters (Wang et al., NeurIPS 2024; EasyEdit ``hparams/WISE/*.yaml``, WISE-Retrieve).

Field for field as upstream's YAML, with ``inner_params`` ("model.layers[29].mlp.down_proj.weight")
written as ``edit_module_tmp`` + ``layer``. Upstream's ``retrieve: True`` and ``replay: False`` (every
shipped file) are what this implementation does, so they are not fields; ``merge_alg`` is TIES
(``ties``, every shipped file); ``objective_optimization`` is ``only_label``. Values upstream writes into
its code are fields with upstream's value as default: SGD ``weight_decay`` 1e-5, the context templates
(``get_context_templates``: greedy continuations of "I", "You", "Because", "Yes", "Q: " by 5 and 10 new
tokens, each followed by " {}"; made by the run's EditResources like every method's), and where the
unrelated row of each edit comes from (EasyEdit's WISE example: zsRE training questions with answers).
"""
from __future__ import annotations

import dataclasses

from editing.context_templates import TemplateSpec, TemplateStyle
from editing.memory_layer import MemoryLayerHyperParams, positive
from util.hparams import HParamsError


@dataclasses.dataclass(frozen=True, kw_only=True)
class WISEHyperParams(MemoryLayerHyperParams):
    edit_lr: float
    n_iter: int
    mask_ratio: float  # share of the side memory's entries one shard trains
    act_margin: tuple[float, float, float]  # alpha, beta, gamma of the routing margins
    act_ratio: float  # a memory is used when its activation score reaches act_ratio x its threshold
    norm_constraint: float  # the side memory stays within W +- this, entry by entry
    save_freq: int  # edits per shard; then the shard is stored and a fresh side memory started
    merge_freq: int  # edits per merge of the last merge_freq / save_freq shards (TIES)
    densities: float  # TIES: share of each shard's largest-magnitude changes kept
    weights: float  # TIES: total weight of the merged shards
    weight_decay: float = 1e-5
    context_template_length_params: tuple[tuple[int, int], ...] = ((5, 5), (10, 5))
    context_template_prompts: tuple[str, ...] = ("I", "You", "Because", "Yes", "Q: ")
    context_template_top_k: int = 1  # greedy: upstream's generate with num_beams = count // 5 = 1
    context_template_separator: str = " "
    context_template_new_tokens: bool = True  # upstream's max_new_tokens
    unrelated_file: str = "zsre_mem_train.json"
    seed: int = 0  # seeds each shard's random mask (upstream: numpy's global RNG)

    @property
    def template_spec(self) -> TemplateSpec:
        style = TemplateStyle(self.context_template_top_k, self.context_template_separator, self.context_template_new_tokens)
        return TemplateSpec(self.context_template_length_params, 0, self.context_template_prompts, style)

    @property
    def alpha(self) -> float:
        return self.act_margin[0]

    @property
    def beta(self) -> float:
        return self.act_margin[1]

    @property
    def gamma(self) -> float:
        return self.act_margin[2]

    def validate(self) -> None:
        super().validate()
        positive(self, "edit_lr", "n_iter", "act_ratio", "norm_constraint", "save_freq", "merge_freq", "densities",
                 "weights", "alpha", "beta", "gamma")
        if not 0 < self.mask_ratio <= 1:
            raise HParamsError(f"field 'mask_ratio' is {self.mask_ratio}; expected a share in (0, 1]")
        if self.densities > 1:
            raise HParamsError(f"field 'densities' is {self.densities}; expected a share in (0, 1]")
        if self.merge_freq % self.save_freq:
            raise HParamsError(f"field 'merge_freq' ({self.merge_freq}) must be a multiple of 'save_freq' "
                               f"({self.save_freq}), as upstream asserts")
        if self.weight_decay < 0:
            raise HParamsError("field 'weight_decay' must not be negative")
