"""RECT and PRUNE, the two post-processings of MEMIT's update: RECT keeps exactly the stated share of
each update's entries, PRUNE's restrained singular values obey the bound, its evaluations see the
restrained model and the edited weights come back after them, and both run under the evaluate CLI."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from baselines.prune import PRUNEHyperParams, apply_prune_to_model, restrain, restrained_weight
from baselines.prune.editor import PRUNEEditor
from baselines.rect import RECTHyperParams, apply_rect_to_model, top_relative_change_mask
from baselines.rect.rect_main import kept_count
from editing.resources import EditResources
from experiments.store.checkpoints import WeightLedger, load_checkpoint
from memit import execute_memit
from memit.editor import MEMITEditor
from util import nethook
from util.architectures import update_to_weight_shape
from util.globals import load_paths
from util.tiny_models import TinyWorld, make_model, make_tokenizer, rank_one_hparams, tiny_records

MEMIT_TINY = {"layers": [1, 2], "mom2_update_weight": 100.0, "context_template_length_params": [[10, 5]]}


def requests(indices=(0, 1, 6, 7)) -> list[dict]:
    records = tiny_records()
    return [dict(records[i]["requested_rewrite"], case_id=records[i]["case_id"]) for i in indices]


def setup(tmp_path: Path, arch: str, alg: str, cls, **kw):
    world = TinyWorld(tmp_path, arch)
    hp = cls.from_json(world.write_hparams(alg, rank_one_hparams(arch, 4, **{**MEMIT_TINY, **kw})))
    return hp, EditResources(load_paths(stats_dir=str(world.stats_dir)), f"tiny-{arch}", progress=False)


# --------------------------------------------------------------------------------------------
# RECT


@pytest.mark.parametrize("shape, percent", [((10, 10), 40), ((7, 13), 40), ((64, 256), 20), ((5, 5), 100), ((3, 3), 1)])
def test_rect_keeps_exactly_the_stated_share_of_largest_relative_change(shape, percent):
    g = torch.Generator().manual_seed(0)
    update, weight = torch.randn(*shape, generator=g, dtype=torch.float64), torch.randn(*shape, generator=g)
    mask = top_relative_change_mask(update, weight, percent, 1e-8)
    n = update.numel()
    assert int(mask.sum()) == kept_count(n, percent) == n - int(n * (100 - percent) / 100)
    change = (update / (weight.double() + 1e-8)).abs()
    if 0 < int(mask.sum()) < n:
        assert float(change[mask].min()) >= float(change[~mask].max())


def test_rect_keeps_exactly_40_percent_even_with_ties():
    """Upstream's kthvalue threshold keeps N - floor(0.6 N) + 1 entries plus every tie; here exactly 40%."""
    mask = top_relative_change_mask(torch.ones(10, 10, dtype=torch.float64), torch.ones(10, 10), 40, 1e-8)
    assert int(mask.sum()) == 40


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_rect_adds_only_the_kept_entries_of_memits_update(tmp_path, arch):
    hp, res = setup(tmp_path, arch, "RECT", RECTHyperParams)
    model, tok = make_model(arch), make_tokenizer()
    update = execute_memit(model, tok, requests(), hp, res)
    before = {d.weight_name: nethook.get_parameter(model, d.weight_name).detach().clone()
              for d in update.deltas.values()}
    apply_rect_to_model(model, tok, requests(), hp, resources=res)
    for delta in update.deltas.values():
        module = nethook.get_module(model, delta.module_name)
        full = update_to_weight_shape(delta.delta_out_in(), module)
        w0, w1 = before[delta.weight_name], module.weight.detach()
        mask = top_relative_change_mask(full, w0, 40.0, 1e-8)
        assert int(mask.sum()) == kept_count(full.numel(), 40)
        assert torch.equal(w1[mask], w0[mask] + full[mask].float()) and torch.equal(w1[~mask], w0[~mask])


# --------------------------------------------------------------------------------------------
# PRUNE


def test_restraint_function_log_shrinks_only_above_sigma_max():
    s = torch.tensor([0.5, 1.0, 2.0, 10.0, 100.0], dtype=torch.float64)
    expected = torch.tensor([0.5, 1.0, 1 + math.log(2), 1 + math.log(10), 1 + math.log(100)], dtype=torch.float64)
    assert torch.allclose(restrain(s, 1.0, math.e), expected)
    assert torch.allclose(restrain(s * 3, 3.0, 2.0)[2:], torch.log2(s[2:]) + 3.0)
    near = torch.tensor([2.0 - 1e-9, 2.0 + 1e-9], dtype=torch.float64)
    assert torch.allclose(restrain(near, 2.0, math.e), near, atol=1e-8)  # continuous at sigma_max


