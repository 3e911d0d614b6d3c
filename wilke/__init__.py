"""WilKE (Hu et al. 2024): per-edit wise-layer selection on top of ROME."""
from wilke.editor import apply_wilke_to_model
from wilke.wilke_hparams import WilKEHyperParams
from wilke.wilke_main import WilKEEdit, WilKEResult

__all__ = ["WilKEHyperParams", "WilKEEdit", "WilKEResult", "apply_wilke_to_model"]
