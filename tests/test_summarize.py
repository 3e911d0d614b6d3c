"""Summaries of lifelong runs: the CLI's table against a direct computation from the run files,
bad run folders reported and skipped, the PNGs, and the notebook executed headless.

The results folder is made once per module by real tiny-model runs (ROME and WilKE, two runs each
with different shuffle seeds, 4 edits so the retention checkpoints are 1, 2 and 4).
"""
from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from experiments.summary import doc_tables
from util.tiny_models import TinyWorld, rank_one_hparams

REPO = Path(__file__).resolve().parent.parent
NOTEBOOK = REPO / "notebooks" / "summarize.ipynb"
ALGORITHMS = {"ROME": {"v_num_grad_steps": 15}, "WilKE": {"v_num_grad_steps": 15, "scanning_ceiling": 3}}
SEEDS = (1, 2)
EDITS = 4
CHECKPOINTS = (1, 2, 4)
COMPONENTS = ("ES", "GS", "LS", "ERS", "ORS")


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    """results/<alg>/run_00{0,1} from experiments.evaluate on a tiny GPT-2."""
    import torch

    from experiments.evaluate import main

    world = TinyWorld(tmp_path_factory.mktemp("summary_world"), "gpt2")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is faster, and robust to a busy machine
    try:
        for alg, extra in ALGORITHMS.items():
            hparams = world.write_hparams(alg, rank_one_hparams("gpt2", 4, **extra))
            for seed in SEEDS:
                main(world.cli_args(alg, hparams, dataset_size_limit=10, edit_times=EDITS, seed=seed))
    finally:
        torch.set_num_threads(threads)
    return world.results_dir


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "experiments.summarize", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env=env)


@pytest.fixture(scope="module")
def cli(results, tmp_path_factory):
    """One CLI call with tables and plots: (process, csv path, json data, plots folder)."""
    out = tmp_path_factory.mktemp("summary_out")
    proc = run_cli("--dir_name", "ROME,WilKE", "--results_dir", str(results), "--checkpoints", "1,2,4",
                   "--out", str(out / "table.csv"), "--plots", str(out / "plots"))
    assert proc.returncode == 0, proc.stderr
    return proc, out / "table.csv", json.loads((out / "table.json").read_text()), out / "plots"


# ------------------------------------------------------------------------------------------------
# The reference computation, written straight from the metric definitions (experiments/summary/metrics.py's docstring, the WilKE paper's notebooks) against the raw JSON files.


def direct_scores(run_dir: Path, n: int) -> dict[str, float]:
    posts = {}
    for f in run_dir.glob("edit_*_on_case_*.json"):
        record = json.loads(f.read_text())
        posts[record["edit_index"]] = record["post"]
    first = [posts[i] for i in range(1, n + 1)]

    def correct(kind):
        return float(np.mean([np.mean(p[f"{kind}_prompts_correct"]) for p in first]))

    def prob(kind, new_wins):
        per_edit = [np.mean([(q["target_new"] < q["target_true"]) if new_wins else (q["target_true"] < q["target_new"])
                             for q in p[f"{kind}_prompts_probs"]]) for p in first]
        return float(np.mean(per_edit))

    retention = json.loads((run_dir / f"retention_of_edit_{n}.json").read_text())
    unchanged = [json.loads((run_dir / f"locality_of_edit_{i}.json").read_text())["post"] for i in range(1, n + 1)]
    scores = {"ES": correct("rewrite"), "GS": correct("paraphrase"), "LS": correct("neighborhood"),
              "LU": float(np.mean([np.mean(u["neighborhood_prompts_unchanged"]) for u in unchanged])),
              "ERS": retention["edit_retention"] / n, "ORS": retention["orig_retention"] / retention["orig_retention_len"],
              "efficacy_score": prob("rewrite", True), "paraphrase_score": prob("paraphrase", True),
              "neighborhood_score": prob("neighborhood", False)}
    scores["S"] = 5 / sum(1 / (scores[c] if scores[c] != 0 else 1e-4) for c in COMPONENTS)
    return scores


def expected_rows(results: Path) -> dict[tuple[str, int], dict[str, float]]:
    out = {}
    for alg in ALGORITHMS:
        for n in CHECKPOINTS:
            per_run = [direct_scores(results / alg / f"run_{i:03d}", n) for i in range(len(SEEDS))]
            out[alg, n] = {f"{m}_{stat}": float(getattr(np, stat)([s[m] for s in per_run]))
                           for m in per_run[0] for stat in ("mean", "std")}
    return out


def assert_rows_match(rows: list[dict], expected: dict, n_runs: int = len(SEEDS)) -> None:
    assert {(r["algorithm"], r["checkpoint"]) for r in rows} == set(expected)
    for row in rows:
        assert row["n_runs"] == n_runs
        for key, value in expected[row["algorithm"], row["checkpoint"]].items():
            assert row[key] == pytest.approx(value, abs=1e-12), (row["algorithm"], row["checkpoint"], key)


