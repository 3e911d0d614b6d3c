"""experiments.bench.batching on the tiny model: both timings run, the batched results agree with the
one-at-a-time ones, and the figures land in the JSON."""
from __future__ import annotations

import json

import pytest

from experiments.bench.batching import main


def test_bench_batching_times_both_forms_and_checks_they_agree(tmp_path):
    out = tmp_path / "batching.json"
    result = main(["--model", "tiny", "--batches", "1,3", "--steps", "3", "--scan_edits", "1", "--threads", "1",
                   "--json", str(out)])
    assert json.loads(out.read_text())["zs"] == result["zs"] and result["torch_threads"] == 1
    assert [z["batch"] for z in result["zs"]] == [1, 3] and all(z["passes"] == 3 for z in result["zs"])
    for z in result["zs"]:
        assert z["loop_seconds_per_request"] > 0 and z["batched_seconds_per_request"] > 0
        assert z["max_relative_z_difference"] < 1e-4
    scan = result["scan"]
    assert scan["edits"] == 1 and scan["candidates"] == 3 and scan["same_layers"] is True
    assert scan["max_relative_la_difference"] < 1e-4 and scan["loop_over_batched"] > 0


def test_a_random_model_spec_is_checked():
    with pytest.raises(SystemExit, match="random:"):
        main(["--model", "random:bert:2:64", "--batches", "1", "--scan_edits", "0"])
