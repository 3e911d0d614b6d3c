"""NAS, the norm anchor (issue 27): the rescale rule, the reference norm r, upstream's numbers, and the switch
``value_norm_anchor`` honoured by every locate-then-edit method (and refused by the others)."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

import editing.norm_anchor as norm_anchor
from editing.editor import update_norms
from editing.norm_anchor import ROME_SKIP_FACTOR, SKIP_FACTOR, anchor, anchored_rome_value, scale_to_norm
from editing.norm_reference import prepare_norm_anchors, upper_trimmed_mean
from editing.resources import EditResources
from experiments.algorithms import ALGORITHMS
from memit import MEMITHyperParams
from memit.memit_main import compute_zs
from rome import ROMEHyperParams, execute_rome
from tests.test_reliability import many_records
from util import nethook
from util.globals import REPO_ROOT, load_paths
from util.hparams import HParamsError
from util.tiny_models import EIFFEL_REQUEST, TinyWorld, make_model, make_tokenizer, rank_one_hparams, tiny_records

GOLDEN = json.loads((Path(__file__).parent / "fixtures" / "upstream_golden_lifelong.json").read_text())


def rel(a: torch.Tensor, b) -> float:
    b = torch.as_tensor(b, dtype=a.dtype)
    return float((a - b).norm() / b.norm())


# --------------------------------------------------------------------------------------------
# The rule


def test_anchor_keeps_the_direction_sets_the_norm_and_drops_the_delta_above_the_bound():
    g = torch.Generator().manual_seed(0)
    v0, delta = torch.randn(64, generator=g), torch.randn(64, generator=g)
    v_star = v0 + delta
    r = float(v_star.norm()) / 1.5  # ||v*|| = 1.5 r: rescaled
    out, dropped = anchor(v_star, v0, r, SKIP_FACTOR)
    assert not dropped and abs(float(out.norm()) - r) < 1e-5 * r
    assert float(torch.nn.functional.cosine_similarity(out, v_star, dim=0)) > 1 - 1e-6
    out, dropped = anchor(v_star, v0, float(v_star.norm()) / 2.01, SKIP_FACTOR)  # ||v*|| > 2r: v* = v0
    assert dropped and torch.equal(out, v0)
    out, dropped = anchor(v_star, v0, float(v_star.norm()) / 1.99, SKIP_FACTOR)  # just below: rescaled
    assert not dropped and abs(float(out.norm()) - float(v_star.norm()) / 1.99) < 1e-5
    # ROME's variant: rescaled up to 5r, beyond that the current value (a zero rank-one update)
    cur = torch.randn(64, generator=g)
    assert abs(float(anchored_rome_value(v_star, cur, float(v_star.norm()) / 4.9).norm()) - float(v_star.norm()) / 4.9) < 1e-5
    assert torch.equal(anchored_rome_value(v_star, cur, float(v_star.norm()) / 5.1), cur)
    assert torch.equal(anchored_rome_value(v_star, cur, None), v_star)  # NAS off
    assert (SKIP_FACTOR, ROME_SKIP_FACTOR) == (2.0, 5.0)
    assert torch.equal(scale_to_norm(torch.zeros(4), 3.0), torch.zeros(4))  # upstream leaves ~0 vectors alone


def test_upper_trimmed_mean_drops_the_top_five_percent():
    values = list(range(1, 41))  # 40 values: floor(0.05 * 40) = 2 dropped
    assert upper_trimmed_mean(values) == (sum(range(1, 39)) / 38, 2)
    assert upper_trimmed_mean([3.0, 5.0]) == (4.0, 0)
    with pytest.raises(ValueError, match="not all finite"):
        upper_trimmed_mean([1.0, float("nan")])


# --------------------------------------------------------------------------------------------
# Upstream's numbers (SasyaTitech/NAS 5acab48; tests/fixtures/upstream_golden_lifelong.md)


def pool_file(root: Path) -> Path:
    """The fixture's 30 rewrites: the tiny records under three prompt prefixes, in that order."""
    path = root / "pool.json"
    path.write_text(json.dumps(many_records()))
    return path


class FixedTemplates(EditResources):
    """Resources whose templates are the fixture's (the bare ones, "{}", for the reference norm)."""

    def __init__(self, root: Path, templates: list[str]):
        super().__init__(load_paths(data_dir=str(root), stats_dir=str(root / "stats")), "tiny-gpt2", progress=False)
        self.fixed = templates

    def context_templates(self, model, tok, spec):
        return list(self.fixed) if spec.length_params else ["{}"]


