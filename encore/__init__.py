"""ENCORE (Gupta et al. 2025): MEMIT with most-probable early stopping and a Frobenius-norm penalty."""
from encore.editor import ENCOREEditor, apply_encore_to_model
from encore.encore_hparams import ENCOREHyperParams
from encore.encore_main import encore_key_solver, execute_encore

__all__ = ["ENCOREEditor", "ENCOREHyperParams", "apply_encore_to_model", "encore_key_solver", "execute_encore"]
