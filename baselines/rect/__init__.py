"""RECT (Gu et al. 2024): MEMIT's update with only the entries of largest relative change kept."""
from baselines.rect.editor import apply_rect_to_model
from baselines.rect.rect_hparams import RECTHyperParams
from baselines.rect.rect_main import top_relative_change_mask

__all__ = ["RECTHyperParams", "apply_rect_to_model", "top_relative_change_mask"]
