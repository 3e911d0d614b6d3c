"""The speed benchmark and the run comparison report true figures about real runs on tiny models."""
import json

import pytest

from experiments.bench import cli as bench
from experiments.evaluate import main as evaluate
from experiments.summary import compare_runs
from util.tiny_models import TinyWorld, rank_one_hparams


def test_bench_on_tiny_reports_same_layers_ratios_and_resumes_agreement(tmp_path, capsys):
    store = tmp_path / "agreement.jsonl"
    out_json = tmp_path / "bench.json"
    args = ["--models", "tiny", "--edits", "1", "--approx_edits", "2", "--stats_samples", "20",
            "--agreement_file", str(store), "--json", str(out_json)]
    (r,) = bench.main(args)
    assert r["same_layers"] is True and r["max_relative_update_difference"] < 1e-4
    assert r["stats_reference"]["corpus_passes"] == r["candidate_layers"] and r["stats_fast"]["corpus_passes"] == 1
    assert r["ratios"]["stats_forward_token_ratio"] == pytest.approx(r["candidate_layers"])
    agreement = r["approximate_agreement"]
    assert agreement["edits"] == 2 and agreement["reused_from_file"] == 0
    by_case = {l["case_id"]: l for l in map(json.loads, store.read_text().splitlines())}  # the last line wins
    assert len(by_case) == 2 and all(0 <= l["exact_layer"] < r["candidate_layers"] for l in by_case.values())
    # the real approximate scans chose what was read off the exact scans
    assert agreement["approx_runs_matching_read_off"] == "2/2"
    assert agreement["agreement"] == sum(l["exact_layer"] == l["approx_layer"] for l in by_case.values()) / 2
    assert set(agreement["agreement_by_setting"]) >= {"1x1", "2x2", "8x3"}
    for l in by_case.values():
        la = {int(k): v for k, v in l["la"].items()}
        assert l["exact_layer"] == min(la, key=la.get)
    assert json.loads(out_json.read_text())["results"][0]["model"] == "tiny"
    printed = capsys.readouterr().out
    assert "WilKE fast s/edit" in printed and "tiny" in printed.splitlines()[-1]

    # a stopped measurement resumes: measured edits are read back, a line cut short is ignored
    with open(store, "a") as f:
        f.write('{"case_id": 99, "exact_la')
    # shard 0 of 2 measures edits 0 and 2 (0 is on file) and reports edit 1 from the file too
    (again,) = bench.main(["--models", "tiny", "--approx_edits", "3", "--parts", "agreement",
                           "--agreement_file", str(store), "--agreement_shard", "0/2"])
    assert again["approximate_agreement"]["reused_from_file"] == 1
    assert again["approximate_agreement"]["edits"] == 3
    assert "wilke_fast" not in again and "stats_fast" not in again


def test_bench_rejects_unknown_parts():
    with pytest.raises(SystemExit):
        bench.parse_args(["--parts", "stats,speed"])


def test_compare_runs_of_fast_and_reference_evaluations(tmp_path, capsys):
    world = TinyWorld(tmp_path, "llama")
    hp = world.write_hparams("WilKE", {**rank_one_hparams("llama", 4), "scanning_ceiling": 3})
    runs = {
        impl: evaluate(world.cli_args("WilKE", hp, dataset_size_limit=6, edit_times=2, implementation=impl, dir_name=impl))
        for impl in ("fast", "reference")
    }
    result = compare_runs.compare(runs["fast"], runs["reference"])
    assert result["edits_compared"] == 2 and result["same_layers"] is True
    assert result["max_la_relative_difference"] < 1e-4
    assert result["seconds_per_edit_a"] > 0 and result["b_over_a"] > 0
    edits = sorted(runs["fast"].glob("edit_*_on_case_*.json"), key=lambda p: int(p.name.split("_")[1]))
    assert result["layers_a"] == [json.loads(p.read_text())["edit"]["layer"] for p in edits]
    la = sorted(json.loads(edits[0].read_text())["edit"]["layer_adaptability"].values())
    assert result["per_edit"][0]["margin_a"] == pytest.approx((la[1] - la[0]) / la[0])
    assert result["min_margin_a"] == min(r["margin_a"] for r in result["per_edit"])
    assert compare_runs.main([str(runs["fast"]), str(runs["reference"])]) == 0
    assert "same layers: True" in capsys.readouterr().out

    # a run of another edit stream is refused with a message naming both runs
    other = evaluate(world.cli_args("WilKE", hp, dataset_size_limit=6, edit_times=1, seed=1, dir_name="other"))
    with pytest.raises(compare_runs.RunFolderError, match="same edit stream"):
        compare_runs.compare(runs["fast"], other)
    # the bench can edit the records a run edited, in the run's order
    records = bench.bench_records(2, runs["fast"])
    assert [r["case_id"] for r in records] == json.loads((runs["fast"] / "run.json").read_text())["edit_stream_case_ids"][:2]