# ------------------------------------------------------------------------------------------------


def test_results_folder_is_real(results):
    """The fixture's runs are what the summary expects: finished, 4 edits, WilKE with a layer scan."""
    for alg in ALGORITHMS:
        for i in range(len(SEEDS)):
            run = results / alg / f"run_{i:03d}"
            assert len(list(run.glob("edit_*_on_case_*.json"))) == EDITS
            assert sorted(int(p.stem.rsplit("_", 1)[1]) for p in run.glob("retention_of_edit_*.json")) == list(CHECKPOINTS)
    edit = json.loads(next((results / "WilKE" / "run_000").glob("edit_1_*.json")).read_text())["edit"]
    assert len(edit["layer_adaptability"]) == 3 and edit["update_norm"] > 0


def test_cli_table_matches_direct_computation(results, cli):
    proc, csv_path, table, _ = cli
    expected = expected_rows(results)
    assert_rows_match(table["rows"], expected)
    assert table["skipped"] == [] and table["notes"] == []
    # the CSV holds the same numbers
    with open(csv_path) as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == len(table["rows"])
    for c, j in zip(csv_rows, table["rows"]):
        assert c["algorithm"] == j["algorithm"] and int(c["checkpoint"]) == j["checkpoint"]
        assert float(c["S_mean"]) == pytest.approx(j["S_mean"]) and float(c["ES_std"]) == pytest.approx(j["ES_std"])
    # the printed table: one line per (algorithm, checkpoint), cells mean±std
    lines = proc.stdout.splitlines()
    assert lines[0].split()[:4] == ["algorithm", "n", "runs", "ES"]
    row = next(l for l in lines if l.startswith("WilKE") and l.split()[1] == "4")
    es = expected["WilKE", 4]
    assert f"{es['ES_mean']:.3f}±{es['ES_std']:.3f}" in row
    # generation scores are absent from these runs (--skip_generation_tests), so not in the table
    assert "fluency" not in table["metrics"] and "fluency_mean" not in csv_rows[0]


def test_markdown_table_holds_the_same_numbers(results, tmp_path):
    proc = run_cli("--dir_name", "ROME,WilKE", "--results_dir", str(results), "--out", str(tmp_path / "t.csv"),
                   "--checkpoints", "4", "--markdown", "--metrics", "ES,S")
    assert proc.returncode == 0, proc.stderr
    lines = [l for l in proc.stdout.splitlines() if l.startswith("|")]
    assert lines[0] == "| algorithm | after n edits | runs | ES | S |" and lines[1] == "|---|---|---|---|---|"
    expected = expected_rows(results)
    for line, alg in zip(lines[2:], ("ROME", "WilKE")):
        want = expected[alg, 4]
        assert line == (f"| {alg} | 4 | {len(SEEDS)} | {want['ES_mean']:.3f} ± {want['ES_std']:.3f} | "
                        f"{want['S_mean']:.3f} ± {want['S_std']:.3f} |")
    bad = run_cli("--dir_name", "ROME", "--results_dir", str(results), "--out", str(tmp_path / "u.csv"),
                  "--markdown", "--metrics", "ES,fluency")
    assert bad.returncode == 2 and "fluency not in these runs" in bad.stderr


def _is_informative_png(path: Path) -> bool:
    from matplotlib import image

    pixels = image.imread(path)  # RGBA floats in [0, 1]
    assert pixels.ndim == 3 and pixels.shape[-1] == 4
    colours = np.unique(np.ascontiguousarray((pixels * 255).round().astype(np.uint8)).view(np.uint32))
    return path.stat().st_size > 5000 and pixels.shape[0] > 100 and pixels.shape[1] > 100 and len(colours) > 20


def test_cli_writes_informative_pngs(cli):
    proc, _, _, plots = cli
    names = {"scores.png", "rome_scores.png", "update_norms.png", "norm_growth.png", "WilKE_layer_histogram.png",
             "WilKE_la_heatmap.png"}
    assert {p.name for p in plots.glob("*.png")} == names, proc.stdout
    assert all(_is_informative_png(plots / n) for n in names)
    assert not any(p.name.startswith(".") for p in plots.iterdir())  # no temporary files left behind


