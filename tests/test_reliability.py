"""Reliability of the lifelong evaluate CLI on a tiny Llama: resume, bad input, NaN, determinism.

One uninterrupted reference run (5 edits, seed 9, one torch thread) is shared by the module;
interrupted-and-resumed runs must reproduce its per-edit files exactly, timing fields aside.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from experiments.evaluate import cli
from experiments.run.resume import lock_run_folder
from experiments.store import files
from experiments.store.checkpoints import WeightLedger, checkpoint_index, load_checkpoint, save_checkpoint
from experiments.store.files import strip_timing
from rome.editor import ROMEEditor
from util.globals import REPO_ROOT
from util.tiny_models import TinyWorld, make_model, rank_one_hparams, tiny_records

EDITS = 5
PREFIXES = ("", "As is well known, ", "In short, ")


def many_records() -> list[dict]:
    """30 valid records (the 10 tiny ones with three prompt prefixes): an edit stream of 15."""
    records = []
    for k, prefix in enumerate(PREFIXES):
        for r in tiny_records():
            r["case_id"] += 100 * k
            r["requested_rewrite"]["prompt"] = prefix + r["requested_rewrite"]["prompt"]
            records.append(r)
    return records


def bad_records() -> list[dict]:
    """One record per kind of bad record; case_ids 900..903."""
    base = tiny_records()[0]
    missing = {k: v for k, v in base.items() if k != "paraphrase_prompts"}
    no_subject = json.loads(json.dumps(base))
    no_subject["requested_rewrite"]["prompt"] = "This is located in the city of"
    empty = json.loads(json.dumps(base))
    empty["requested_rewrite"]["target_new"]["str"] = ""
    blank = json.loads(json.dumps(base))
    blank["requested_rewrite"]["target_new"]["str"] = "   "
    for i, r in enumerate((missing, no_subject, empty, blank)):
        r["case_id"] = 900 + i
    return [missing, no_subject, empty, blank]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    w = TinyWorld(tmp_path_factory.mktemp("reliability"), "llama")
    w.data_file.write_text(json.dumps(many_records()))
    w.hparams_path = w.write_hparams("ROME", rank_one_hparams("llama", 4))
    return w


def args_for(world, dir_name: str, hparams=None, **flags) -> list[str]:
    flags = {"edit_times": EDITS, "num_threads": 1, "dir_name": dir_name, **flags}
    return world.cli_args("ROME", hparams or world.hparams_path, **flags)


def edit_files(run_dir: Path) -> dict[str, Path]:
    return {p.name: p for p in run_dir.glob("edit_*_on_case_*.json")}


def assert_same_results(run_dir: Path, reference: Path) -> None:
    """Per-edit and retention files equal to the reference's, timing fields aside."""
    names = sorted(p.name for p in reference.glob("*.json") if p.name.startswith(("edit_", "retention_")))
    assert sorted(p.name for p in run_dir.glob("*.json") if p.name.startswith(("edit_", "retention_"))) == names
    for name in names:
        got, want = json.loads((run_dir / name).read_text()), json.loads((reference / name).read_text())
        assert strip_timing(got) == strip_timing(want), name


class CountingEdit:
    """Wraps ROMEEditor.edit (edits and roll-backs): counts calls, can poison a weight or crash on call k."""

    def __init__(self, real, poison_call=None, report=True, crash_call=None, sigint_call=None, n_sigint=1):
        self.real, self.calls = real, 0
        self.poison_call, self.report, self.crash_call = poison_call, report, crash_call
        self.sigint_call, self.n_sigint = sigint_call, n_sigint

    def __call__(self, editor, requests):
        model = editor.model
        self.calls += 1
        if self.calls == self.crash_call:
            raise SimulatedKill()
        if self.calls == self.sigint_call:
            for _ in range(self.n_sigint):  # Ctrl-C while the edit runs
                os.kill(os.getpid(), signal.SIGINT)
        outcome = self.real(editor, requests)
        if self.calls == self.poison_call:
            name = next(iter(outcome.orig_weights)) if self.report else "model.layers.2.mlp.down_proj.weight"
            with torch.no_grad():
                dict(model.named_parameters())[name][0, 0] = float("nan")
        return outcome