def test_restrained_singular_values_obey_the_bound():
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(20, 30, generator=g, dtype=torch.float64)
    sigma = float(torch.linalg.matrix_norm(w0, ord=2))
    u, _ = torch.linalg.qr(torch.randn(20, 3, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(30, 3, generator=g, dtype=torch.float64))
    s = torch.tensor([5 * sigma, 2 * sigma, 0.5 * sigma], dtype=torch.float64)
    current = w0 + (u * s) @ v.T
    new, n = restrained_weight(current, w0, sigma, math.e)
    assert n == 2
    after = torch.linalg.svdvals(new - w0)[:3]
    expected = torch.tensor([sigma + math.log(5), sigma + math.log(2), 0.5 * sigma], dtype=torch.float64)
    assert torch.allclose(after, expected)
    assert float(torch.linalg.svdvals(new - w0)[3]) < 1e-10  # no new directions
    small = w0 + 0.1 * (u * s) @ v.T  # 0.5 sigma at most: nothing to restrain, the weight is returned as it is
    same, n = restrained_weight(small, w0, sigma, math.e)
    assert n == 0 and same is small


def test_prune_edits_as_memit_restrains_for_evaluation_and_restores_after(tmp_path):
    hp, res = setup(tmp_path, "llama", "PRUNE", PRUNEHyperParams)
    tok = make_tokenizer()
    editor, memit = PRUNEEditor(make_model("llama"), tok, hp, res), MEMITEditor(make_model("llama"), tok, hp, res)
    for e in (editor, memit):
        e.edit(requests())
    names = list(editor.originals)
    edited = {n: nethook.get_parameter(editor.model, n).detach().clone() for n in names}
    assert all(torch.equal(edited[n], nethook.get_parameter(memit.model, n)) for n in names)
    with editor.for_evaluation():
        for n in names:
            before = torch.linalg.svdvals(edited[n].double() - editor.originals[n].double())
            now = torch.linalg.svdvals(nethook.get_parameter(editor.model, n).double() - editor.originals[n].double())
            assert float(before[0]) > editor.sigma_max[n]  # the tiny MEMIT edits are large: something to restrain
            assert torch.allclose(now, restrain(before, editor.sigma_max[n], math.e), rtol=1e-4, atol=1e-5)
    assert all(torch.equal(nethook.get_parameter(editor.model, n), edited[n]) for n in names)
    with pytest.raises(RuntimeError), editor.for_evaluation():
        raise RuntimeError("an evaluation that fails")
    assert all(torch.equal(nethook.get_parameter(editor.model, n), edited[n]) for n in names)

    # apply_prune_to_model is the same edits restrained for good: the model the editor evaluates
    delivered, _ = apply_prune_to_model(make_model("llama"), tok, requests(), hp, resources=res)
    with editor.for_evaluation():
        assert all(torch.equal(nethook.get_parameter(delivered, n), nethook.get_parameter(editor.model, n)) for n in names)


# --------------------------------------------------------------------------------------------
# Both under the evaluate CLI


def run(world: TinyWorld, alg: str, extra: dict) -> Path:
    from experiments.evaluate import main

    hp = world.write_hparams(alg, rank_one_hparams("llama", 4, **{**MEMIT_TINY, "v_num_grad_steps": 10, **extra}))
    return main(world.cli_args(alg, hp, protocol="sequential", num_edits=2, edit_times=2, num_threads=1, dir_name=alg))


def test_rect_and_prune_under_the_sequential_protocol(tmp_path):
    world = TinyWorld(tmp_path, "llama")
    runs = {alg: run(world, alg, extra) for alg, extra in
            (("MEMIT", {}), ("RECT", {"keep_percent": 40}), ("PRUNE", {"log_base": math.e}))}
    batch = {alg: json.loads((d / "batch_1.json").read_text())["edit"] for alg, d in runs.items()}
    assert all(abs(share - 0.4) < 1e-3 for share in batch["RECT"]["kept_share"].values())
    assert batch["RECT"]["update_norm"] < batch["MEMIT"]["update_norm"]
    assert batch["PRUNE"]["update_norm"] == batch["MEMIT"]["update_norm"]  # PRUNE edits as MEMIT does
    weights = {}
    for alg in ("MEMIT", "PRUNE"):  # and its checkpoints hold the unrestrained edits
        model = make_model("llama")
        load_checkpoint(runs[alg] / "weights_checkpoint.safetensors", model, WeightLedger())
        weights[alg] = dict(model.named_parameters())
    assert all(torch.equal(p, weights["MEMIT"][n]) for n, p in weights["PRUNE"].items())
    evaluation = {alg: json.loads((runs[alg] / "evaluation_after_edit_2.json").read_text())["records"] for alg in runs}
    probs = {alg: [r["post"]["rewrite_prompts_probs"] for r in evaluation[alg]] for alg in ("MEMIT", "PRUNE")}
    assert probs["PRUNE"] != probs["MEMIT"]  # but its evaluations saw the restrained model