def _copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_bad_run_folders_are_reported_and_skipped(results, tmp_path, capsys):
    from experiments.summarize import main

    root = tmp_path / "results"
    shutil.copytree(results, root)
    corrupt = _copy_run(root / "WilKE" / "run_000", root / "WilKE" / "run_002")
    next(corrupt.glob("edit_2_*.json")).write_text('{"case_id": 1, "post": {')  # cut off mid-write
    no_retention = _copy_run(root / "WilKE" / "run_001", root / "WilKE" / "run_003")
    (no_retention / "retention_of_edit_2.json").unlink()
    gap = _copy_run(root / "ROME" / "run_000", root / "ROME" / "run_002")
    next(gap.glob("edit_3_*.json")).unlink()
    bad_count = _copy_run(root / "ROME" / "run_001", root / "ROME" / "run_003")
    (bad_count / "retention_of_edit_4.json").write_text(json.dumps({"edit_retention": "x"}))
    (root / "ROME" / "run_004").mkdir()  # created, then the run died before writing anything

    assert main(["--dir_name", "ROME,WilKE", "--results_dir", str(root), "--out", str(tmp_path / "t.csv")]) == 0
    out = capsys.readouterr().out
    table = json.loads((tmp_path / "t.json").read_text())
    reasons = {Path(s["path"]).relative_to(root).as_posix(): s["reason"] for s in table["skipped"]}
    assert set(reasons) == {"WilKE/run_002", "WilKE/run_003", "ROME/run_002", "ROME/run_003", "ROME/run_004"}
    assert "unreadable JSON" in reasons["WilKE/run_002"] and "edit_2_on_case" in reasons["WilKE/run_002"]
    assert "retention_of_edit_2.json" in reasons["WilKE/run_003"]
    assert "missing edit files for edit(s) 3" in reasons["ROME/run_002"]
    assert "edit_retention" in reasons["ROME/run_003"]
    assert "no edit_" in reasons["ROME/run_004"]
    for name, reason in reasons.items():
        assert name.split("/")[1] in out and reason in out
    assert_rows_match(table["rows"], expected_rows(results))  # the good runs alone, unchanged


def test_unfinished_runs_are_skipped_or_counted_as_partial(results, tmp_path, capsys):
    from experiments.summarize import main

    root = tmp_path / "results"
    shutil.copytree(results / "WilKE", root / "WilKE")
    partial = _copy_run(root / "WilKE" / "run_000", root / "WilKE" / "run_002")
    next(partial.glob("edit_4_*.json")).unlink()
    (partial / "retention_of_edit_4.json").unlink()
    meta = json.loads((partial / "run.json").read_text())
    (partial / "run.json").write_text(json.dumps({**meta, "status": "interrupted"}))

    assert main(["--results_dir", str(root), "--out", str(tmp_path / "strict.csv")]) == 0
    strict = json.loads((tmp_path / "strict.json").read_text())
    assert "interrupted" in strict["skipped"][0]["reason"] and "--include_partial" in strict["skipped"][0]["reason"]
    assert [r["n_runs"] for r in strict["rows"]] == [2, 2, 2]

    assert main(["--results_dir", str(root), "--include_partial", "--out", str(tmp_path / "partial.csv")]) == 0
    loose = json.loads((tmp_path / "partial.json").read_text())
    assert loose["skipped"] == []
    assert [(r["checkpoint"], r["n_runs"]) for r in loose["rows"]] == [(1, 3), (2, 3), (4, 2)]
    assert any("run_002" in note and "checkpoint 4" in note for note in loose["notes"])
    assert "note:" in capsys.readouterr().out


def test_runs_and_checkpoints_select_the_rows(results, tmp_path):
    from experiments.summarize import main

    assert main(["--dir_name", "WilKE", "--runs", "run_001", "--checkpoints", "2",
                 "--results_dir", str(results), "--out", str(tmp_path / "one.json")]) == 0
    (row,) = json.loads((tmp_path / "one.json").read_text())["rows"]
    direct = direct_scores(results / "WilKE" / "run_001", 2)
    assert row["n_runs"] == 1 and row["runs"] == "run_001" and row["S_std"] == 0
    assert row["S_mean"] == pytest.approx(direct["S"]) and row["ERS_mean"] == pytest.approx(direct["ERS"])
    assert (tmp_path / "one.csv").is_file()

    assert main(["--dir_name", "WilKE", "--checkpoints", "2,3", "--results_dir", str(results),
                 "--out", str(tmp_path / "three.json")]) == 0
    three = json.loads((tmp_path / "three.json").read_text())
    assert [(r["checkpoint"], r["n_runs"]) for r in three["rows"]] == [(2, 2)]  # no run has checkpoint 3: no row
    assert sum("no checkpoint 3" in note for note in three["notes"]) == 2


def _seed_of(run_dir: Path) -> int:
    return json.loads((run_dir / "run.json").read_text())["seed"]


