"""experiments.collect_stats collects exactly the statistics a later edit run loads from the cache."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from editing.resources import EditResources
from experiments import collect_stats
from rome.rome_hparams import ROMEHyperParams
from tests.test_layer_stats import DOCS
from util.globals import load_paths
from util.models import load_model, model_slug
from util.tiny_models import make_model, make_tokenizer

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def world(tmp_path: Path) -> dict:
    folder = tmp_path / "tiny-llama"
    make_model("llama").save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    corpus = tmp_path / "texts.txt"
    corpus.write_text("\n\n".join(DOCS) + "\n", encoding="utf-8")
    hp = json.loads((REPO / "hparams" / "ROME" / "smollm2-135m.json").read_text())
    hp.update(layers=[1, 2], v_loss_layer=3, mom2_dataset=str(corpus), mom2_n_samples=5, mom2_max_length=16)
    hparams = tmp_path / "rome_tiny.json"
    hparams.write_text(json.dumps(hp))
    return {"model": str(folder), "hparams": hparams, "stats": tmp_path / "stats", "out": tmp_path / "summary.json"}


def test_cli_collects_what_an_edit_run_loads(world, capsys):
    summary = collect_stats.main(["--model_name", world["model"], "--alg_name", "ROME", "--hparams_fname",
                                  str(world["hparams"]), "--stats_dir", str(world["stats"]), "--no_progress",
                                  "--output_json", str(world["out"])])
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(world["out"].read_text()) == json.loads(json.dumps(summary))
    assert summary["modules"] == ["model.layers.1.mlp.down_proj", "model.layers.2.mlp.down_proj"]
    assert summary["n_samples"] == 5 and summary["sample_seed"] == 1 and summary["max_length"] == 16
    assert summary["per_process"][0]["layers_computed"] == summary["modules"]

    model, tok = load_model(world["model"], device="cpu")
    hparams = ROMEHyperParams.from_json(world["hparams"])
    resources = EditResources(load_paths(stats_dir=str(world["stats"])), model_slug(world["model"]), progress=False)
    calls = []
    handle = model.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        covariances = resources.covariances(model, tok, hparams, summary["modules"])
    finally:
        handle.remove()
    assert calls == [] and set(covariances) == set(summary["modules"])


def test_cli_explicit_layers_without_hparams(world, capsys):
    summary = collect_stats.main(["--model_name", world["model"], "--layers", "0", "--corpus", json.loads(
        world["hparams"].read_text())["mom2_dataset"], "--n_samples", "3", "--max_length", "8",
        "--stats_dir", str(world["stats"]), "--no_progress"])
    capsys.readouterr()
    assert summary["modules"] == ["model.layers.0.mlp.down_proj"] and summary["meta"]["n_samples"] == 3
    with pytest.raises(SystemExit, match="--corpus and --n_samples"):
        collect_stats.main(["--model_name", world["model"], "--layers", "0", "--stats_dir", str(world["stats"])])