def golden_hparams(cls, case: dict, root: Path, **kw):
    """The fixture's settings, the values optimised one after another as upstream's loop does
    (``v_batch_tokens`` 0; batched, the tiny model's chaotic v_lr 0.5 moves r by ~1e-5: float rounding
    amplified by Adam, tests/test_value_batching.py checks batched = looped at a tamer rate)."""
    hp = {k: v for k, v in case["hparams"].items() if k != "nas_restart"}
    return cls.from_dict(rank_one_hparams("gpt2", 4, **{**hp, "context_template_length_params": [[10, 2]],
                                                       "v_batch_tokens": 0,
                                                       "value_norm_anchor": True,
                                                       "value_norm_anchor_samples": case["hparams"]["nas_restart"],
                                                       "value_norm_anchor_dataset": str(pool_file(root)), **kw}))


def eiffel() -> dict:
    return {**EIFFEL_REQUEST, "target_new": {"str": "Rome"}}


def test_memit_z_and_reference_norm_match_upstream(tmp_path):
    case = GOLDEN["nas_memit"]
    hp = golden_hparams(MEMITHyperParams, case, tmp_path)
    res = FixedTemplates(tmp_path, [t for group in case["context_templates"] for t in group])
    model, tok = make_model("gpt2", 4, 0), make_tokenizer()
    want = case["reference_batch_1"]
    r = res.norm_reference(model, tok, hp, 2)
    # 4e-9 relative on the CPU that made the goldens, 1.4e-5 on an AVX-512 one: v_lr 0.5 on the tiny model
    # amplifies a BLAS kernel's rounding (golden_hparams); a wrong sample, drop or mean moves r by percents
    assert abs(r - want["mean_vstar_norm"]) < 1e-4 * want["mean_vstar_norm"]
    stored = json.loads(next((tmp_path / "stats").rglob("*.json")).read_text())
    assert rel(torch.tensor(stored["norms"]), want["norms"]) < 1e-3 and stored["dropped"] == want["outlier_drop_count"]  # 6e-5 on AVX-512
    zs, steps, losses, norms = compute_zs(model, tok, [eiffel()], hp, res)
    assert rel(zs[:, 0], case["z"]) < 1e-4  # measured 2.0e-7 where the goldens were made, 1.2e-5 on AVX-512
    # the norms a run records for NAS's plots are upstream's debug norms (v0, v* optimised, v* written)
    debug = case["debug"]
    assert norms[0] == pytest.approx({"v0": debug["v0_norm"], "v_star": debug["v_star_norm_orig"],
                                      "written": debug["v_star_norm_real"]}, rel=1e-4)
    assert steps == [case["passes"]] and abs(losses[0] - case["final_loss"]) < 1e-4
    # the anchored MLP share: z - (h - v0) has the reference norm
    v_star = zs[:, 0] - (torch.tensor(case["target_init"]) - torch.tensor(case["v0_mlp"]))
    assert abs(float(v_star.norm()) - r) < 1e-4 * r


def test_rome_variant_matches_upstream(tmp_path):
    case = GOLDEN["nas_rome"]
    hp = golden_hparams(ROMEHyperParams, case, tmp_path)
    res = FixedTemplates(tmp_path, case["context_templates"])
    model, tok = make_model("gpt2", 4, 0), make_tokenizer()
    update = execute_rome(model, tok, eiffel(), hp, res)
    # 6e-7 relative where the goldens were made, 1.2e-5 on an AVX-512 CPU (the chaotic v_lr, as above)
    assert abs(res.norm_reference(model, tok, hp, 1) - case["reference"]) < 1e-4 * case["reference"]
    assert rel(update.u, case["u"]) < 1e-6  # measured 0
    assert rel(update.v_star, case["v_star_anchored"]) < 3e-5  # measured 7.5e-6
    assert rel(update.r, case["right_vector"]) < 3e-5  # measured 8.1e-6
    assert not case["skipped"] and abs(float(update.v_star.norm()) - case["reference"]) < 1e-5
    debug = case["debug"]
    assert update.value_norms() == [pytest.approx({"v0": debug["v0_norm"], "v_star": debug["v_star_norm_orig"],
                                                   "written": debug["v_star_norm_real"]}, rel=3e-5)]


# --------------------------------------------------------------------------------------------
# The reference norm: seeded, cached, made before the first edit


