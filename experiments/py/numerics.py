"""Numerical checks of a lifelong run: a NaN or inf in an edited weight, a logit or a metric.

A run of 1024 edits must not be poisoned by one NaN: after every edit the weights it changed are
checked, after every evaluation its numbers, and the first non-finite value stops the run with a
``NumericalFault`` naming the step, the stage and the tensors (experiments/run/loop.py records it
in ``failure.json`` and exits with code 3).
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import torch
from torch import nn

from util import nethook


class NumericalFault(RuntimeError):
    """A non-finite value produced by an edit or found by an evaluation."""

    def __init__(self, stage: str, problem: str, details: Optional[dict] = None):
        self.stage, self.problem, self.details = stage, problem, dict(details or {})
        super().__init__(f"{stage}: {problem}")



@torch.no_grad()
def nonfinite_weights(model: nn.Module, names: Sequence[str]) -> dict[str, int]:
    """Number of NaN/inf entries of each named parameter that has any."""
    bad = {}
    for name in names:
        n = int((~torch.isfinite(nethook.get_parameter(model, name))).sum())
        if n:
            bad[name] = n
    return bad


def check_weights(model: nn.Module, names: Sequence[str], stage: str) -> None:
    bad = nonfinite_weights(model, names)
    if bad:
        listing = ", ".join(f"{k} ({v} entries)" for k, v in bad.items())
        raise NumericalFault(stage, f"non-finite values in edited weights: {listing}", {"nonfinite_entries": bad})


def nonfinite_numbers(obj: Any, where: str = "") -> list[str]:
    """JSON-style paths of every NaN/inf float inside nested dicts and lists."""
    if isinstance(obj, float):
        return [] if math.isfinite(obj) else [where or "<value>"]
    if isinstance(obj, dict):
        return [p for k, v in obj.items() for p in nonfinite_numbers(v, f"{where}.{k}" if where else str(k))]
    if isinstance(obj, (list, tuple)):
        return [p for i, v in enumerate(obj) for p in nonfinite_numbers(v, f"{where}[{i}]")]
    return []


def check_metrics(metrics: dict, stage: str = "evaluation") -> None:
    bad = nonfinite_numbers(metrics)
    if bad:
        raise NumericalFault(stage, f"non-finite metrics (NLL of NaN/inf logits): {', '.join(bad[:10])}", {"fields": bad})


def precision_advice(model: nn.Module) -> str:
    """For a fault in a half-precision model, the fix to try first: float32."""
    dtype = next(model.parameters()).dtype
    if dtype not in (torch.float16, torch.bfloat16):
        return ""
    name = str(dtype).replace("torch.", "")
    return (f"; the model runs in {name}, where edits and activations overflow or round away sooner: "
            "rerun with --dtype float32")


def check_logits(logits: torch.Tensor, stage: str) -> None:
    if not bool(torch.isfinite(logits).all()):
        raise NumericalFault(stage, "non-finite logits")
