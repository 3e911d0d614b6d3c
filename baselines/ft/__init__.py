"""Fine-tuning baselines: FT (unconstrained) and FT-L (entries kept near their original values)."""
from baselines.ft.editor import apply_ft_to_model
from baselines.ft.ft_hparams import FTHyperParams
from baselines.ft.ft_main import FTUpdate, execute_ft

__all__ = ["FTHyperParams", "FTUpdate", "apply_ft_to_model", "execute_ft"]
