"""experiments.sweeps.solve_sweep: one batch edited with each value of a solve weight (how ENCORE's
alpha is chosen for a model), on a tiny model."""
from __future__ import annotations

import pytest
import torch

import memit.memit_main as memit_main
from experiments.algorithms import get_algorithm
from experiments.sweeps import solve_sweep
from tests.test_encore import setup
from util.tiny_models import make_model, make_tokenizer, tiny_records


def test_z_is_optimised_once_the_update_shrinks_with_alpha_and_the_model_is_restored(tmp_path, monkeypatch):
    hp, res = setup(tmp_path, "gpt2")
    model, tok = make_model("gpt2"), make_tokenizer()
    before = {n: w.clone() for n, w in model.named_parameters()}
    optimised = []
    real = memit_main.optimise_in_batches
    monkeypatch.setattr(memit_main, "optimise_in_batches", lambda m, tasks, *a: optimised.append(len(tasks)) or real(m, tasks, *a))
    records = tiny_records()[:2]
    table = solve_sweep.sweep(model, tok, records, get_algorithm("ENCORE"), hp, "update_norm_lambda", [0.0, 0.1, 1.0],
                              res, tmp_path / "z")
    assert optimised[0] == 2 and sum(optimised) == 2  # the first value's two z's; the others read the cache
    assert all(torch.equal(w, before[n]) for n, w in model.named_parameters())
    norms = [table[v]["relative_update_norm"] for v in ("0", "0.1", "1")]
    assert norms[0] > norms[1] > norms[2] > 0, norms
    assert all(row["n"] == 2 and 0 <= row["ES"] <= 1 for row in table.values())
    # a value's row is what a fresh editor without any cache gives
    fresh = get_algorithm("ENCORE").load_editor_class()(model, tok, hp.replace(update_norm_lambda=1.0), res)
    alone = solve_sweep.edit_and_score(model, tok, records, fresh)
    assert alone["relative_update_norm"] == pytest.approx(table["1"]["relative_update_norm"], rel=1e-5)
    assert alone["ES"] == table["1"]["ES"] and alone["GS"] == table["1"]["GS"]


@pytest.mark.parametrize("alg, field, message", [
    ("ROME", "mom2_update_weight", "not a batch editor"),
    ("ENCORE", "v_lr", "only a weight of the solve"),
    ("ENCORE", "L2", "have no such field"),
])
def test_what_cannot_be_swept_on_cached_values_is_refused_before_the_model_loads(tmp_path, alg, field, message):
    hp, _ = setup(tmp_path, "gpt2")
    with pytest.raises(SystemExit, match=message):
        solve_sweep.check_sweepable(get_algorithm(alg), hp, field)
    with pytest.raises(SystemExit, match="comma-separated numbers"):
        solve_sweep.parse_values("2,x")
