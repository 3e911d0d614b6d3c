"""WILD scores and general-ability checks inside runs (issue 25): both protocols write them, a resumed
run writes them again to the byte, the summaries read them, and bad settings stop before the model."""
from __future__ import annotations

import json
import os
import signal

import pytest
import torch

from experiments.evaluate import cli, main
from experiments.store.files import strip_timing
from tests.test_protocols import sixteen_records
from util.globals import REPO_ROOT
from util.tiny_models import TinyWorld, rank_one_hparams

SHARED = REPO_ROOT.parent / "shared" / "data"
needs_shared = pytest.mark.skipif(not (SHARED / "glue_eval" / "sst2.json").is_file()
                                  or not (SHARED / "corpus" / "wikitext-2-raw").is_dir(),
                                  reason="../shared/data/glue_eval and corpus/wikitext-2-raw are not here")
CHECKS = dict(capability_checks="perplexity,sst2", capability_items=3)
CONTEXT = 2048  # the tiny tokenizer spells words out: a probe item is a few hundred tokens


def memit_world(tmp_path, arch: str = "gpt2"):
    world = TinyWorld(tmp_path, arch, context=CONTEXT)
    world.data_file.write_text(json.dumps(sixteen_records()))
    hp = rank_one_hparams(arch, 4, layers=[1, 2], mom2_update_weight=100.0, context_template_length_params=[[10, 5]])
    return world, world.write_hparams("MEMIT", hp)


def run_files(run_dir) -> dict[str, dict]:
    names = [p.name for p in run_dir.glob("*.json") if p.name not in ("run.json", "params.json")]
    return {n: strip_timing(json.loads((run_dir / n).read_text())) for n in sorted(names)}


@needs_shared
def test_sequential_run_writes_wild_scores_and_capability_checks_the_summary_reads(tmp_path):
    from experiments.summary.metrics import summarize
    from experiments.summary.runs import load_runs

    torch.set_num_threads(1)
    world, hp = memit_world(tmp_path)
    run_dir = main(world.cli_args("MEMIT", hp, protocol="sequential", num_edits=2, edit_times=4, num_threads=1,
                                  eval_checkpoints="2,4", wild=True, wild_max_new_tokens=6, **CHECKS))
    unedited = json.loads((run_dir / "unedited_predictions.json").read_text())
    stream = json.loads((run_dir / "run.json").read_text())["edit_stream_case_ids"]
    assert sorted(unedited["wild_neighborhood"]) == sorted(str(c) for c in stream[:4])
    evaluation = json.loads((run_dir / "evaluation_after_edit_4.json").read_text())
    post = evaluation["records"][0]["post"]
    assert {"wild_rewrite_prompts_exact", "wild_neighborhood_prompts_unchanged", "wild_answers"} <= set(post)
    assert 0 < evaluation["wild_seconds"] < evaluation["eval_seconds"]  # WILD's share of the evaluation
    assert all(len(a) <= 6 * 8 for a in post["wild_answers"]["rewrite_prompts"])  # capped at 6 tokens
    for n in (0, 2, 4):
        check = json.loads((run_dir / f"capability_after_edit_{n}.json").read_text())
        assert check["edit_index"] == n and check["sst2"]["items"] == 3 and check["perplexity"]["perplexity"] > 1
    meta = json.loads((run_dir / "run.json").read_text())
    assert meta["wild"]["max_new_tokens"] == 6 and meta["capability"]["tasks"] == ["sst2"]

    summary = summarize(load_runs(world.results_dir, ["MEMIT"]))
    rows = {r["checkpoint"]: r for r in summary.rows}
    assert sorted(rows) == [0, 2, 4] and {"ES_wild", "LU_wild", "sst2_acc", "perplexity"} <= set(summary.present_metrics())
    assert rows[0]["perplexity_mean"] == json.loads((run_dir / "capability_after_edit_0.json").read_text())["perplexity"]["perplexity"]
    records = json.loads((run_dir / "evaluation_after_edit_4.json").read_text())["records"]
    expected = sum(sum(r["post"]["wild_rewrite_prompts_exact"]) / len(r["post"]["wild_rewrite_prompts_exact"])
                   for r in records) / len(records)
    assert rows[4]["ES_wild_mean"] == pytest.approx(expected)

    # where the time went, read back from the same files
    from experiments.summary.timing import format_timing, run_timing

    (run,) = summary.runs
    timing = run_timing(run)
    batches = [json.loads((run_dir / f"batch_{b}.json").read_text()) for b in (1, 2)]
    evaluations = [json.loads((run_dir / f"evaluation_after_edit_{n}.json").read_text()) for n in (2, 4)]
    probes = [json.loads((run_dir / f"capability_after_edit_{n}.json").read_text()) for n in (0, 2, 4)]
    assert timing["editing"] == pytest.approx(sum(b["edit"]["seconds"] for b in batches))
    assert timing["evaluation"] + timing["wild"] == pytest.approx(sum(e["eval_seconds"] for e in evaluations))
    assert timing["wild"] == pytest.approx(sum(e["wild_seconds"] for e in evaluations)) and timing["wild"] > 0
    assert timing["capability"] == pytest.approx(sum(sum(p["seconds"].values()) for p in probes)) and timing["capability"] > 0
    assert timing["total"] == pytest.approx(sum(timing[p] for p in ("editing", "evaluation", "wild", "capability",
                                                                     "statistics")))
    table = format_timing([run])
    assert "| MEMIT/run_000 | 4 |" in table and table.count("min (") == 5


