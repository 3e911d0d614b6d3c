"""UltraEdit (Gu et al., TMLR 2026): training-, subject- and memory-free lifelong editing."""
from ultraedit.editor import UltraEditEditor
from ultraedit.normaliser import NormaliserBank, RunningNormaliser
from ultraedit.ultraedit_hparams import UltraEditHyperParams
from ultraedit.ultraedit_main import apply_ultraedit_to_model
from ultraedit.update import UltraEditUpdate, add_shifts, execute_ultraedit

__all__ = ["NormaliserBank", "RunningNormaliser", "UltraEditEditor", "UltraEditHyperParams", "UltraEditUpdate",
           "add_shifts", "apply_ultraedit_to_model", "execute_ultraedit"]