def test_paired_differences_are_per_seed_differences_of_the_direct_scores(results):
    from experiments.summary.metrics import summarize
    from experiments.summary.paired import paired_differences
    from experiments.summary.runs import load_runs

    summary = summarize(load_runs(results, ["ROME", "WilKE"], None, False), CHECKPOINTS)
    rows, notes = paired_differences(summary, "ROME")
    assert notes == [] and [(r.algorithm, r.baseline, r.checkpoint) for r in rows] == [("WilKE", "ROME", n) for n in CHECKPOINTS]
    runs = {alg: {_seed_of(d): d for d in sorted((results / alg).glob("run_*"))} for alg in ALGORITHMS}
    assert set(runs["ROME"]) == set(runs["WilKE"]) == set(SEEDS)
    for row in rows:
        assert row.seeds == SEEDS
        diffs = {m: np.array([direct_scores(runs["WilKE"][s], row.checkpoint)[m] - direct_scores(runs["ROME"][s], row.checkpoint)[m]
                              for s in SEEDS]) for m in ("ES", "ORS", "S", "LU", "efficacy_score")}
        for m, d in diffs.items():
            assert row.mean[m] == pytest.approx(d.mean(), abs=1e-12) and row.std[m] == pytest.approx(d.std(), abs=1e-12)
            assert (row.above[m], row.below[m]) == (int((d > 0).sum()), int((d < 0).sum()))
    with pytest.raises(ValueError, match="--paired_with MEMIT: not among"):
        paired_differences(summary, "MEMIT")


def test_runs_of_other_streams_or_repeated_seeds_are_not_paired(results, tmp_path, capsys):
    from experiments.summarize import main

    root = tmp_path / "results"
    shutil.copytree(results, root)
    other = next(d for d in (root / "WilKE").glob("run_*") if _seed_of(d) == SEEDS[1])
    third = next(other.glob("edit_3_on_case_*.json"))
    third.rename(third.with_name("edit_3_on_case_999999.json"))  # the same seed, another record at edit 3
    repeat = _copy_run(next(d for d in (root / "ROME").glob("run_*") if _seed_of(d) == SEEDS[0]), root / "ROME" / "run_009")

    out_file = tmp_path / "paired.csv"
    assert main(["--dir_name", "ROME,WilKE", "--results_dir", str(root), "--paired_with", "ROME", "--out", str(out_file)]) == 0
    paired = json.loads(out_file.with_suffix(".json").read_text())["paired"]
    # seed 1 has two ROME runs: never paired; seed 2 pairs until its streams part at edit 3
    assert [(r["checkpoint"], r["seeds"]) for r in paired["rows"]] == [(1, [SEEDS[1]]), (2, [SEEDS[1]])]
    notes = " ".join(paired["notes"])
    assert f"same seed {SEEDS[0]}" in notes and repeat.name in notes
    assert "different edit streams (edit 3: case 999999" in notes and "no run pair" in notes
    assert "Paired differences from ROME" in capsys.readouterr().out

    assert main(["--dir_name", "ROME,WilKE", "--results_dir", str(root), "--paired_with", "FT",
                 "--out", str(tmp_path / "x.csv")]) == 2
    assert "--paired_with FT: not among the summarised runs (ROME, WilKE)" in capsys.readouterr().err