class SimulatedKill(BaseException):
    """Stands for SIGKILL: nothing in the run gets to clean up or record a status."""


def install(mp, counter: CountingEdit) -> CountingEdit:
    mp.setattr(ROMEEditor, "edit", lambda editor, requests: counter(editor, requests))
    return counter


@pytest.fixture
def patched_edit(monkeypatch):
    original = ROMEEditor.edit
    return lambda **kw: install(monkeypatch, CountingEdit(original, **kw))


@pytest.fixture(scope="module")
def reference(world):
    """The uninterrupted run; also records the edit calls and the SIGINT handler around it."""
    with pytest.MonkeyPatch.context() as mp:
        counter = install(mp, CountingEdit(ROMEEditor.edit))
        handler = signal.getsignal(signal.SIGINT)
        assert cli(args_for(world, "reference")) == 0
        assert signal.getsignal(signal.SIGINT) is handler
    return world.results_dir / "reference" / "run_000", counter.calls


def no_model_load(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("the model must not be loaded for this input")

    monkeypatch.setattr("util.models.load_model", refuse)


# --------------------------------------------------------------------------------------------
# Protocol and determinism


def test_edit_times_makes_exactly_that_many_edits_with_retention_at_checkpoints(reference):
    run_dir, calls = reference
    assert calls == 2 * EDITS  # each edit and its roll-back
    assert sorted(int(n.split("_")[1]) for n in edit_files(run_dir)) == list(range(1, EDITS + 1))
    assert sorted(p.name for p in run_dir.glob("retention_of_edit_*.json")) == [
        "retention_of_edit_1.json", "retention_of_edit_2.json", "retention_of_edit_4.json"]
    meta = json.loads((run_dir / "run.json").read_text())
    assert meta["status"] == "finished" and meta["retention_checkpoints"] == [1, 2, 4]
    assert meta["last_checkpoint"] == EDITS and checkpoint_index(run_dir / "weights_checkpoint.safetensors") == EDITS
    assert json.loads((run_dir / "skipped_records.json").read_text())["skipped"] == []
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in run_dir.iterdir())


def test_two_seeded_runs_are_identical_apart_from_timing(world, reference):
    run_dir, _ = reference
    assert cli(args_for(world, "again")) == 0
    again = world.results_dir / "again" / "run_000"
    assert_same_results(again, run_dir)
    for name in ("params.json", "skipped_records.json") + tuple(p.name for p in run_dir.glob("retention_*.json")):
        assert (again / name).read_bytes() == (run_dir / name).read_bytes(), name
    timing = {k for k in json.loads(next(iter(edit_files(run_dir).values())).read_text()) if k.endswith(("time", "seconds"))}
    assert timing == {"time", "eval_seconds"}
    meta = json.loads((run_dir / "run.json").read_text())
    assert meta["seed"] == 9 and meta["git_commit"] and meta["packages"]["torch"] and meta["torch_num_threads"] == 1
    assert meta["context_templates"][0] == "{}" and meta["config"]["hparams"]["context_template_seed"] == 0


def test_checkpoint_restores_weights_bit_exactly(tmp_path):
    model, fresh = make_model("llama", seed=1), make_model("llama", seed=1)
    name = "model.layers.1.mlp.down_proj.weight"
    param = dict(model.named_parameters())[name]
    ledger = WeightLedger()
    ledger.note({name: param.detach().clone()})
    with torch.no_grad():
        param.add_(torch.randn_like(param) * 1e3)  # large deltas: base + (w - base) != w somewhere
        param[0, :3] = torch.tensor([1e-30, -3.3e7, 0.1])
    save_checkpoint(tmp_path / "c.safetensors", model, ledger, 7)
    assert load_checkpoint(tmp_path / "c.safetensors", fresh, WeightLedger()) == 7
    for (n, a), (_, b) in zip(model.named_parameters(), fresh.named_parameters()):
        assert torch.equal(a, b), n


