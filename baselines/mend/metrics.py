"""Losses and edit metrics on an EditBatch's read positions (MEND's training objective and validation)."""
from __future__ import annotations

import torch

from baselines.mend.batches import LOC, EditBatch


def kl_loc_loss(pre: torch.Tensor, post: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(p_pre || p_post) of the next-token distributions (MEND's L_loc)."""
    if pre.shape[0] == 0:
        return post.sum() * 0.0
    pre_logp = torch.log_softmax(pre.float(), -1)
    post_logp = torch.log_softmax(post.float(), -1)
    return (pre_logp.exp() * (pre_logp - post_logp)).sum(-1).mean()


def sequences_correct(predicted: torch.Tensor, batch: EditBatch, kind: str) -> list[bool]:
    """Per sequence of ``kind``: greedy decoding (``predicted`` = argmax ids) reproduces every target token."""
    hits = predicted == batch.gold
    return [bool(hits[(batch.seq == s) & batch.is_target].all()) for s in batch.sequences_of(kind)]


def locality_unchanged(pre_ids: torch.Tensor, post_ids: torch.Tensor, batch: EditBatch) -> list[bool]:
    """Per locality sequence: the greedy prediction of every answer token is the same after the edit."""
    same = pre_ids == post_ids
    return [bool(same[(batch.seq == s) & batch.is_target].all()) for s in batch.sequences_of(LOC)]


def mean(values: list) -> float:
    return float(sum(values) / len(values)) if values else float("nan")
