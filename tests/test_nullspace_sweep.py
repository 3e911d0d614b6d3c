"""experiments.sweeps.nullspace_sweep: the numbers that choose AlphaEdit's threshold are the projector's."""
from __future__ import annotations

import json

import pytest
import torch

from alphaedit import AlphaEditHyperParams, ProjectorCache
from editing.resources import EditResources
from experiments.sweeps.nullspace_sweep import layer_row, main
from tests.test_alphaedit import alphaedit_dict
from util.globals import load_paths
from util.models import load_model
from util.tiny_models import TinyWorld


def test_layer_row_on_a_known_spectrum():
    d, small = 6, 2
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    c0 = q @ torch.diag(torch.tensor([1e-3] * small + [1.0] * (d - small), dtype=torch.float64)) @ q.T
    keys = torch.stack([3 * q[:, 0], 2 * q[:, 0] + 2 * q[:, 5], q[:, 4]], dim=1)  # null, half-null, preserved
    row = layer_row(c0, keys, [1e-2, 2.0])
    low, everything = row["by_threshold"]["0.01"], row["by_threshold"]["2"]
    assert row["dim"] == d and row["eigenvalue_quantiles"]["0.0"] == pytest.approx(1e-3)
    assert low["kept"] == small and low["share_kept"] == pytest.approx(small / d)
    assert low["energy_in_null_space"] == pytest.approx(small * 1e-3 / (small * 1e-3 + d - small))
    assert low["pk2_median"] == pytest.approx(4.0)  # ‖Pk‖² = 9, 4, 0
    assert low["pk_share_median"] == pytest.approx(0.5)  # shares 1, 1/2, 0
    assert everything["kept"] == d and everything["energy_in_null_space"] == pytest.approx(1.0)


def test_sweep_on_a_tiny_model_agrees_with_the_editors_projector(tmp_path):
    world = TinyWorld(tmp_path, "llama")
    hp_path = world.write_hparams("AlphaEdit", alphaedit_dict("llama"))
    out = tmp_path / "sweep.json"
    main([f"--model_name={world.model_dir}", f"--hparams_fname={hp_path}", f"--ds_name={world.data_file}",
          f"--stats_dir={world.stats_dir}", f"--data_dir={world.root}", "--thresholds=1e-5,1e-4,1e-2",
          "--n_keys=3", f"--out={out}"])
    written = json.loads(out.read_text())
    hp = AlphaEditHyperParams.from_json(hp_path)
    assert [int(k) for k in written["layers"]] == list(hp.layers) and len(written["records"]) == 3

    model, tok = load_model(str(world.model_dir), load_paths(stats_dir=str(world.stats_dir)))
    spaces = ProjectorCache(EditResources(load_paths(stats_dir=str(world.stats_dir)), "tiny-llama", progress=False))
    spaces = spaces.null_spaces(model, tok, hp)
    for layer in hp.layers:
        by = written["layers"][str(layer)]["by_threshold"]
        assert by["0.0001"]["kept"] == spaces[hp.rewrite_module_tmp.format(layer)].dim  # hp's threshold is 1e-4
        kept = [by[t]["kept"] for t in ("1e-05", "0.0001", "0.01")]
        assert kept == sorted(kept) and 0 < kept[1] < written["layers"][str(layer)]["dim"]
        assert all(0.0 <= by[t]["pk_share_median"] <= 1.0 + 1e-9 for t in by)
        assert by["0.01"]["pk_share_median"] == pytest.approx(1.0)  # above every eigenvalue: all of each key
