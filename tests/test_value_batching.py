"""Batched value optimisation (editing/value_optimisation.py) gives each task the one-at-a-time loop's
result: the same passes and the same z / v* within float rounding, on tiny GPT-2, GPT-J and Llama.

Covered: requests of mixed prompt lengths injected at a block output (MEMIT's z), with a per-task
clamp that binds for one of them and an early-stop threshold at which half of them stop early (so the
batch is also rebuilt from the tasks still running); WilKE's candidates at different layers of one
request (each row group entering the forward pass at its own block) under every forward strategy;
WilKE's exact and approximate scans end to end; a batch that runs out of memory, split in halves.
MEMIT's batched z's against the upstream code's numbers are in tests/test_upstream_parity.py.
"""
from __future__ import annotations

import logging

import pytest
import torch

import editing.value_optimisation as vo
from editing.forward import FullForward, SuffixForward
from editing.forward_prefix import PrefixCachedForward
from editing.requests import normalise_request
from editing.resources import EditResources
from editing.value_optimisation import (
    ValueTask,
    build_value_problem,
    optimise_in_batches,
    optimise_values,
    stack_tasks,
    stacked_forward,
    token_batches,
)
from rome import ROMEHyperParams
from util.globals import load_paths
from util.tiny_models import make_model, make_tokenizer, rank_one_hparams, tiny_records
from wilke import WilKEHyperParams
from wilke.wilke_main import choose_layer

CPU = torch.device("cpu")
TEMPLATES = ["{}", "A short one. {}", "Here is a rather longer context sentence. {}"]
# subjects at the start and in the middle of prompts of different lengths; targets of one to five tokens
RECORDS = (0, 1, 2, 3, 8, 9)


def requests() -> list[dict]:
    records = tiny_records()
    return [normalise_request(dict(records[i]["requested_rewrite"], case_id=records[i]["case_id"])) for i in RECORDS]


def hparams(arch: str, **kw) -> ROMEHyperParams:
    base = dict(fact_token="subject_last", v_num_grad_steps=10, v_early_stop_loss=0.0)
    return ROMEHyperParams.from_dict(rank_one_hparams(arch, 4, **{**base, **kw}))


def one_at_a_time(model, tasks, hp) -> list:
    """The loop: each task optimised alone, with its own verified forward."""
    return [optimise_values(model, [t], stacked_forward(model, stack_tasks([t]), hp, {}), hp)[0] for t in tasks]


def stopping_threshold(trajectories: list[list[float]]) -> float:
    """An early-stop loss at which at least half of the tasks stop before their last pass while at least
    one never stops, away from every observed loss (so rounding cannot move a stop)."""
    n = len(trajectories[0])
    observed = sorted({x for t in trajectories for x in t})
    for a, b in zip(observed, observed[1:]):
        if b - a < 1e-3 * b:
            continue
        t = (a + b) / 2
        stops = [next((i for i, x in enumerate(tr) if x < t), None) for tr in trajectories]
        early = [s for s in stops if s is not None and s < n - 1]
        if 2 * len(early) >= len(trajectories) and None in stops:
            return t
    raise AssertionError(f"no threshold splits these trajectories: {trajectories}")


