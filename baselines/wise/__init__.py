"""WISE (Wang et al., NeurIPS 2024): a routed side memory of one FFN matrix, sharded and merged."""
from baselines.wise.editor import apply_wise_to_model
from baselines.wise.side_memory import SideMemory
from baselines.wise.wise_hparams import WISEHyperParams
from baselines.wise.wise_main import execute_wise

__all__ = ["SideMemory", "WISEHyperParams", "apply_wise_to_model", "execute_wise"]
