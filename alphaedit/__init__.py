"""AlphaEdit (Fang et al., ICLR 2025): MEMIT's update projected onto the null space of preserved knowledge."""
from alphaedit.alphaedit_hparams import AlphaEditHyperParams
from alphaedit.alphaedit_main import execute_alphaedit
from alphaedit.editor import AlphaEditEditor, apply_alphaedit_to_model
from alphaedit.projection import NullSpace, ProjectorCache
from memit.key_moments import KeyMoments

__all__ = ["AlphaEditEditor", "AlphaEditHyperParams", "KeyMoments", "NullSpace", "ProjectorCache", "apply_alphaedit_to_model",
           "execute_alphaedit"]