def test_reference_norm_is_seeded_cached_and_keyed_by_its_settings(tmp_path, monkeypatch):
    case = GOLDEN["nas_memit"]
    hp = golden_hparams(MEMITHyperParams, case, tmp_path, value_norm_anchor_samples=6, v_num_grad_steps=5)
    model, tok = make_model("gpt2", 4, 0), make_tokenizer()
    maker = FixedTemplates(tmp_path, ["{}"])
    first = maker.norm_reference(model, tok, hp, 2)
    files = list((tmp_path / "stats").rglob("*.json"))
    assert len(files) == 1 and files[0].parent.name == "norm_anchor"
    stored = json.loads(files[0].read_text())
    assert stored["key"]["n_samples"] == 6 and stored["key"]["seed"] == 0 and len(stored["case_ids"]) == 6
    # the time it took is the run's statistics time (summarize --timing), and is kept with the value
    assert stored["seconds"] > 0 and maker.stats_seconds == stored["seconds"]

    def refuse(*a, **k):
        raise AssertionError("the reference norm must be read from the cache")

    monkeypatch.setattr("editing.norm_reference.value_norms", refuse)
    reader = FixedTemplates(tmp_path, ["{}"])
    assert reader.norm_reference(model, tok, hp, 2) == first  # a new run reads the file, and spends no time on it
    assert reader.stats_seconds == 0.0
    monkeypatch.undo()
    other_seed = FixedTemplates(tmp_path, ["{}"]).norm_reference(model, tok, hp.replace(value_norm_anchor_seed=1), 2)
    other_lr = FixedTemplates(tmp_path, ["{}"]).norm_reference(model, tok, hp.replace(v_lr=0.1), 2)
    assert len({first, other_seed, other_lr}) == 3 and len(list((tmp_path / "stats").rglob("*.json"))) == 3
    # recomputed without the file: the same number (every random choice is seeded)
    for f in (tmp_path / "stats").rglob("*.json"):
        f.unlink()
    assert FixedTemplates(tmp_path, ["{}"]).norm_reference(model, tok, hp, 2) == first


MEMIT_TINY = {"layers": [1, 2], "mom2_update_weight": 100.0, "context_template_length_params": [[10, 5]]}
EXTRAS = {
    "ROME": {},
    "r-ROME": {"consistent_keys": True},
    "WilKE": {"scanning_ceiling": 2},
    "WilKE-approximate": {"scanning_ceiling": 2, "scan": "approximate", "approx_grad_steps": 2, "approx_top_k": 1},
    "MEMIT": MEMIT_TINY,
    "AlphaEdit": {**MEMIT_TINY, "nullspace_threshold": 1e-4, "L2": 1e-2},
    "RECT": {**MEMIT_TINY, "keep_percent": 40, "epsilon": 1e-8},
    "PRUNE": {**MEMIT_TINY, "log_base": 2.718281828459045},
    "ENCORE": {**MEMIT_TINY, "update_norm_lambda": 0.1, "mpes_prob_cutoff": -2},  # NAS rescales its MPES-stopped z's
}


