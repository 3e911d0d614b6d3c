"""ROME (Meng et al. 2022): rank-one model editing of an MLP output projection."""
from rome.editor import apply_rome_to_model
from rome.rome_hparams import ROMEHyperParams
from rome.rome_main import RankOneUpdate, execute_rome

__all__ = ["ROMEHyperParams", "RankOneUpdate", "apply_rome_to_model", "execute_rome"]