# --------------------------------------------------------------------------------------------
# Interrupts and resume


def test_sigterm_stops_cleanly_and_resume_matches_the_uninterrupted_run(world, reference, monkeypatch, caplog):
    args = args_for(world, "killed")
    run_dir = world.results_dir / "killed" / "run_000"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    log = world.root / "killed.log"
    with open(log, "w") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "experiments.evaluate", *args], cwd=REPO_ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=stderr)
        deadline = time.time() + 240
        while not list(run_dir.glob("edit_1_on_case_*.json")) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=240)
    err = log.read_text()
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "--continue_from_run run_000" in err
    meta = json.loads((run_dir / "run.json").read_text())
    stopped = meta["stopped_after_step"]
    assert meta["status"] == "interrupted" and 1 <= stopped < EDITS
    assert checkpoint_index(run_dir / "weights_checkpoint.safetensors") == stopped
    assert len(edit_files(run_dir)) == stopped and not list(run_dir.glob(".*tmp"))

    caplog.set_level(logging.WARNING)
    no_model_load(monkeypatch)  # auto-detection happens before the model would be loaded
    with pytest.raises(AssertionError, match="must not be loaded"):
        cli(args)
    assert "unfinished run of this same configuration" in caplog.text and "--continue_from_run run_000" in caplog.text
    monkeypatch.undo()

    assert cli(args + ["--continue_from_run=run_000"]) == 0
    assert_same_results(run_dir, reference[0])
    meta = json.loads((run_dir / "run.json").read_text())
    assert meta["status"] == "finished" and meta["resumes"][0]["checkpoint"] == stopped
    assert not (world.results_dir / "killed" / "run_001").exists()


# The CLI with SIGTERM sent to itself as the unedited model's answers start being read (the run's preparation,
# minutes on a long stream), which then go on to the end.
SIGTERM_IN_PREPARE = """
import os, signal, sys
from experiments.evaluate import cli
from experiments.protocols.base import UneditedAnswers
real = UneditedAnswers.load_or_compute
def signalled(self):
    os.kill(os.getpid(), signal.SIGTERM)
    return real(self)
UneditedAnswers.load_or_compute = signalled
sys.exit(cli(sys.argv[1:]))
"""


