"""KnowledgeEditor (KE, De Cao et al. 2021), as the MEND code base's ``EFK``/``OneShotLearner``.

A bidirectional LSTM reads the edit sentence (prompt + new target; embeddings initialised from the
edited model's) and its final states give a condition vector c. For each edited weight W (in its own
layout, shape (d0, d1)) a weight-normalised hyper-network maps c to vectors
(col_a, row_a, col_b, row_b, s) and the update is
    Delta W = max_scale * sigmoid(s) * (grad_W * A + B),  A = softmax(row_a)^T col_a,  B = softmax(row_b)^T col_b,
with grad_W the fine-tuning gradient of the edit loss. The edited weight is W + Delta W.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from baselines.efk.efk_hparams import KEHyperParams
from baselines.mend.functional import Factors, InnerParam, to_param_layout


class WeightNormLinear(nn.Module):
    """y = x (g * v / ||v||_row)^T + b: ``torch.nn.utils.weight_norm(nn.Linear)`` with dim=0."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        linear = nn.Linear(in_features, out_features)
        self.weight_v = nn.Parameter(linear.weight.detach().clone())
        self.weight_g = nn.Parameter(linear.weight.detach().norm(dim=1, keepdim=True))
        self.bias = nn.Parameter(linear.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight_g * self.weight_v / self.weight_v.norm(dim=1, keepdim=True)
        return x @ w.T + self.bias


class ConditionedParameter(nn.Module):
    """c -> Delta W for one weight of shape (d0, d1) (a 1-D weight is not supported: KE edits matrices)."""

    def __init__(self, shape: tuple[int, int], condition_dim: int, hidden_dim: int, max_scale: float):
        super().__init__()
        self.shape = tuple(shape)
        self.hidden = WeightNormLinear(condition_dim, hidden_dim)
        self.out = WeightNormLinear(hidden_dim, 2 * (self.shape[0] + self.shape[1]) + 1)
        self.max_scale = max_scale

    def forward(self, condition: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        if condition.shape[0] != 1:
            raise ValueError("KE conditions on one edit at a time")
        d0, d1 = self.shape
        h = self.out(torch.tanh(self.hidden(condition)))
        col_a, row_a, col_b, row_b, scale = h.split([d1, d0, d1, d0, 1], dim=-1)
        a = row_a.softmax(-1).T @ col_a
        b = row_b.softmax(-1).T @ col_b
        return self.max_scale * scale.sigmoid().squeeze() * (grad * a + b)


class SentenceConditioner(nn.Module):
    """Token ids (1, T) -> tanh(W [h_fwd; h_bwd] + b), the final LSTM states of both directions."""

    def __init__(self, vocab_size: int, embedding_dim: int, hidden_dim: int, condition_dim: int,
                 embedding_init: Optional[torch.Tensor] = None):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embedding_dim)
        if embedding_init is not None:
            with torch.no_grad():
                self.embedding.weight[: embedding_init.shape[0]] = embedding_init.float()
        self.lstm = nn.LSTM(embedding_dim, hidden_dim, num_layers=1, bidirectional=True, batch_first=True)
        self.proj = nn.Linear(2 * hidden_dim, condition_dim)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        _, (h_n, _) = self.lstm(self.embedding(input_ids))
        final = torch.cat((h_n[-2], h_n[-1]), dim=-1)  # (batch, 2 * hidden): forward then backward
        return torch.tanh(self.proj(final))


def conditioner_key(name: str) -> str:
    """The reference's ModuleDict key of a weight's hyper-network."""
    return f"{name}_conditioner".replace(".", "_")


class KENetwork(nn.Module):
    kind = "KE"

    def __init__(self, params: Sequence[InnerParam], hparams: KEHyperParams, vocab_size: int,
                 embedding_dim: int, embedding_init: Optional[torch.Tensor] = None):
        super().__init__()
        self.params = list(params)
        self.conditioners = nn.ModuleDict({
            conditioner_key(p.name): ConditionedParameter(
                (p.in_features, p.out_features) if p.transposed else (p.out_features, p.in_features),
                hparams.condition_dim, hparams.hidden_dim, hparams.max_scale,
            )
            for p in self.params
        })
        self.condition = SentenceConditioner(vocab_size, embedding_dim, hparams.hidden_dim, hparams.condition_dim, embedding_init)

    def outer_param_groups(self, hparams: KEHyperParams) -> list[dict]:
        return [{"params": list(self.parameters()), "lr": hparams.lr}]

    def updates(self, factors: dict[str, Factors], condition: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        if condition is None:
            raise ValueError("KE needs the edit sentence's token ids as its condition")
        c = self.condition(condition)
        return {
            p.name: self.conditioners[conditioner_key(p.name)](c, to_param_layout(factors[p.name].gradient(), p).float())
            for p in self.params
        }