def assert_same(batched, loop, rel: float = 1e-5) -> None:
    for b, l in zip(batched, loop):
        assert b.steps == l.steps and len(b.deltas) == l.steps
        assert torch.allclose(b.v0, l.v0, rtol=1e-6, atol=1e-6)
        assert float((b.v_star - l.v_star).norm() / l.v_star.norm()) < rel
        assert float((b.delta - l.delta).norm()) <= rel * max(float(l.delta.norm()), 1e-6)
        assert b.losses == pytest.approx(l.losses, rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("implementation", ["fast", "reference"])
@pytest.mark.parametrize("arch", ["gpt2", "gptj", "llama"])
def test_batched_z_optimisation_equals_the_loop(arch, implementation, monkeypatch):
    model, tok = make_model(arch), make_tokenizer()
    hp = hparams(arch, implementation=implementation)
    block = hp.layer_module_tmp.format(2)
    clamps = [0.3 if i % 2 == 0 else 1000.0 for i in range(len(RECORDS))]
    tasks = [ValueTask(build_value_problem(tok, r, TEMPLATES, hp.fact_token, CPU), block, 2, c)
             for r, c in zip(requests(), clamps)]
    assert len({t.problem.batch.input_ids.shape[1] for t in tasks}) > 1, "the prompts should differ in length"
    hp = hp.replace(v_early_stop_loss=stopping_threshold([r.losses for r in one_at_a_time(model, tasks, hp)]))
    loop = one_at_a_time(model, tasks, hp)
    builds = []
    monkeypatch.setattr(vo, "stacked_forward", lambda *a: builds.append(a[1].n_rows) or stacked_forward(*a))
    batched = optimise_in_batches(model, tasks, hp, {}, batch_tokens=10**6)
    steps = [r.steps for r in loop]
    assert min(steps) < hp.v_num_grad_steps and max(steps) == hp.v_num_grad_steps, steps
    assert len(builds) >= 2 and builds[-1] <= builds[0] // 2, "the batch was never rebuilt from the running tasks"
    assert_same(batched, loop)
    # each task has its own clamp: after a step (lr 0.5) ||delta|| is far above 0.3 ||v0||, so it binds
    moved = [(r, c) for r, c in zip(batched, clamps) if r.steps > 1]
    assert {c for _, c in moved} == {0.3, 1000.0}
    for r, c in moved:
        ratio = float(r.delta.norm() / r.v0.norm())
        assert ratio == pytest.approx(0.3, rel=1e-5) if c == 0.3 else ratio > 0.3


def strategy(kind: str, model, hp, batch, anchor_cols, first_block: int):
    names = [hp.layer_module_tmp.format(i) for i in range(4)]
    if kind == "prefix":
        assert PrefixCachedForward.applicable(model, batch, anchor_cols, names[first_block:]) is None
        return PrefixCachedForward(model, batch, anchor_cols, names, hp.v_loss_layer, hp.ln_f_module, first_block)
    if kind == "suffix":
        return SuffixForward(model, batch, names, hp.v_loss_layer, hp.ln_f_module, first_block)
    return FullForward(model, batch, hp.layer_module_tmp.format(hp.v_loss_layer), hp.ln_f_module)


@pytest.mark.parametrize("tiled", [False, True], ids=["stacked", "tiled"])
@pytest.mark.parametrize("kind", ["prefix", "suffix", "full"])
@pytest.mark.parametrize("arch", ["gpt2", "gptj", "llama"])
def test_candidates_at_different_layers_equal_the_per_candidate_loop(arch, kind, tiled):
    """WilKE's scan as one batch: each candidate's rows enter at its own layer with its own delta; the
    strategy built on the stacked prompts, or built once on the request's and tiled (as the scan does)."""
    model, tok = make_model(arch), make_tokenizer()
    hp = hparams(arch, v_num_grad_steps=6)
    problem = build_value_problem(tok, requests()[1], TEMPLATES, hp.fact_token, CPU)
    tasks = [ValueTask(problem, hp.rewrite_module_tmp.format(l), l, hp.clamp_norm_factor) for l in (0, 1, 2)]
    stacked = stack_tasks(tasks)
    assert stacked.entries.blocks == (0, 1, 2) and stacked.n_rows == 3 * problem.batch.input_ids.shape[0]
    if tiled:
        forward = strategy(kind, model, hp, problem.batch, problem.fact_cols, 0).tiled(len(tasks))
    else:
        forward = strategy(kind, model, hp, stacked.batch, stacked.fact_cols, 0)
    batched = optimise_values(model, tasks, forward, hp)
    loop = [optimise_values(model, [t], strategy(kind, model, hp, problem.batch, problem.fact_cols, t.start_block), hp)[0]
            for t in tasks]
    assert_same(batched, loop)
    assert len({round(float(r.delta.norm()), 4) for r in batched}) == 3, "the candidates should differ"


@pytest.mark.parametrize("scan", ["exact", "approximate"])
def test_wilke_scan_batched_equals_the_per_candidate_loop(scan, monkeypatch):
    """Same LA for every candidate (float rounding) and the same chosen layer as candidates one by one;
    either way a scan captures block inputs once (twice for the approximate scan's two rounds)."""
    model, tok = make_model("llama", n_layer=6), make_tokenizer()
    base = rank_one_hparams("llama", 6, mom2_adjustment=False, v_num_grad_steps=8)
    hp = WilKEHyperParams.from_dict({**base, "scanning_ceiling": 5, "scan": scan, "approx_grad_steps": 3})
    res = EditResources(load_paths(), "t", progress=False)
    builds = []
    monkeypatch.setattr(vo, "stacked_forward", lambda *a: builds.append(a[1].entries.blocks) or stacked_forward(*a))
    for request in requests()[:2]:
        chosen, la = choose_layer(model, tok, request, hp, res)
        chosen_loop, la_loop = choose_layer(model, tok, request, hp.replace(v_batch_tokens=0), res)
        assert len(builds) == (2 if scan == "exact" else 4), builds
        builds.clear()
        assert chosen.layer == chosen_loop.layer and la.keys() == la_loop.keys() == set(range(5))
        for layer in la:
            assert la[layer] == pytest.approx(la_loop[layer], rel=1e-4)
        assert float((chosen.r - chosen_loop.r).norm() / chosen_loop.r.norm()) < 1e-4


def test_a_batch_out_of_memory_is_split_in_halves(monkeypatch, caplog):
    model, tok = make_model("llama"), make_tokenizer()
    hp = hparams("llama", v_num_grad_steps=4)
    block = hp.layer_module_tmp.format(2)
    tasks = [ValueTask(build_value_problem(tok, r, TEMPLATES, hp.fact_token, CPU), block, 2, 1000.0) for r in requests()[:5]]
    sizes = []

    def small_memory(model, tasks, *args, **kwargs):
        sizes.append(len(tasks))
        if len(tasks) > 2:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return optimise_values(model, tasks, *args, **kwargs)

    monkeypatch.setattr(vo, "optimise_values", small_memory)
    with caplog.at_level(logging.WARNING, logger="editing.value_optimisation"):
        batched = optimise_in_batches(model, tasks, hp, {}, batch_tokens=10**6)
    assert sizes == [5, 3, 2, 1, 2]
    assert sum("out of memory optimising" in r.getMessage() for r in caplog.records) == 2
    assert_same(batched, one_at_a_time(model, tasks, hp))
    def no_memory(*_args, **_kwargs):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(vo, "optimise_values", no_memory)
    with pytest.raises(RuntimeError, match="out of memory"):
        optimise_in_batches(model, tasks[:1], hp, {}, batch_tokens=10**6)


def test_token_budget_groups_consecutive_tasks():
    tok = make_tokenizer()
    problems = [build_value_problem(tok, r, TEMPLATES, "subject_last", CPU) for r in requests()]
    tasks = [ValueTask(p, "m", 0, 1.0) for p in problems]
    assert token_batches(tasks, 0) == [[i] for i in range(len(tasks))]
    assert token_batches(tasks, 10**6) == [list(range(len(tasks)))]
    budget = 2 * max(t.padded_tokens for t in tasks)
    groups = token_batches(tasks, budget)
    assert [i for g in groups for i in g] == list(range(len(tasks))) and 1 < len(groups) < len(tasks)
    for group in groups:
        if len(group) > 1:
            assert stack_tasks([tasks[i] for i in group]).batch.input_ids.numel() <= budget


def test_tasks_must_come_in_order_of_start_block():
    tok = make_tokenizer()
    problem = build_value_problem(tok, requests()[0], TEMPLATES, "subject_last", CPU)
    with pytest.raises(ValueError, match="increasing order"):
        stack_tasks([ValueTask(problem, "b", 2, 1.0), ValueTask(problem, "a", 1, 1.0)])
