"""UltraEdit hyperparameters: which weights, the step size, and the sub-batch size of a turn.

Upstream (XiaojieGu/UltraEdit 0beb222) configures these in three places: ``config/model/*.yaml``
``edit_modules`` (module names, overridden per dataset in ``run.sh``), ``config/editor/ultraedit.yaml``
``lr`` (1e-6) and ``config/dataset/*.yaml`` ``batch_size`` (10 edits per forward/backward pass; a
turn is ``n_edits`` = 100 edits). Here the modules are templates with their layers, as the other
methods' ``rewrite_module_tmp`` + ``layers``; a turn is one ``edit`` call of the run (``--num_edits``).
Upstream's ``editor.batch_size`` (128) only chunks a row-wise computation (the padded rows are cut
off again) and changes no number, and ``token: ans`` is the only setting any of its configs uses:
neither is a field here.
"""
from __future__ import annotations

import dataclasses

from util.hparams import HParamsError, HyperParams


@dataclasses.dataclass(frozen=True)
class UltraEditHyperParams(HyperParams):
    # [[module template, [layers]], ...] in upstream's order; e.g. Llama-3-8B-Instruct:
    # [["model.layers.{}.mlp.gate_proj", [11, ..., 15]], ["model.layers.{}.mlp.up_proj", [18, ..., 24]]]
    edit_modules: tuple[tuple[str, tuple[int, ...]], ...]
    lr: float  # the pseudo-values are v = -lr ||k_hat||^2 g_hat
    sub_batch_size: int  # edits per forward/backward pass (upstream dataset.batch_size)

    def validate(self) -> None:
        if not self.edit_modules:
            raise HParamsError("field 'edit_modules' must name at least one [module template, [layers]] pair")
        for template, layers in self.edit_modules:
            if "{}" not in template:
                raise HParamsError(f"field 'edit_modules': template {template!r} must contain '{{}}' for the layer index")
            if not layers:
                raise HParamsError(f"field 'edit_modules': template {template!r} has no layers")
        names = self.module_names
        if len(set(names)) != len(names):
            raise HParamsError(f"field 'edit_modules' names a module twice: {names}")
        if self.lr <= 0:
            raise HParamsError("field 'lr' must be positive")
        if self.sub_batch_size < 1:
            raise HParamsError("field 'sub_batch_size' must be at least 1")

    @property
    def module_names(self) -> list[str]:
        """Every edited module, in upstream's order (the order the running statistics are updated in)."""
        return [template.format(layer) for template, layers in self.edit_modules for layer in layers]