def test_a_saved_summary_joins_newer_runs_in_the_table_and_the_norm_figure(results, cli, tmp_path, capsys):
    """Runs summarised on one machine (--out) and runs read on another (--with_summary): the merged table
    holds the same rows as one summary of all the folders, and norm_growth.png draws the saved runs' curves
    as their folders would; an algorithm in both places, a missing file and pairing against a saved
    baseline are refused with a message."""
    from experiments.summarize import main
    from experiments.summary.metrics import summarize
    from experiments.summary.norm_growth import NormCurves, running_mean
    from experiments.summary.plots import figure_builders
    from experiments.summary.runs import load_runs
    from experiments.summary.saved import read_summary, with_saved

    _, _, together, _ = cli
    saved = tmp_path / "rome.json"
    assert main(["--dir_name", "ROME", "--results_dir", str(results), "--checkpoints", "1,2,4", "--out", str(saved)]) == 0
    rome_runs = load_runs(results, ["ROME"]).runs
    stored = json.loads(saved.read_text())["norm_curves"]
    assert [c["run"] for c in stored] == [r.name for r in rome_runs] and stored[0]["v_star"][0] == [1, 2, 3, 4]
    for entry, run in zip(stored, rome_runs):  # the JSON keeps the curves the run folder gives
        back, direct = NormCurves.from_json(entry, "x"), NormCurves.of_run(run)
        for field in ("weights", "v_star", "written", "v0", "update"):
            assert all(np.allclose(a, b) for a, b in zip(getattr(back, field), getattr(direct, field)))
    older = {k: v for k, v in stored[0].items() if k != "update"}  # a summary saved before update norms were kept
    assert NormCurves.from_json(older, "x").update[0].size == 0

    merged = tmp_path / "merged.csv"
    assert main(["--dir_name", "WilKE", "--results_dir", str(results), "--checkpoints", "1,2,4",
                 "--with_summary", str(saved), "--out", str(merged), "--plots", str(tmp_path / "plots")]) == 0
    data = json.loads(merged.with_suffix(".json").read_text())
    assert data["algorithms"] == ["ROME", "WilKE"] and data["rows"] == together["rows"]
    assert [(c["algorithm"], c["run"]) for c in data["norm_curves"]] == [(c["algorithm"], c["run"]) for c in together["norm_curves"]]
    assert (tmp_path / "plots" / "norm_growth.png").stat().st_size > 0

    wilke = load_runs(results, ["WilKE"])
    summary = with_saved(summarize(wilke, [1, 2, 4]), read_summary(saved), str(saved))
    figure = figure_builders(summary)["norm_growth.png"]()
    rome_v_star = [line.get_ydata().tolist() for line in figure.axes[2].get_lines()
                   if line.get_label() == "ROME"]  # the first ROME run's trend line, drawn from the saved file
    assert rome_v_star == [running_mean(NormCurves.of_run(rome_runs[0]).v_star[1], 16).tolist()]

    assert main(["--dir_name", "ROME,WilKE", "--results_dir", str(results), "--with_summary", str(saved)]) == 2
    assert f"--with_summary: {saved}: ROME also among the runs read now" in capsys.readouterr().err
    assert main(["--dir_name", "WilKE", "--results_dir", str(results), "--with_summary", str(tmp_path / "none.json")]) == 2
    assert "none.json: cannot read a summary JSON" in capsys.readouterr().err
    assert main(["--dir_name", "WilKE", "--results_dir", str(results), "--with_summary", str(saved),
                 "--paired_with", "ROME", "--out", str(tmp_path / "p.csv")]) == 2
    assert "--paired_with ROME: only in a saved summary here" in capsys.readouterr().err

    assert main(["--from_summary", str(merged.with_suffix(".json")), "--plots", str(tmp_path / "again")]) == 0
    assert {"scores.png", "norm_growth.png"} <= {p.name for p in (tmp_path / "again").iterdir()}


def test_the_norm_table_reads_the_figures_curves_at_the_checkpoints(results, tmp_path, capsys):
    """--norms: each cell is what norm_growth.png draws at the checkpoint (weights at that step, ||v*|| as
    the trend line there), averaged over the runs; the growth compounds the ratio since the checkpoint
    before; checkpoints before the first step or after the runs stopped have no row; a saved summary
    prints the same table as its run folders."""
    from experiments.summarize import main
    from experiments.summary.norm_growth import NormCurves, running_mean
    from experiments.summary.norm_table import norm_rows
    from experiments.summary.runs import load_runs

    curves = [NormCurves.of_run(r) for r in load_runs(results, ["ROME"]).runs]
    assert all(c.v_star[0].tolist() == c.weights[0].tolist() == [1, 2, 3, 4] for c in curves)
    rows = norm_rows({"ROME": curves, "FT": []}, {"ROME": [0, 1, 2, 4, 8], "FT": [2]})
    assert [(r["algorithm"], r["checkpoint"], r["n_runs"]) for r in rows] == [("ROME", 1, 2), ("ROME", 2, 2), ("ROME", 4, 2)]
    v_star = {n: [running_mean(c.v_star[1], 16)[n - 1] for c in curves] for n in (2, 4)}  # 16 edits: all so far
    assert rows[2]["v_star_mean"] == pytest.approx(np.mean(v_star[4]))
    assert rows[2]["v_star_std"] == pytest.approx(np.std(v_star[4]))
    assert rows[2]["W_mean"] == pytest.approx(np.mean([c.weights[1][3] for c in curves]))
    assert rows[2]["fastest_mean"] == pytest.approx(np.mean([c.fastest[2][3] for c in curves]))
    updates = [running_mean(c.update[1], 16)[3] for c in curves]
    assert rows[2]["update_mean"] == pytest.approx(np.mean(updates)) and all(u > 0 for u in updates)
    growth = [100 * ((a / b) ** (100 / 2) - 1) for a, b in zip(v_star[4], v_star[2])]
    assert rows[2]["v_star_growth_mean"] == pytest.approx(np.mean(growth))
    assert math.isnan(rows[0]["v_star_growth_mean"]) and rows[2]["written_mean"] == rows[2]["v_star_mean"]  # no anchor

    saved = tmp_path / "rome.json"
    assert main(["--dir_name", "ROME", "--results_dir", str(results), "--checkpoints", "1,2,4", "--norms",
                 "--out", str(saved)]) == 0
    from_runs = capsys.readouterr().out.split("Norm growth", 1)[1].split("\n\nTable:", 1)[0]
    assert f"| ROME | 1 | 2 | {rows[0]['W_mean']:.1f} ± {rows[0]['W_std']:.1f} | - |" in from_runs
    assert main(["--from_summary", str(saved), "--norms"]) == 0
    assert capsys.readouterr().out.split("Norm growth", 1)[1].strip() == from_runs.strip()
    from experiments.summarize import reprint

    assert from_runs.strip().endswith(reprint(saved, None, norms=True))  # a results page's --norms marker


