"""MEMIT (Meng et al. 2023): mass editing spread over a range of MLP output projections."""
from memit.editor import apply_memit_to_model
from memit.memit_hparams import MEMITHyperParams
from memit.memit_main import LayerDelta, MEMITUpdate, execute_memit

__all__ = ["MEMITHyperParams", "LayerDelta", "MEMITUpdate", "apply_memit_to_model", "execute_memit"]
