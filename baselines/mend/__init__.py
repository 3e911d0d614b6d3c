"""MEND (Mitchell et al. 2022) and the machinery shared with KE (baselines/efk): trained editors
that map fine-tuning gradient factors of chosen MLP weights to weight updates.

- ``python -m baselines.mend.train --editor MEND|KE --model_name M --ds_name zsre|counterfact``
- ``MendRewriteExecutor().apply_to_model(model, tok, request, hparams)`` (ROME's API)
- ``experiments.evaluate --alg_name MEND`` through ``baselines.mend.editor.MENDEditor``
"""
from baselines.mend.editor import apply_mend_to_model
from baselines.mend.executor import EditorExecutor, MendRewriteExecutor
from baselines.mend.mend_hparams import MENDHyperParams

__all__ = ["apply_mend_to_model", "EditorExecutor", "MENDHyperParams", "MendRewriteExecutor"]
