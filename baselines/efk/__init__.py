"""KE (KnowledgeEditor, De Cao et al. 2021; 'efk' in the MEND code base). Training, checkpoints and
the edit pass are shared with MEND (baselines/mend): ``python -m baselines.mend.train --editor KE``."""
from baselines.efk.editor import apply_ke_to_model
from baselines.efk.efk_hparams import KEHyperParams
from baselines.efk.efk_main import EfkRewriteExecutor

__all__ = ["apply_ke_to_model", "EfkRewriteExecutor", "KEHyperParams"]