def test_nothing_to_summarise_is_an_error_not_a_crash(tmp_path, capsys):
    from experiments.summarize import main

    (tmp_path / "WilKE" / "run_000").mkdir(parents=True)
    assert main(["--results_dir", str(tmp_path), "--plots", str(tmp_path / "plots")]) == 2
    assert "no usable runs" in capsys.readouterr().err
    assert main(["--results_dir", str(tmp_path / "nowhere")]) == 2


def test_generation_scores_appear_when_present(results, tmp_path):
    """Fluency/consistency columns exist only when the runs have them; averaged over the edits that do."""
    from experiments.summary.metrics import summarize
    from experiments.summary.runs import load_runs

    root = tmp_path / "results"
    run = _copy_run(results / "ROME" / "run_000", root / "ROME" / "run_000")
    entropies = {}
    for f in run.glob("edit_*_on_case_*.json"):
        record = json.loads(f.read_text())
        if record["edit_index"] % 2:  # generation tests every 2 edits: edits 1 and 3
            record["post"]["ngram_entropy"] = entropies[record["edit_index"]] = 5.0 + record["edit_index"]
        f.write_text(json.dumps(record))
    summary = summarize(load_runs(root, ["ROME"]))
    assert "fluency" in summary.present_metrics() and "consistency" not in summary.present_metrics()
    by_n = {r["checkpoint"]: r for r in summary.rows}
    assert by_n[1]["fluency_mean"] == 6.0 and by_n[2]["fluency_mean"] == 6.0 and by_n[4]["fluency_mean"] == 7.0


def test_toxicity_flash_definition():
    from experiments.summary.metrics import toxicity_flashes

    norms = [1.0, 2.0, 11.0, 3.0, 100.0, math.nan, 4.0]
    # running medians of earlier edits: -, 1, 1.5, 2, 2.5, -, 3 (NaN left out)
    assert toxicity_flashes(norms, 5.0) == [False, False, True, False, True, False, False]
    assert toxicity_flashes(norms, 1.0) == [False, True, True, True, True, False, True]


def test_harmonic_score_counts_zero_as_1e4():
    from experiments.summary.metrics import harmonic_score

    assert harmonic_score([1, 1, 1, 1, 1]) == 1.0
    assert harmonic_score([1, 1, 1, 1, 0]) == pytest.approx(5 / (4 + 1e4))
    assert math.isnan(harmonic_score([1, math.nan]))


def test_plots_survive_odd_runs(results, tmp_path):
    """One run, a single checkpoint, zero and missing norms, a WilKE edit without a scan: every
    figure is still drawn."""
    from experiments.summary.metrics import summarize
    from experiments.summary.plots import save_figures
    from experiments.summary.runs import load_runs

    root = tmp_path / "results"
    run = _copy_run(results / "WilKE" / "run_000", root / "WilKE" / "run_000")
    for f in run.glob("edit_*_on_case_*.json"):
        record = json.loads(f.read_text())
        n = record["edit_index"]
        if n == 2:
            record["edit"]["update_norm"] = 0.0
            record["edit"]["layer_adaptability"] = {}
            record["edit"]["value_norms"] = []
        if n == 3:
            del record["edit"]["update_norm"]
            del record["edit"]["weight_norms"]
        f.write_text(json.dumps(record))
    summary = summarize(load_runs(root, ["WilKE"]), checkpoints=[4])
    saved = save_figures(summary, tmp_path / "plots")
    assert saved.failures == {}
    assert set(saved.paths) == {"scores.png", "rome_scores.png", "update_norms.png", "norm_growth.png",
                                "WilKE_layer_histogram.png", "WilKE_la_heatmap.png"}
    assert all(_is_informative_png(p) for p in saved.paths.values())


def test_notebook_is_committed_without_outputs():
    import nbformat

    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)
    assert "parameters" in code[0].metadata.get("tags", [])


