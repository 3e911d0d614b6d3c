"""NAS, the norm anchor (Liu et al. 2026, arXiv 2602.02543): each solved value vector gets a fixed norm.

Over a long run the vectors v* that locate-then-edit methods write grow in norm, and with them the
updates; NAS rescales each one to r, the mean ||v*|| of the UNEDITED model over seeded rewrites
(``editing/norm_reference.py``). It is a post-processing of the value optimisation's result, applied
at one place per method family (upstream SasyaTitech/NAS 5acab48, ``*/compute_z.py`` and
``baselines/rome/compute_v.py``, with ``util/vstar_stats.py``):

- MEMIT, AlphaEdit, RECT, PRUNE (their z at the last edited block): v0 = the MLP output of that layer
  at the fact token of the first rewriting prompt, v* = v0 + delta (delta = the optimised shift of
  the block output). If ||v*|| > 2r the delta is dropped (v* = v0), else v* <- v* r / (||v*|| + 1e-10);
  then z = (h - v0) + v*, h the block output there. So the residual stream keeps its part; only the
  MLP's share is anchored.
- ROME, r-ROME, WilKE (v* at the rewrite module's output, which is the MLP output): above 5r the edit
  is skipped (the target becomes the current value, so the rank-one update is zero), else v* is
  rescaled to r. Upstream's log line says "> 2x" there too; its code tests 5r.

Either way the direction of v* is unchanged and its norm is r (or the delta is gone).

Every edit of these methods records the norms NAS's probe logs (upstream ``experiments/memit_probe_norms.py``:
``v0_norm``, ``v_star_norm_orig``, with the edited weight's norm), NAS on or off, so a run shows
whether they grow as edits accumulate: ``value_norms`` below.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Optional

import torch
from torch import nn

from editing.value_optimisation import ValueResult
from editing.value_problems import ValueProblem
from util import nethook
from util.placement import as_working

LOG = logging.getLogger(__name__)

SKIP_FACTOR = 2.0  # MEMIT's family: drop the delta when ||v*|| > 2r
ROME_SKIP_FACTOR = 5.0  # ROME's compute_v: skip the edit when ||v*|| > 5r
EPS = 1e-10


def scale_to_norm(x: torch.Tensor, norm: float) -> torch.Tensor:
    """x r / (||x|| + 1e-10), as upstream's ``scale_vector_to_norm`` (x itself for r <= 0 or x ~ 0)."""
    if norm <= 0:
        return x
    denom = x.norm() + EPS
    if denom <= EPS:
        return x
    return x * (float(norm) / denom)


def anchor(v_star: torch.Tensor, fallback: torch.Tensor, reference: float, skip_factor: float) -> tuple[torch.Tensor, bool]:
    """(v* anchored to norm ``reference``, whether it was dropped): ``fallback`` when ||v*|| > skip_factor r."""
    if reference > 0 and float(v_star.norm()) > skip_factor * reference:
        return fallback, True
    return scale_to_norm(v_star, reference), False


@torch.no_grad()
def mlp_output_at_first_prompt(model: nn.Module, problem: ValueProblem, mlp_module: str) -> torch.Tensor:
    """The MLP's output at the fact token of the problem's first prompt (the bare rewriting prompt, with
    the target's leading tokens), on the model as it is: upstream's v0 for the norm anchor."""
    batch = problem.batch
    extra = {} if batch.position_ids is None else {"position_ids": batch.position_ids[:1]}
    with nethook.Trace(model, mlp_module, retain_output=True, stop=True) as trace:
        model(input_ids=batch.input_ids[:1], attention_mask=batch.attention_mask[:1], use_cache=False, **extra)
    out = trace.first_output
    return as_working(out[0, problem.fact_cols[0].to(out.device)].detach())


def value_norms(v0: torch.Tensor, v_star: torch.Tensor, written: torch.Tensor) -> dict[str, float]:
    """||v0|| (the value before the edit), ||v*|| as optimised, and ||v*|| as written (after NAS's anchor;
    the same as optimised when NAS is off): what NAS's probe logs per request."""
    return {"v0": float(v0.norm()), "v_star": float(v_star.norm()), "written": float(written.norm())}


def block_values(
    model: nn.Module, problems: list[ValueProblem], values: list[ValueResult], mlp_module: str,
    reference: Optional[float],
) -> tuple[list[ValueResult], list[dict[str, float]]]:
    """MEMIT's family: each z with its MLP share anchored when ``reference`` is given (NAS), and each
    request's ``value_norms`` of that MLP share (v0 = the MLP's output at the first prompt, on the model
    as it is now; one forward pass per request)."""
    out, norms = [], []
    for problem, value in zip(problems, values):
        v0 = mlp_output_at_first_prompt(model, problem, mlp_module).to(value.delta.device)
        anchored = value if reference is None else anchored_block_value(v0, value, mlp_module, reference)
        out.append(anchored)
        norms.append(value_norms(v0, v0 + value.delta, v0 + anchored.delta))
    return out, norms


def anchored_block_value(v0: torch.Tensor, value: ValueResult, mlp_module: str, reference: float) -> ValueResult:
    """MEMIT's z with its MLP share anchored: z = (h - v0) + anchor(v0 + delta) (the module docstring);
    ``v0`` the MLP's output at the first prompt's fact token (``mlp_output_at_first_prompt``)."""
    v_star, dropped = anchor(v0 + value.delta, v0, reference, SKIP_FACTOR)
    if dropped:
        LOG.info("NAS: ||v*|| %.4f > %g x reference %.4f at %s; the delta is dropped (v* = v0)",
                 float((v0 + value.delta).norm()), SKIP_FACTOR, reference, mlp_module)
    z = (value.v0 - v0) + v_star
    return dataclasses.replace(value, v_star=z, delta=z - value.v0)


def anchored_rome_value(v_star: torch.Tensor, cur_value: torch.Tensor, reference: Optional[float]) -> torch.Tensor:
    """ROME's v* anchored (``reference`` None: NAS off, v* as it is); above 5r the current value, so r = 0."""
    if reference is None:
        return v_star
    anchored, dropped = anchor(v_star, cur_value, reference, ROME_SKIP_FACTOR)
    if dropped:
        LOG.info("NAS: ||v*|| %.4f > %g x reference %.4f; the edit is skipped", float(v_star.norm()),
                 ROME_SKIP_FACTOR, reference)
    return anchored