@needs_shared
def test_rollback_keeps_wild_scores_beside_the_papers_files(tmp_path):
    from experiments.summary.metrics import summarize
    from experiments.summary.runs import load_runs

    world = TinyWorld(tmp_path, "llama", context=CONTEXT)
    hp = world.write_hparams("ROME", rank_one_hparams("llama", 4))
    run_dir = main(world.cli_args("ROME", hp, edit_times=2, num_threads=1, wild=True, wild_max_new_tokens=4,
                                  capability_every=2, **CHECKS))
    assert sorted(p.name for p in run_dir.glob("wild_of_edit_*.json")) == ["wild_of_edit_1.json", "wild_of_edit_2.json"]
    assert json.loads((run_dir / "wild_of_edit_2.json").read_text())["seconds"] > 0
    assert not any(k.startswith("wild_") for p in run_dir.glob("edit_*_on_case_*.json")
                   for k in json.loads(p.read_text())["post"])  # the per-edit files stay the paper's
    assert sorted(p.name for p in run_dir.glob("capability_after_edit_*.json")) == \
        ["capability_after_edit_0.json", "capability_after_edit_2.json"]  # every 2 edits
    rows = {r["checkpoint"]: r for r in summarize(load_runs(world.results_dir, ["ROME"])).rows}
    assert rows[2]["ES_wild_mean"] == rows[2]["ES_wild_mean"] and rows[2]["sst2_acc_mean"] >= 0  # not NaN


@needs_shared
def test_a_run_stopped_inside_a_capability_check_resumes_to_identical_files(tmp_path, monkeypatch):
    from experiments.py.capability import CapabilityProbe

    world, hp = memit_world(tmp_path)
    args = lambda name: world.cli_args("MEMIT", hp, protocol="sequential", num_edits=2, edit_times=4,  # noqa: E731
                                       num_threads=1, eval_checkpoints="2,4", checkpoint_every=100, dir_name=name,
                                       **CHECKS)
    assert cli(args("whole")) == 0
    whole = run_files(world.results_dir / "whole" / "run_000")

    real_run, calls = CapabilityProbe.run, []

    def run_then_abandon(probe, model, tok):
        calls.append(1)
        if len(calls) == 2:  # the check after edit 2: a second signal abandons it half-way
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)
        return real_run(probe, model, tok)

    monkeypatch.setattr(CapabilityProbe, "run", run_then_abandon)
    assert cli(args("stopped")) == 128 + signal.SIGTERM
    run_dir = world.results_dir / "stopped" / "run_000"
    assert not (run_dir / "capability_after_edit_2.json").exists()
    monkeypatch.setattr(CapabilityProbe, "run", real_run)
    assert cli(args("stopped") + ["--continue_from_run=run_000"]) == 0
    assert run_files(run_dir) == whole


def test_bad_evaluation_settings_stop_before_the_model_with_nothing_written(tmp_path, monkeypatch, caplog):
    world = TinyWorld(tmp_path, "llama")
    hp = world.write_hparams("ROME", rank_one_hparams("llama", 4))
    assert cli(world.cli_args("ROME", hp, wild=True, wild_max_new_tokens=0)) == 2
    assert cli(world.cli_args("ROME", hp, capability_checks="sst2,no_such_probe")) == 2
    assert "no_such_probe" in caplog.text
    import experiments.py.capability as capability

    monkeypatch.setattr(capability, "glue_eval_dirs", lambda settings, paths=None: [tmp_path / "nowhere"])
    assert cli(world.cli_args("ROME", hp, capability_checks="sst2")) == 2
    assert "sst2.json not found" in caplog.text
    assert not world.results_dir.exists()


@needs_shared
def test_summary_draws_wild_beside_teacher_forced_and_the_capability_curves(tmp_path):
    from experiments.summarize import main as summarize_main

    world, hp = memit_world(tmp_path)
    main(world.cli_args("MEMIT", hp, protocol="sequential", num_edits=2, edit_times=4, num_threads=1,
                        eval_checkpoints="2,4", wild=True, wild_max_new_tokens=4, **CHECKS))
    plots = tmp_path / "plots"
    assert summarize_main(["--dir_name", "MEMIT", "--results_dir", str(world.results_dir), "--plots", str(plots),
                           "--markdown", "--metrics", "ES,ES_wild,sst2_acc,perplexity"]) == 0
    assert (plots / "wild_vs_teacher_forced.png").stat().st_size > 1000
    assert (plots / "capabilities.png").stat().st_size > 1000


