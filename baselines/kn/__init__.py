"""Knowledge Neurons (Dai et al. 2022): integrated-gradient neuron attribution and the value-vector edit."""
from baselines.kn.editor import apply_kn_to_model
from baselines.kn.kn_hparams import KNHyperParams
from baselines.kn.kn_main import KNUpdate, execute_kn

__all__ = ["KNHyperParams", "KNUpdate", "apply_kn_to_model", "execute_kn"]