@pytest.mark.parametrize("method", list(EXTRAS))
def test_every_locate_then_edit_method_anchors_its_values(tmp_path, method, monkeypatch):
    world = TinyWorld(tmp_path, "llama")
    alg = {"r-ROME": "ROME", "WilKE-approximate": "WilKE"}.get(method, method)
    hp_dict = rank_one_hparams("llama", 4, **{"fact_token": "subject_last", "v_num_grad_steps": 5, **EXTRAS[method],
                                              "value_norm_anchor": True, "value_norm_anchor_samples": 4,
                                              "value_norm_anchor_dataset": str(world.data_file)})
    algorithm = ALGORITHMS[alg]
    hp = algorithm.load_hparams_class().from_json(world.write_hparams(alg, hp_dict))
    res = EditResources(load_paths(data_dir=str(world.root), stats_dir=str(world.stats_dir)), "tiny-llama", progress=False)
    model, tok = make_model("llama"), make_tokenizer()
    editor = algorithm.make_editor(model, tok, hp, res)
    made = sorted(p.name for p in world.stats_dir.rglob("norm_anchor/*.json"))
    # made when the editor was built, before any edit: per layer (and per setting of WilKE's approximate scan)
    assert len(made) == len(hp.norm_anchor_layers) * (2 if method == "WilKE-approximate" else 1)
    references = {res.norm_reference(model, tok, v, l) for v in hp.norm_anchor_variants for l in hp.norm_anchor_layers}
    with pytest.raises(RuntimeError, match="before the first edit"):  # sealed: never computed on an edited model
        res.norm_reference(model, tok, hp.replace(v_lr=0.01), hp.norm_anchor_layers[0])

    calls = []
    real = norm_anchor.anchor

    def spy(v_star, fallback, reference, skip_factor):
        out = real(v_star, fallback, reference, skip_factor)
        calls.append((reference, skip_factor, out))
        return out

    monkeypatch.setattr(norm_anchor, "anchor", spy)
    request = dict(tiny_records()[0]["requested_rewrite"], case_id=100)
    outcome = editor.edit([request])
    assert calls, f"{method} never anchored its value"
    skip = SKIP_FACTOR if alg not in ("ROME", "WilKE") else ROME_SKIP_FACTOR
    for reference, skip_factor, (value, dropped) in calls:
        assert reference in references and skip_factor == skip
        assert dropped or abs(float(value.norm()) - reference) < 1e-5 * reference
    # the edit records the norms NAS plots: the written v* is one the anchor returned (WilKE's scan
    # anchors every candidate layer's and writes the chosen one's)
    (norms,) = outcome.details["value_norms"]
    assert any(norms["written"] == pytest.approx(float(out.norm()), rel=1e-5) for _, _, (out, _) in calls)
    assert norms["v_star"] > 0 and norms["v0"] > 0
    for name, after in update_norms(model, outcome.orig_weights)["weight_norms"].items():
        assert after == pytest.approx(float(nethook.get_parameter(model, name).norm()), rel=1e-6)
    # nothing new was computed on the edited model: the references are those made at construction
    assert sorted(p.name for p in world.stats_dir.rglob("norm_anchor/*.json")) == made
    # and with the switch off nothing is anchored and nothing is made
    calls.clear()
    off = hp.replace(value_norm_anchor=False)
    outcome = algorithm.make_editor(make_model("llama"), tok, off, EditResources(
        load_paths(stats_dir=str(tmp_path / "off")), "tiny-llama", progress=False)).edit([request])
    assert not calls and not list((tmp_path / "off").rglob("norm_anchor/*.json"))
    (norms,) = outcome.details["value_norms"]  # recorded all the same: written as optimised
    assert norms["written"] == norms["v_star"] > 0


# --------------------------------------------------------------------------------------------
# Bad input and the shipped files


@pytest.mark.parametrize("alg, fname", [("FT", "smollm2-135m.json"), ("KN", "smollm2-135m.json"),
                                        ("MEND", "smollm2-135m.json"), ("KE", "smollm2-135m.json")])
def test_nas_on_a_method_without_value_vectors_fails_saying_why(alg, fname):
    data = json.loads((REPO_ROOT / "hparams" / alg / fname).read_text())
    with pytest.raises(HParamsError, match=r"'value_norm_anchor'.*only to the locate-then-edit methods"):
        ALGORITHMS[alg].load_hparams_class().from_dict({**data, "value_norm_anchor": True}, f"{alg}/{fname}")


def test_nas_on_ft_fails_at_the_cli_before_the_model_is_loaded(tmp_path, caplog, monkeypatch):
    from experiments.evaluate import cli

    world = TinyWorld(tmp_path, "llama")
    data = json.loads((REPO_ROOT / "hparams" / "FT" / "smollm2-135m.json").read_text())
    path = world.write_hparams("FT", {**data, "layers": [1], "value_norm_anchor": True})
    monkeypatch.setattr("util.models.load_model", lambda *a, **k: pytest.fail("the model must not be loaded"))
    caplog.set_level(logging.ERROR)
    assert cli(world.cli_args("FT", path, num_threads=1)) == 2
    assert "applies only to the locate-then-edit methods" in caplog.text