def test_a_wild_run_resumes_at_another_batch_size_to_identical_files(tmp_path, monkeypatch):
    """The WILD batch size decides speed, not answers: a run stopped after its first step resumes at
    another size (recorded in its resume entry) to the files of a run that never stopped, and a
    finished run counts for ``--continue_from_run auto`` at any size."""
    from memit.editor import MEMITEditor

    torch.set_num_threads(1)
    world, hp = memit_world(tmp_path)
    flags = dict(protocol="sequential", num_edits=2, edit_times=4, num_threads=1, eval_checkpoints="2,4",
                 checkpoint_every=1, wild=True, wild_max_new_tokens=6)
    whole = main(world.cli_args("MEMIT", hp, dir_name="whole", wild_batch_size=1, **flags))

    real_edit, calls = MEMITEditor.edit, []

    def edit_then_stop(editor, requests):
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # one signal: the run stops after this step, checkpointed
        return real_edit(editor, requests)

    monkeypatch.setattr(MEMITEditor, "edit", edit_then_stop)
    args = world.cli_args("MEMIT", hp, dir_name="stopped", wild_batch_size=16, **flags)
    assert cli(args) == 128 + signal.SIGTERM
    run_dir = world.results_dir / "stopped" / "run_000"
    assert not (run_dir / "evaluation_after_edit_4.json").exists()
    resumed = [a for a in args if not a.startswith("--wild_batch_size")] + ["--wild_batch_size=3",
                                                                          "--continue_from_run=auto"]
    assert cli(resumed) == 0
    assert run_files(run_dir) == run_files(whole)
    meta = json.loads((run_dir / "run.json").read_text())
    assert meta["config"]["wild"]["batch_size"] == 16 and meta["resumes"][-1]["execution"]["wild.batch_size"] == 3
    assert cli(world.cli_args("MEMIT", hp, dir_name="stopped", continue_from_run="auto", **flags)) == 0  # default size
    assert sorted(p.name for p in run_dir.parent.iterdir()) == ["run_000"]  # the finished run counted: nothing new


def test_a_wild_batch_size_below_one_stops_before_the_model(tmp_path, caplog):
    world = TinyWorld(tmp_path, "llama")
    hp = world.write_hparams("ROME", rank_one_hparams("llama", 4))
    assert cli(world.cli_args("ROME", hp, wild=True, wild_batch_size=0)) == 2
    assert "--wild_batch_size" in caplog.text and not world.results_dir.exists()


@needs_shared
def test_unedited_from_takes_an_earlier_runs_answers_and_probes_and_changes_no_result(tmp_path, monkeypatch, caplog):
    """A second method on the same stream reads the first run's unedited answers and probes at 0 edits instead
    of computing them (the probes run at 2 and 4 only) and writes the files it would have written; a run whose
    settings differ is refused before its folder is made, naming the field."""
    import logging

    from experiments.protocols.base import UneditedAnswers
    from experiments.py.capability import CapabilityProbe

    torch.set_num_threads(1)
    world, hp = memit_world(tmp_path)
    flags = dict(protocol="sequential", num_edits=2, edit_times=4, num_threads=1, eval_checkpoints="2,4", wild=True,
                 wild_max_new_tokens=6, **CHECKS)
    first = main(world.cli_args("MEMIT", hp, dir_name="first", **flags))

    real_prepare, real_probe, probed = UneditedAnswers.load_or_compute, CapabilityProbe.run, []

    def must_be_there(self):
        assert self.path.is_file(), "the unedited answers were computed, not taken"
        return real_prepare(self)

    monkeypatch.setattr(UneditedAnswers, "load_or_compute", must_be_there)
    monkeypatch.setattr(CapabilityProbe, "run", lambda self, *a, **k: probed.append(1) or real_probe(self, *a, **k))
    second = main(world.cli_args("MEMIT", hp, dir_name="second", unedited_from=str(first), **flags))
    assert len(probed) == 2  # after 2 and 4 edits; the check at 0 was copied
    for name in ("unedited_predictions.json", "capability_after_edit_0.json"):
        assert (second / name).read_bytes() == (first / name).read_bytes()
    assert run_files(second) == run_files(first)
    reused = json.loads((second / "run.json").read_text())["unedited_from"]
    assert reused["run"] == str(first.resolve()) and set(reused["files"]) == {"unedited_predictions.json",
                                                                             "capability_after_edit_0.json"}

    caplog.set_level(logging.ERROR)
    other = {**flags, "wild_max_new_tokens": 5}
    assert cli(world.cli_args("MEMIT", hp, dir_name="third", unedited_from=str(first), **other)) == 2
    assert "--unedited_from" in caplog.text and "its wild is" in caplog.text
    assert cli(world.cli_args("MEMIT", hp, dir_name="third", unedited_from=str(tmp_path), **flags)) == 2
    assert "no run.json" in caplog.text
    assert not (world.results_dir / "third").exists()