def test_notebook_runs_headless(results, tmp_path):
    import nbformat

    env = {**os.environ, "WILKE_RESULTS_DIR": str(results), "WILKE_SUMMARY_DIR_NAMES": "ROME,WilKE",
           "WILKE_FLASH_FACTOR": "5", "WILKE_SUMMARY_PAIRED_WITH": "ROME"}
    proc = subprocess.run(
        [sys.executable, "-m", "nbconvert", "--execute", "--to", "notebook", "--ExecutePreprocessor.kernel_name=python3",
         "--ExecutePreprocessor.timeout=300", "--output-dir", str(tmp_path), "--output", "executed", str(NOTEBOOK)],
        cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    nb = nbformat.read(tmp_path / "executed.ipynb", as_version=4)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 6  # scores, ROME scores, WilKE histogram and heat map, update norms, norm growth
    text = "".join(o.get("text", "") for o in outputs)
    assert "4 run(s) of ROME, WilKE" in text and "WilKE/run_001" in text and "skipped" not in text
    paired = "".join(o.get("data", {}).get("text/markdown", "") for o in outputs)
    assert "| WilKE - ROME | 4 | 1,2 |" in paired
    assert "| WilKE/run_001 | 4 |" in paired  # where the time went
    assert "| ‖W‖ | %/100 |" in paired and "| ROME | 4 | 2 |" in paired  # the norm table


# ------------------------------------------------------------------------------------------------
# Sequential runs


SEQ_SEEDS = (1, 2)


@pytest.fixture(scope="module")
def sequential_results(tmp_path_factory) -> Path:
    """results/MEMIT_seq/run_00{0,1}: sequential MEMIT on a tiny GPT-2, batches of 2, 4 edits."""
    import torch

    from experiments.evaluate import main

    world = TinyWorld(tmp_path_factory.mktemp("sequential_world"), "gpt2")
    hp = world.write_hparams("MEMIT", rank_one_hparams("gpt2", 4, layers=[1, 2], mom2_update_weight=100.0,
                                                       context_template_length_params=[[10, 5]], v_num_grad_steps=8))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for seed in SEQ_SEEDS:
            main(world.cli_args("MEMIT", hp, dataset_size_limit=10, edit_times=4, seed=seed, protocol="sequential",
                                num_edits=2, dir_name="MEMIT_seq"))
    finally:
        torch.set_num_threads(threads)
    return world.results_dir


def direct_sequential_scores(run_dir: Path, n: int) -> dict[str, float]:
    evaluation = json.loads((run_dir / f"evaluation_after_edit_{n}.json").read_text())
    posts = [r["post"] for r in evaluation["records"]]

    def mean_of(key):
        return float(np.mean([np.mean(p[key]) for p in posts]))

    kept = evaluation["preservation"]
    return {"ES": mean_of("rewrite_prompts_correct"), "GS": mean_of("paraphrase_prompts_correct"),
            "LS": mean_of("neighborhood_prompts_correct"), "LU": mean_of("neighborhood_prompts_unchanged"),
            "LU_tokens": mean_of("neighborhood_prompts_unchanged_tokens"),
            "efficacy_score": float(np.mean([np.mean([q["target_new"] < q["target_true"] for q in p["rewrite_prompts_probs"]])
                                             for p in posts])),
            "PS": kept["retained"] / kept["n_records"], "PU": kept["unchanged"] / kept["n_records"]}


def test_sequential_summary_matches_direct_computation(sequential_results):
    from experiments.summary.metrics import summarize
    from experiments.summary.runs import load_runs

    loaded = load_runs(sequential_results, ["MEMIT_seq"])
    assert [r.protocol for r in loaded.runs] == ["sequential", "sequential"] and not loaded.skipped
    summary = summarize(loaded)
    assert [r["checkpoint"] for r in summary.rows] == [2, 4]
    for row in summary.rows:
        n = row["checkpoint"]
        per_run = [direct_sequential_scores(sequential_results / "MEMIT_seq" / f"run_{i:03d}", n) for i in range(2)]
        for metric in per_run[0]:
            values = [s[metric] for s in per_run]
            assert row[f"{metric}_mean"] == pytest.approx(np.mean(values), abs=1e-12), (n, metric)
            assert row[f"{metric}_std"] == pytest.approx(np.std(values), abs=1e-12), (n, metric)
        assert math.isnan(row["ERS_mean"]) and math.isnan(row["S_mean"])
    assert {"LU", "PS", "PU"} <= set(summary.present_metrics()) and "ERS" not in summary.present_metrics()


def test_sequential_plots_and_cli(sequential_results, tmp_path):
    proc = run_cli("--dir_name", "MEMIT_seq", "--results_dir", str(sequential_results), "--out",
                   str(tmp_path / "t.csv"), "--plots", str(tmp_path / "plots"))
    assert proc.returncode == 0, proc.stderr
    assert "MEMIT_seq" in proc.stdout and "PU" in proc.stdout
    for name in ("scores.png", "update_norms.png"):
        assert (tmp_path / "plots" / name).stat().st_size > 5000, name


def test_notebook_runs_headless_on_sequential_runs(sequential_results, tmp_path):
    import nbformat

    env = {**os.environ, "WILKE_RESULTS_DIR": str(sequential_results), "WILKE_SUMMARY_DIR_NAMES": "MEMIT_seq"}
    proc = subprocess.run(
        [sys.executable, "-m", "nbconvert", "--execute", "--to", "notebook", "--ExecutePreprocessor.kernel_name=python3",
         "--ExecutePreprocessor.timeout=300", "--output-dir", str(tmp_path), "--output", "executed", str(NOTEBOOK)],
        cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    nb = nbformat.read(tmp_path / "executed.ipynb", as_version=4)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs)
    assert "2 run(s) of MEMIT_seq" in text and "in 2 batchs" not in text and "flash(es) in 2 batches" in text
    markdown = "".join(o.get("data", {}).get("text/markdown", "") for o in outputs)
    assert "| MEMIT_seq/run_000 | 4 |" in markdown


def test_running_mean_is_the_mean_of_each_value_and_the_window_before_it():
    from experiments.summary.norm_growth import running_mean

    values = np.array([4.0, 2.0, 6.0, 8.0, 0.0])
    assert running_mean(values, 3).tolist() == [4.0, 3.0, 4.0, 16 / 3, 14 / 3]
    assert running_mean(values, 1).tolist() == values.tolist() and running_mean(np.array([]), 4).size == 0


def test_the_value_trend_averages_sixteen_edits_whatever_the_batch():
    """One edit a step: 16 steps; batches of 4: 4 steps; batches of 100 (each point already a mean of 100): 1."""
    from experiments.summary.norm_growth import steps_per_mean

    assert steps_per_mean(np.arange(1, 257, dtype=float)) == 16
    assert steps_per_mean(np.arange(4, 257, 4, dtype=float)) == 4
    assert steps_per_mean(np.arange(100, 2001, 100, dtype=float)) == 1
    assert steps_per_mean(np.array([100.0])) == 1 and steps_per_mean(np.array([])) == 1


def test_refresh_tables_rewrites_each_marked_table_from_its_summary(tmp_path):
    """A page's marked tables (a stale one, one followed by its paired differences, one not written yet,
    a norm table) become what each summary reprints; the prose around them stays; a second refresh changes nothing;
    a missing summary names the marker's line and leaves the page as it was."""
    from experiments.summarize import main as summarize_main
    from experiments.summary.doc_tables import marked_tables

    (tmp_path / "a.json").write_text("{}")
    (tmp_path / "b.json").write_text("{}")
    fake = {"a.json": "| x |\n|---|\n| 1 |", "b.json": "| y |\n|---|\n| 2 |\n\n| y - x |\n|---|\n| +1 |"}

    def reprint(path, metrics, norms):
        return "| norms |\n|---|" if norms else fake[path.name] + ("" if metrics is None else f"\n| {','.join(metrics)} |")

    page = tmp_path / "page.md"
    page.write_text("# R\n\n<!-- table: a.json -->\n| x |\n|---|\n| 0 |\n\n| old paired |\n|---|\n\ntext after a\n\n"
                    "<!-- table: b.json --metrics ES,PU -->\n\n| y |\n|---|\n| 9 |\nmore text\n"
                    "<!-- table: a.json -->\n\nend\n<!-- table: a.json --norms -->\n")
    assert doc_tables.refresh_tables(page, tmp_path, reprint) == ["a.json", "b.json", "a.json", "a.json"]
    text = page.read_text()
    assert [m.table for m in marked_tables(text)] == [fake["a.json"], fake["b.json"] + "\n| ES,PU |", fake["a.json"],
                                                      "| norms |\n|---|"]
    assert [m.norms for m in marked_tables(text)] == [False, False, False, True]
    assert "text after a" in text and "more text" in text and "| 1 |\n\nend\n<!--" in text and "old paired" not in text
    assert doc_tables.refresh_tables(page, tmp_path, reprint) == []
    page.write_text(text.replace("b.json", "missing.json"))
    before = page.read_text()
    with pytest.raises(FileNotFoundError, match=r"page.md:\d+: the marked summary missing.json"):
        doc_tables.refresh_tables(page, tmp_path, reprint)
    assert page.read_text() == before
    assert summarize_main(["--refresh_tables", str(tmp_path / "nowhere.md")]) == 2


def test_perplexity_goes_to_a_log_scale_only_when_a_run_collapses():
    """MEMIT's 2,000-edit run reads 79,168 against 30-99 for the rest: on a linear axis every other
    point sits on zero; a spread within a factor of 10 stays linear."""
    from matplotlib.figure import Figure

    from experiments.summary.plots import _spans_a_decade

    ax = Figure().subplots()
    ax.plot([100, 500, 1000, 2000], [31.5, 45.2, 95.5, 79168.2])
    ax.axhline(30.4)
    assert _spans_a_decade(ax)
    calm = Figure().subplots()
    calm.plot([100, 2000], [31.6, 98.9])
    calm.axhline(30.4)
    assert not _spans_a_decade(calm) and not _spans_a_decade(Figure().subplots())