def test_the_nas_hparams_files_switch_it_on_and_prepare_needs_nothing_when_off():
    for alg, name in (("MEMIT", "smollm2-135m_nas.json"), ("AlphaEdit", "smollm2-135m_nas.json"),
                      ("AlphaEdit", "meta-llama_Meta-Llama-3-8B_nas.json")):
        hp = ALGORITHMS[alg].load_hparams_class().from_json(REPO_ROOT / "hparams" / alg / name)
        assert hp.value_norm_anchor and hp.value_norm_anchor_samples == 1000 and hp.value_norm_anchor_seed == 0
    llama = json.loads((REPO_ROOT / "hparams" / "AlphaEdit" / "meta-llama_Meta-Llama-3-8B_nas.json").read_text())
    # SasyaTitech/NAS hparams/NAS/Llama3-8B.json
    assert {k: llama[k] for k in ("layers", "v_lr", "v_num_grad_steps", "clamp_norm_factor", "L2", "v_weight_decay",
                                  "kl_factor", "mom2_update_weight", "nullspace_threshold")} == {
        "layers": [4, 5, 6, 7, 8], "v_lr": 0.1, "v_num_grad_steps": 25, "clamp_norm_factor": 0.75, "L2": 10,
        "v_weight_decay": 0.5, "kl_factor": 0.0625, "mom2_update_weight": 15000, "nullspace_threshold": 0.02}
    # each _nas file is its model's shipped file plus the switch; none for Gemma 3, where NAS does not apply
    # (util/architectures.py check_residual_targets)
    for alg, model in (("MEMIT", "smollm2-135m"), ("AlphaEdit", "smollm2-135m")):
        base = json.loads((REPO_ROOT / "hparams" / alg / f"{model}.json").read_text())
        nas = json.loads((REPO_ROOT / "hparams" / alg / f"{model}_nas.json").read_text())
        assert {k: v for k, v in nas.items() if not k.startswith("value_norm_anchor")} == base
        assert ALGORITHMS[alg].load_hparams_class().from_json(REPO_ROOT / "hparams" / alg / f"{model}_nas.json").value_norm_anchor
    off = MEMITHyperParams.from_json(REPO_ROOT / "hparams" / "MEMIT" / "smollm2-135m.json")
    assert not off.value_norm_anchor and prepare_norm_anchors(None, None, off, None) == {}


def _tiny_gemma3() -> torch.nn.Module:
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    return Gemma3ForCausalLM(config).eval()


def test_nas_is_refused_on_gemma3_before_its_reference_norm_is_made():
    """NAS's r is MEMIT's v* (MLP output plus a residual-stream delta). Gemma 3 puts a norm between the MLP
    and the residual, so r is not a norm of what ROME writes there (gemma-3-270m: r 178.1 at layer 6, ROME's
    own v* 12-19; anchored, edit 1's update was 14x ROME's): refused at the hparams check and by
    prepare_norm_anchors itself, before any rewrite is optimised; ROME without NAS passes."""
    from experiments.run.setup import BadInputError, bad_input
    from util.architectures import ResidualTargetsError, check_hparams_against_model

    model = _tiny_gemma3()
    rome = ROMEHyperParams.from_json(REPO_ROOT / "hparams" / "ROME" / "gemma-3-270m.json").replace(layers=[0], v_loss_layer=1)
    check_hparams_against_model(rome, model, "rome.json")
    nas = rome.replace(value_norm_anchor=True)
    with pytest.raises(ResidualTargetsError, match=r"value_norm_anchor \(NAS\).*post_feedforward_layernorm"):
        check_hparams_against_model(nas, model, "rome_nas.json")
    with pytest.raises(BadInputError) as refused, bad_input("hyperparameters for this model", "another file"):
        check_hparams_against_model(nas, model, "rome_nas.json")
    assert refused.value.fix.startswith("set value_norm_anchor to false")
    with pytest.raises(ResidualTargetsError, match="value_norm_anchor"):
        prepare_norm_anchors(model, None, nas, None)  # no resources: nothing may be computed first


def test_wilke_never_chooses_a_layer_whose_edit_nas_refused():
    """Above 5 r NAS skips a ROME edit: its update is zero, which must not read as the smallest LA."""
    import math

    from editing.value_optimisation import ValueResult
    from rome.rome_main import RankOneUpdate
    from wilke.wilke_main import layer_adaptability

    model = make_model("gpt2", n_layer=2)
    name = "transformer.h.0.mlp.c_proj"

    def update(v_star_norm: float, reference: float, r_scale: float) -> RankOneUpdate:
        v = torch.zeros(64)
        v[0] = v_star_norm
        value = ValueResult(v, torch.zeros(64), v, 1, [0.0], [v])
        return RankOneUpdate(0, name, torch.ones(256) / 16, torch.ones(64) * r_scale, torch.ones(256), v, 1, 0.0,
                             value, torch.zeros(64), reference)

    refused, kept = update(6.0, 1.0, 0.0), update(4.0, 1.0, 0.01)
    assert refused.skipped_by_norm_anchor and not kept.skipped_by_norm_anchor
    assert layer_adaptability(model, refused) == math.inf and 0 < layer_adaptability(model, kept) < math.inf
    assert not update(6.0, None, 0.0).skipped_by_norm_anchor  # NAS off: a zero update is a small one
