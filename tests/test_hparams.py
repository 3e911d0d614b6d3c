"""Hyperparameter files: every shipped file loads; bad files fail naming the file and field."""
import json
from pathlib import Path

import pytest

from experiments.algorithms import ALGORITHMS
from rome.rome_hparams import ROMEHyperParams
from util.hparams import HParamsError
from wilke.wilke_hparams import WilKEHyperParams

HPARAMS_DIR = Path(__file__).resolve().parent.parent / "hparams"
GOOD = json.loads((HPARAMS_DIR / "ROME" / "gpt2-xl.json").read_text())


@pytest.mark.parametrize(
    "path", sorted(HPARAMS_DIR.glob("*/*.json")), ids=lambda p: f"{p.parent.name}/{p.name}"
)
def test_every_shipped_hparams_file_loads(path):
    alg = path.parent.name
    assert alg in ALGORITHMS, f"{path}: folder {alg!r} is not an algorithm in experiments/algorithms.py"
    hp = ALGORITHMS[alg].load_hparams_class().from_json(path)
    assert hp.to_dict() == {**hp.to_dict(), **json.loads(path.read_text())}


def _write(tmp_path, data):
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(data))
    return p


def test_unknown_field_names_file_and_field(tmp_path):
    p = _write(tmp_path, {**GOOD, "v_lr_typo": 1})
    with pytest.raises(HParamsError, match=r"bad\.json.*'v_lr_typo'"):
        ROMEHyperParams.from_json(p)


def test_missing_field_names_file_and_field(tmp_path):
    data = dict(GOOD)
    del data["kl_factor"]
    with pytest.raises(HParamsError, match=r"bad\.json.*'kl_factor'"):
        ROMEHyperParams.from_json(_write(tmp_path, data))


def test_wrong_type_names_field(tmp_path):
    with pytest.raises(HParamsError, match=r"bad\.json.*'layers'"):
        ROMEHyperParams.from_json(_write(tmp_path, {**GOOD, "layers": "17"}))


def test_bad_value_names_field(tmp_path):
    with pytest.raises(HParamsError, match=r"bad\.json.*'fact_token'"):
        ROMEHyperParams.from_json(_write(tmp_path, {**GOOD, "fact_token": "middle"}))


def test_wilke_requires_scanning_ceiling(tmp_path):
    with pytest.raises(HParamsError, match="'scanning_ceiling'"):
        WilKEHyperParams.from_json(_write(tmp_path, GOOD))


def test_malformed_json_names_file(tmp_path):
    p = tmp_path / "broken.json"
    p.write_text("{not json")
    with pytest.raises(HParamsError, match="broken.json.*not valid JSON"):
        ROMEHyperParams.from_json(p)


def test_hparams_are_frozen_and_replace_derives():
    hp = ROMEHyperParams.from_dict(GOOD)
    with pytest.raises(Exception):
        hp.layers = (3,)
    assert hp.replace(layers=[3]).layers == (3,) and hp.layers == (17,)


def test_hparams_for_another_architecture_fail_on_check():
    from util.architectures import check_hparams_against_model
    from util.tiny_models import make_model

    hp = ROMEHyperParams.from_dict(GOOD)  # GPT-2 module names
    with pytest.raises(HParamsError, match="another architecture"):
        check_hparams_against_model(hp, make_model("llama", n_layer=2), source="gpt2-xl.json")
    with pytest.raises(HParamsError, match="'layers'"):
        check_hparams_against_model(hp, make_model("gpt2", n_layer=2), source="gpt2-xl.json")


def test_statistics_sample_seed_is_a_field_the_statistics_key_reads(tmp_path):
    """mom2_sample_seed is declared by the shared base (editing/hparams.py) and reaches the cache key:
    a file may pick another seed, or null for the corpus's first texts."""
    from editing.resources import _stats_key

    default = ROMEHyperParams.from_dict(GOOD)
    first_texts = ROMEHyperParams.from_json(_write(tmp_path, {**GOOD, "mom2_sample_seed": None}))
    assert _stats_key("m", default, "w").sample_seed == 1  # ROME's tally(..., random_sample=1)
    assert _stats_key("m", first_texts, "w").sample_seed is None
    with pytest.raises(HParamsError, match="mom2_sample_seed"):
        ROMEHyperParams.from_json(_write(tmp_path, {**GOOD, "mom2_sample_seed": "one"}))
