"""MEMIT (Meng et al. 2023): mass editing spread over a range of MLP output projections."""
from memit.memit_hparams import MEMITHyperParams
from memit.memit_main import LayerDelta, MEMITUpdate, apply_memit_to_model, execute_memit

__all__ = ["MEMITHyperParams", "LayerDelta", "MEMITUpdate", "apply_memit_to_model", "execute_memit"]