def test_sigterm_while_the_run_is_prepared_keeps_the_preparation_and_stops_before_the_first_edit(world, reference):
    """A first signal during the preparation (the unedited answers, the probes at 0) used to kill the process
    and lose it; now the preparation finishes, its files are written, and the run stops before edit 1. The
    resumed run reads them back and ends equal to the uninterrupted one."""
    args = args_for(world, "stopped_early")
    run_dir = world.results_dir / "stopped_early" / "run_000"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run([sys.executable, "-c", SIGTERM_IN_PREPARE, *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-2000:]
    assert "stopped before step 1" in proc.stderr and "--continue_from_run run_000" in proc.stderr
    meta = json.loads((run_dir / "run.json").read_text())
    assert meta["status"] == "interrupted" and meta["stopped_after_step"] == 0
    assert (run_dir / "unedited_predictions.json").is_file() and not edit_files(run_dir)
    unedited = (run_dir / "unedited_predictions.json").read_bytes()
    assert cli(args + ["--continue_from_run=run_000"]) == 0
    assert (run_dir / "unedited_predictions.json").read_bytes() == unedited  # read back, not made again
    assert_same_results(run_dir, reference[0])


def test_killed_run_resumes_by_replaying_from_the_last_checkpoint(world, reference, patched_edit, caplog):
    args = args_for(world, "crashed", checkpoint_every=100)  # weight checkpoints only at 1, 2, 4
    patched_edit(crash_call=7)  # the edit of step 4
    with pytest.raises(SimulatedKill):
        cli(args)
    run_dir = world.results_dir / "crashed" / "run_000"
    assert len(edit_files(run_dir)) == 3 and checkpoint_index(run_dir / "weights_checkpoint.safetensors") == 2
    assert json.loads((run_dir / "run.json").read_text())["status"] == "running"
    caplog.set_level(logging.INFO)
    patched_edit()
    assert cli(args + ["--continue_from_run=run_000"]) == 0
    edit_3 = next(iter(run_dir.glob("edit_3_on_case_*.json"))).name
    assert f"replayed {edit_3}: identical to" in caplog.text
    assert_same_results(run_dir, reference[0])
    assert json.loads((run_dir / "run.json").read_text())["replayed_files"] == {edit_3: True, "locality_of_edit_3.json": True}


def _close(got, want, where: str = "") -> None:
    """Equal JSON, floats to a relative 1e-5 (a sum's terms added in another order)."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), where
        for k in want:
            _close(got[k], want[k], f"{where}.{k}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            _close(g, w, f"{where}[{i}]")
    elif isinstance(want, float):
        assert got == pytest.approx(want, rel=1e-5, abs=1e-7), where
    else:
        assert got == want, where


def test_a_run_started_on_one_thread_resumes_on_two(world, reference, patched_edit, caplog):
    """The thread count decides speed, not what is computed: a long run that started beside another
    continues on both cores (recorded in its resume entry, with a warning), and, killed again, on one
    (the warning compares with the latest attempt's count, not the first start's), to the uninterrupted
    run's results up to the last bits; the finished run counts for the command at either count."""
    args = args_for(world, "threads", checkpoint_every=100)
    patched_edit(crash_call=7)
    with pytest.raises(SimulatedKill):
        cli(args)
    caplog.set_level(logging.WARNING)
    patched_edit(crash_call=3)
    two = [a for a in args if not a.startswith("--num_threads")] + ["--num_threads=2", "--continue_from_run=auto"]
    threads = torch.get_num_threads()
    try:
        with pytest.raises(SimulatedKill):
            cli(two)
    finally:
        torch.set_num_threads(threads)
    assert "torch uses 2 threads, the interrupted run used 1" in caplog.text
    caplog.clear()
    patched_edit()
    assert cli(args + ["--continue_from_run=auto"]) == 0
    assert "torch uses 1 threads, the interrupted run used 2" in caplog.text
    run_dir = world.results_dir / "threads" / "run_000"
    meta = json.loads((run_dir / "run.json").read_text())
    assert meta["status"] == "finished" and meta["config"]["num_threads"] == 1
    assert [r["execution"]["num_threads"] for r in meta["resumes"]] == [2, 1]
    assert [r["torch_num_threads"] for r in meta["resumes"]] == [2, 1]
    names = sorted(p.name for p in reference[0].glob("*.json") if p.name.startswith(("edit_", "retention_")))
    assert sorted(p.name for p in run_dir.glob("*.json") if p.name.startswith(("edit_", "retention_"))) == names
    for name in names:
        _close(strip_timing(json.loads((run_dir / name).read_text())),
               strip_timing(json.loads((reference[0] / name).read_text())), name)
    assert cli(args + ["--continue_from_run=auto"]) == 0
    assert sorted(p.name for p in run_dir.parent.iterdir()) == ["run_000"]  # counted as this command's run


def test_checkpoint_minutes_bounds_the_work_a_kill_redoes(world, reference, patched_edit, caplog):
    """The same kill at step 4, with a checkpoint due after any step ending past --checkpoint_minutes (here
    at once): the checkpoint is after step 3, the resume replays nothing, and the files are the same."""
    args = args_for(world, "timed", checkpoint_every=100, checkpoint_minutes=1e-9)
    patched_edit(crash_call=7)  # the edit of step 4
    with pytest.raises(SimulatedKill):
        cli(args)
    run_dir = world.results_dir / "timed" / "run_000"
    assert len(edit_files(run_dir)) == 3 and checkpoint_index(run_dir / "weights_checkpoint.safetensors") == 3
    assert json.loads((run_dir / "run.json").read_text())["checkpoint_minutes"] == 1e-9
    caplog.set_level(logging.INFO)
    patched_edit()
    assert cli(args + ["--continue_from_run=run_000"]) == 0
    assert "replayed" not in caplog.text
    assert_same_results(run_dir, reference[0])


@pytest.mark.parametrize("minutes", ["-1", "nan"])
def test_a_negative_checkpoint_minutes_is_refused_before_the_model_loads(world, monkeypatch, caplog, minutes):
    no_model_load(monkeypatch)
    caplog.set_level(logging.ERROR)
    assert cli(args_for(world, "bad_minutes") + [f"--checkpoint_minutes={minutes}"]) == 2
    assert "--checkpoint_minutes" in caplog.text and "give 0 (off) or more minutes" in caplog.text
    assert not (world.results_dir / "bad_minutes").exists()


def test_resume_refuses_a_folder_whose_files_before_the_checkpoint_are_gone(world, patched_edit, caplog):
    """A folder moved away while its process still wrote a step leaves a fragment: a checkpoint after
    step k and no files of the steps before it. Resuming would leave that hole; it is refused, saying why."""
    args = args_for(world, "holed", checkpoint_every=100)
    patched_edit(crash_call=7)
    with pytest.raises(SimulatedKill):
        cli(args)
    run_dir = world.results_dir / "holed" / "run_000"
    next(iter(run_dir.glob("edit_1_on_case_*.json"))).unlink()
    before = sorted(p.name for p in run_dir.iterdir())
    patched_edit()
    assert cli(args + ["--continue_from_run=run_000"]) == 2
    assert "the result files of step 1 are missing" in caplog.text and "--continue_from_run" in caplog.text
    assert sorted(p.name for p in run_dir.iterdir()) == before  # nothing written


def test_a_run_folder_another_process_writes_is_left_to_it(world, reference, patched_edit, caplog):
    """Two plans sharing a line, or one command typed twice: whichever way a second process comes to an
    unfinished run that another is writing, it writes nothing there and starts no run beside it."""
    args = args_for(world, "locked", checkpoint_every=100)
    patched_edit(crash_call=7)
    with pytest.raises(SimulatedKill):
        cli(args)
    run_dir = world.results_dir / "locked" / "run_000"
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    patched_edit()
    writer = lock_run_folder(run_dir)  # what the process writing the folder holds
    try:
        for how in ("--continue_from_run=run_000", "--continue_from_run=auto"):
            caplog.clear()
            assert cli(args + [how]) == 2
            assert f"{run_dir} is being written by another process" in caplog.text
        assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == before
        assert [p.name for p in run_dir.parent.iterdir()] == ["run_000"]
    finally:
        writer.close()
    assert cli(args + ["--continue_from_run=auto"]) == 0  # once it is free, resumed to the same files
    assert_same_results(run_dir, reference[0])


def test_a_new_run_takes_the_next_number_when_another_process_took_this_one(tmp_path, monkeypatch):
    (tmp_path / "run_000").mkdir()  # created by another process after this one listed the folder
    monkeypatch.setattr(files, "existing_runs", lambda alg_dir: [])
    assert files.new_run_dir(tmp_path) == tmp_path / "run_001" and (tmp_path / "run_001").is_dir()


@pytest.mark.parametrize("n_sigint", [1, 2])
def test_ctrl_c_finishes_or_abandons_the_current_edit(world, patched_edit, n_sigint):
    patched_edit(sigint_call=3, n_sigint=n_sigint)  # during the edit of step 2
    handler = signal.getsignal(signal.SIGINT)
    dir_name = f"ctrl_c_{n_sigint}"
    assert cli(args_for(world, dir_name)) == 128 + signal.SIGINT
    assert signal.getsignal(signal.SIGINT) is handler
    run_dir = world.results_dir / dir_name / "run_000"
    meta = json.loads((run_dir / "run.json").read_text())
    finished = 2 if n_sigint == 1 else 1  # once: edit 2 is finished; twice: it is abandoned
    assert meta["status"] == "interrupted" and len(edit_files(run_dir)) == finished
    assert checkpoint_index(run_dir / "weights_checkpoint.safetensors") == finished
    assert meta.get("stopped_after_step" if n_sigint == 1 else "stopped_during_step") == 2


# --------------------------------------------------------------------------------------------
# Numerical faults


@pytest.mark.parametrize("report, stage", [(True, "edit"), (False, "evaluation")])
def test_nan_stops_the_run_and_keeps_earlier_results(world, reference, patched_edit, report, stage, caplog):
    patched_edit(poison_call=3, report=report)  # the edit of step 2
    dir_name = f"nan_{stage}"
    assert cli(args_for(world, dir_name)) == 3
    run_dir = world.results_dir / dir_name / "run_000"
    failure = json.loads((run_dir / "failure.json").read_text())
    assert failure["step"] == 2 and failure["stage"] == stage and failure["finished_steps"] == 1
    assert "non-finite" in failure["problem"] and "numerical fault at step 2" in caplog.text
    assert set(edit_files(run_dir)) == {p for p in edit_files(reference[0]) if p.startswith("edit_1_")}
    name = next(iter(edit_files(run_dir)))
    assert strip_timing(json.loads((run_dir / name).read_text())) == strip_timing(json.loads((reference[0] / name).read_text()))
    assert json.loads((run_dir / "run.json").read_text())["status"] == "failed"


def test_nan_from_hparams_stops_at_the_first_edit(world):
    hp = hparams_file(world, "nan_decay.json", v_weight_decay=float("nan"))  # a NaN loss, then NaN v*
    assert cli(args_for(world, "nan_decay", hparams=hp, edit_times=2)) == 3
    failure = json.loads((world.results_dir / "nan_decay" / "run_000" / "failure.json").read_text())
    assert failure["step"] == 1 and failure["stage"] == "edit"


# --------------------------------------------------------------------------------------------
# Bad input


def write(world, name: str, content) -> Path:
    path = world.root / name
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def hparams_file(world, name: str, **overrides) -> Path:
    hp = rank_one_hparams("llama", 4, **{"mom2_dataset": str(world.corpus_file), **overrides})
    return write(world, name, hp)


PRE_LOAD_CASES = {
    "malformed json": (lambda w: {"ds_name": write(w, "broken.json", '[{"case_id": 1,')}, "malformed JSON at line 1"),
    "no usable records": (lambda w: {"ds_name": write(w, "allbad.json", bad_records())}, "no usable records"),
    "unknown dataset": (lambda w: {"ds_name": "no_such_dataset"}, "unknown dataset 'no_such_dataset'"),
    "unknown algorithm": (lambda w: {"alg_name": "NoSuchAlg"}, "unknown --alg_name 'NoSuchAlg'"),
    "missing hparams file": (lambda w: {"hparams_fname": "nope.json"}, "nope.json does not exist"),
    "unknown hparams field": (lambda w: {"hparams_fname": hparams_file(w, "extra.json", colour=1)}, "unknown field 'colour'"),
    "missing corpus": (lambda w: {"hparams_fname": hparams_file(w, "nocorpus.json", mom2_dataset="/no/such/corpus.txt")},
                       "field 'mom2_dataset'"),
    "too many edits": (lambda w: {"edit_times": 99}, "exceeds the 15 records"),
    "zero edits": (lambda w: {"edit_times": 0}, "--edit_times: is 0"),
    "unknown run": (lambda w: {"continue_from_run": "run_042"}, "no run folder"),
}


@pytest.mark.parametrize("case", sorted(PRE_LOAD_CASES))
def test_bad_input_fails_before_loading_the_model(world, monkeypatch, caplog, case):
    make, message = PRE_LOAD_CASES[case]
    flags = {"dir_name": "bad", "num_threads": 1, "edit_times": 2, **make(world)}
    alg = flags.pop("alg_name", "ROME")
    hp = flags.pop("hparams_fname", world.hparams_path)
    no_model_load(monkeypatch)
    assert cli(world.cli_args(alg, hp, **flags)) == 2
    assert message in caplog.text and "how to fix:" in caplog.text
    assert not (world.results_dir / "bad").exists()


POST_LOAD_CASES = {
    "hparams of another architecture": (dict(rank_one_hparams("gpt2", 4)), "the hparams file is for another architecture"),
    "layer out of range": (dict(rank_one_hparams("llama", 4, layers=[9])), "has layer 9, but the model has layers 0..3"),
}


@pytest.mark.parametrize("case", sorted(POST_LOAD_CASES))
def test_bad_hparams_for_the_model_fail_right_after_loading(world, caplog, case):
    hp, message = POST_LOAD_CASES[case]
    hp["mom2_dataset"] = str(world.corpus_file)
    path = write(world, f"{case.replace(' ', '_')}.json", hp)
    assert cli(world.cli_args("ROME", path, dir_name="bad_model", num_threads=1, edit_times=2)) == 2
    assert message in caplog.text and "how to fix:" in caplog.text


def test_auto_starts_resumes_then_skips_the_finished_run(world, reference, patched_edit, monkeypatch, caplog):
    args = args_for(world, "auto", checkpoint_every=100, continue_from_run="auto")
    patched_edit(crash_call=7)  # killed in the edit of step 4; weight checkpoint after step 2
    with pytest.raises(SimulatedKill):
        cli(args)
    run_dir = world.results_dir / "auto" / "run_000"
    assert len(edit_files(run_dir)) == 3
    caplog.set_level(logging.INFO)
    patched_edit()
    assert cli(args) == 0
    assert f"resuming {run_dir}" in caplog.text
    assert_same_results(run_dir, reference[0])
    caplog.clear()
    no_model_load(monkeypatch)
    assert cli(args) == 0  # nothing to do, and the model is not even loaded
    assert "has finished this configuration; nothing to do" in caplog.text
    assert [p.name for p in (world.results_dir / "auto").iterdir()] == ["run_000"]


def test_auto_resumes_a_run_started_before_an_hparams_field_existed(world, reference, patched_edit, caplog):
    """A field added to the code later with a default that keeps the old behaviour (here ENCORE's
    ``mpes_prob_cutoff``, 0 = off) does not orphan an unfinished run; a non-default value does."""
    from experiments.run.resume import choose_auto

    args = args_for(world, "added_field", checkpoint_every=100, continue_from_run="auto")
    patched_edit(crash_call=7)
    with pytest.raises(SimulatedKill):
        cli(args)
    run_dir = world.results_dir / "added_field" / "run_000"
    meta = json.loads((run_dir / "run.json").read_text())
    assert meta["config"]["hparams"].pop("mpes_prob_cutoff") == 0
    (run_dir / "run.json").write_text(json.dumps(meta))  # as the code before the field wrote it
    config = {**meta["config"], "hparams": {**meta["config"]["hparams"], "mpes_prob_cutoff": 0}}
    assert choose_auto(run_dir.parent, config) == (None, None)  # without the defaults: a different configuration
    assert choose_auto(run_dir.parent, config, {"hparams.mpes_prob_cutoff": 0}) == (None, run_dir)
    changed = {**config, "hparams": {**config["hparams"], "mpes_prob_cutoff": -2}}
    assert choose_auto(run_dir.parent, changed, {"hparams.mpes_prob_cutoff": 0}) == (None, None)
    caplog.set_level(logging.INFO)
    patched_edit()
    assert cli(args) == 0
    assert f"resuming {run_dir}" in caplog.text
    assert_same_results(run_dir, reference[0])
    assert [p.name for p in run_dir.parent.iterdir()] == ["run_000"]


def test_auto_leaves_a_run_another_process_writes_and_ignores_other_configurations(world, reference, tmp_path):
    from experiments.run.resume import ResumeError, choose_auto

    meta = json.loads((reference[0] / "run.json").read_text())
    config = meta["config"]
    alg_dir = tmp_path / "plan"
    for name, seed, status in (("run_000", 10, "finished"), ("run_001", 9, "interrupted"), ("run_002", 10, "running")):
        (alg_dir / name).mkdir(parents=True)
        (alg_dir / name / "run.json").write_text(json.dumps({**meta, "status": status, "config": {**config, "seed": seed}}))
    assert choose_auto(alg_dir, config) == (None, alg_dir / "run_001")
    assert choose_auto(alg_dir, {**config, "seed": 10}) == (alg_dir / "run_000", None)
    assert choose_auto(alg_dir, {**config, "seed": 11}) == (None, None)
    writer = subprocess.Popen(["sleep", "60"])
    try:
        live = {**meta, "status": "running", "pid": writer.pid, "config": config}
        (alg_dir / "run_003").mkdir()
        (alg_dir / "run_003" / "run.json").write_text(json.dumps(live))
        with pytest.raises(ResumeError, match=f"being written by process {writer.pid}"):
            choose_auto(alg_dir, config)
    finally:
        writer.kill()
        writer.wait()


def test_unknown_model_fails_with_a_message(world, caplog):
    assert cli(args_for(world, "bad_model", model_name=str(world.root / "no_such_model"))) == 2
    assert "no such folder" in caplog.text and "--model_name" in caplog.text


def test_resume_refuses_a_finished_run_and_a_different_configuration(world, reference, caplog):
    assert cli(args_for(world, "reference", continue_from_run="run_000")) == 2
    assert "already finished" in caplog.text
    meta = json.loads((reference[0] / "run.json").read_text())
    fake = world.results_dir / "other" / "run_000"
    fake.mkdir(parents=True)
    (fake / "run.json").write_text(json.dumps({**meta, "status": "interrupted"}))
    assert cli(args_for(world, "other", continue_from_run="run_000", seed=10)) == 2
    assert "different configuration (seed: 9 -> 10" in caplog.text


def test_bad_records_are_skipped_logged_and_listed(world, caplog):
    data = write(world, "mixed.json", many_records() + bad_records())
    assert cli(args_for(world, "mixed", ds_name=data, edit_times=1)) == 0
    run_dir = world.results_dir / "mixed" / "run_000"
    skipped = json.loads((run_dir / "skipped_records.json").read_text())["skipped"]
    assert [s["case_id"] for s in skipped] == [900, 901, 902, 903]
    assert [s["field"] for s in skipped] == ["paraphrase_prompts", "requested_rewrite.prompt",
                                              "requested_rewrite.target_new.str", "requested_rewrite.target_new.str"]
    assert "skipping bad record" in caplog.text
    assert json.loads((run_dir / "run.json").read_text())["n_known_records"] == len(many_records())


def test_module_entry_point_exits_non_zero_with_the_message(world):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    out = subprocess.run([sys.executable, "-m", "experiments.evaluate", *args_for(world, "bad", alg_name="Nope")],
                         cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 2 and "unknown --alg_name 'Nope'" in out.stderr and "Traceback" not in out.stderr
