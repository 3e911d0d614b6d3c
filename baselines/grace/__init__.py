"""GRACE (Hartvigsen et al., NeurIPS 2023): a codebook of keys, radii and values at one layer."""
from baselines.grace.codebook import Codebook
from baselines.grace.editor import apply_grace_to_model
from baselines.grace.grace_hparams import GRACEHyperParams
from baselines.grace.grace_main import execute_grace, routing

__all__ = ["Codebook", "GRACEHyperParams", "apply_grace_to_model", "execute_grace", "routing"]
