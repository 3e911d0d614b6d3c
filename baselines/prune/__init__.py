"""PRUNE (Ma et al., ICLR 2025): the accumulated edit's large singular values log-shrunk before evaluation."""
from baselines.prune.editor import apply_prune_to_model
from baselines.prune.prune_hparams import PRUNEHyperParams
from baselines.prune.prune_main import restrain, restrained_weight

__all__ = ["PRUNEHyperParams", "apply_prune_to_model", "restrain", "restrained_weight"]
