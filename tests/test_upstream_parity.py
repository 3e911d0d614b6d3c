"""Parity with the papers' code: ROME and MEMIT against golden numbers from upstream (issue 14, item 6).

``tests/fixtures/upstream_golden.json`` holds what kmeng01/rome and kmeng01/memit (commits named in
the fixture) computed on this project's tiny GPT-2 (``make_model("gpt2", n_layer=4, seed=0)``), with
the context templates and the second-moment statistics fixed, on CPU; ``upstream_golden.md`` says
how it was made and how their code was patched (device strings and the transformers-5 block output,
nothing in the arithmetic). Here the harness runs the same edits with the same fixed inputs and
must agree with those numbers:

- ``rome_subject_last``: ROME as its authors run it (subject_last, templates "{}" plus two
  prefixes, KL prompt "{} is a", the bare-prompt key in the rank-one solve);
- ``rome_last_equal_lengths``: fact_token "last", the one such setting where upstream's batch
  indexing is sound (see the fixture's note); this edit does flip the tiny model to " Rome";
- ``memit_subject_last``: MEMIT on layers 1-2 for two requests (keys averaged per template group,
  z at block 2's output, clamp 0.75 active, lambda 100, residual spread over the layers left).

Tolerances are relative (||a - b|| / ||b||); the measured disagreement is given by each bound.
Both of the harness's implementations ("fast" and "reference") are checked.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

# --- harness imports: every project name this test uses (module paths may move; update here) ---
from memit import MEMITHyperParams, execute_memit
from rome import ROMEHyperParams, execute_rome

try:
    from editing.covariance import FactorisedCovariance
    from editing.resources import EditResources
except ImportError:  # layout before the editing/ package
    from rome.resources import EditResources, FactorisedCovariance
from util.tiny_models import EIFFEL_REQUEST, TINY_RECORDS, make_model, make_tokenizer

# ------------------------------------------------------------------------------------------------

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "upstream_golden.json"
GOLDEN = json.loads(FIXTURE.read_text())
IMPLEMENTATIONS = ("fast", "reference")


def covariance(layer: int) -> torch.Tensor:
    """The fixed statistics of one layer, by the fixture's recipe (float32, as upstream's stats)."""
    spec = GOLDEN["covariance"]
    g = torch.Generator().manual_seed(spec["seed_base"] + layer)
    x = torch.randn((spec["n_samples"], spec["d"]), generator=g, dtype=torch.float64) * spec["scale"]
    c = x.T @ x / spec["n_samples"] + spec["jitter"] * torch.eye(spec["d"], dtype=torch.float64)
    return c.to(torch.float32)


class RecordingCovariance(FactorisedCovariance):
    """The harness's covariance, remembering the right-hand sides it solves for (ROME's k*)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.solved: list[torch.Tensor] = []

    def solve(self, rhs):
        self.solved.append(rhs.detach().clone())
        return super().solve(rhs)


class FixedResources(EditResources):
    """EditResources whose context templates and covariances are the fixture's fixed inputs."""

    def __init__(self, templates: list[str], n_layer: int):
        super().__init__(None, "tiny-gpt2-upstream-parity")
        self.fixed_templates = list(templates)
        self.n_layer = n_layer
        self.made: dict[str, RecordingCovariance] = {}

    def context_templates(self, model, tok, hparams):
        return list(self.fixed_templates)

    def covariances(self, model, tok, hparams, layer_names, keep_matrix=False):
        layer_of = {hparams.rewrite_module_tmp.format(l): l for l in range(self.n_layer)}
        for name in layer_names:
            if name not in self.made or (keep_matrix and self.made[name].matrix is None):
                self.made[name] = RecordingCovariance(covariance(layer_of[name]), keep_matrix=keep_matrix, name=name)
        return {name: self.made[name] for name in layer_names}


def rel(a, b) -> float:
    a = torch.as_tensor(a, dtype=torch.float64).detach()
    b = torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).norm() / b.norm())


def harness_hparams(cls, case: dict, implementation: str):
    hp = {k: v for k, v in case["hparams"].items() if k not in case["upstream_only"]}
    hp.update(case["harness_extra"], implementation=implementation)
    if cls is MEMITHyperParams:  # the fixed templates stand for the sampled ones, grouped by their count
        hp["context_template_prompts"] = None
    return cls.from_dict(hp)


@pytest.fixture
def tiny():
    """A fresh model per test, so that a failure cannot leak an edited weight into the next."""
    return make_model("gpt2", n_layer=4, seed=0), make_tokenizer()


def test_fixed_covariance_is_regenerated_exactly():
    """The recipe gives bit-for-bit the matrices upstream was given (else nothing below is comparable)."""
    for layer, check in GOLDEN["covariance"]["checksums_of_float32_matrix"].items():
        c = covariance(int(layer)).double()
        assert float(c.sum()) == check["sum"]
        assert float(c.trace()) == check["trace"]
        assert c[0, :4].tolist() == check["row0_first4"]


def rome_errors(tiny, case_name: str, implementation: str) -> tuple[dict[str, float], object, dict]:
    """Relative disagreement of the harness's ROME with upstream, per quantity."""
    case = GOLDEN["cases"][case_name]
    up = case["upstream"]
    model, tok = tiny
    hp = harness_hparams(ROMEHyperParams, case, implementation)
    res = FixedResources(case["templates"], n_layer=4)
    update = execute_rome(model, tok, EIFFEL_REQUEST, hp, res)
    (cov,) = res.made.values()
    assert cov.solved, "the harness no longer solves C u = k* through FactorisedCovariance.solve: update how k* is read"
    got = {"k_star": cov.solved[0], "u": update.u, "k_bare": update.key, "v_star": update.v_star, "r": update.r}
    errors = {k: rel(v, up[k]) for k, v in got.items()}
    delta = update.delta_out_in().double()
    errors["update"] = abs(float(delta.norm()) - up["update_norm"]) / up["update_norm"]
    errors["update_slice"] = rel(delta[:5, :5], up["update_slice_out_in_5x5"])
    return errors, update, up


# Relative tolerances. In comments: the largest disagreement measured over both cases and both
# implementations (CPU, torch 2.13, transformers 5.23, one thread). k* and the bare-prompt key are
# bit-identical; u differs by upstream's float32 torch.inverse against the float64 Cholesky solve
# here; v*, r and the update by float32 rounding carried through 24 Adam steps.
ROME_TOL = {
    "k_star": 1e-6,  # measured 0
    "u": 1e-6,  # measured 3.3e-7
    "k_bare": 1e-6,  # measured 0
    "v_star": 1e-5,  # measured 1.3e-6
    "r": 1e-5,  # measured 1.3e-6
    "update": 1e-5,  # ||Delta||_F, measured 1.3e-7
    "update_slice": 1e-5,  # Delta[:5, :5], measured 1.7e-6
}


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("case_name", ["rome_subject_last", "rome_last_equal_lengths"])
def test_rome_matches_upstream(tiny, case_name, implementation):
    errors, update, up = rome_errors(tiny, case_name, implementation)
    bad = {k: e for k, e in errors.items() if e > ROME_TOL[k]}
    assert not bad, f"{case_name}/{implementation}: relative disagreement with upstream {bad} (all: {errors})"
    assert update.steps == up["passes"]
    assert update.final_loss == pytest.approx(up["final_loss"], rel=1e-5)


# measured over both implementations: zs 2.1e-7, keys 1.8e-7, resid 3.4e-7, adj_keys 1.9e-7,
# ||Delta|| 1.6e-7, Delta[:5, :5] 3.6e-7 (keys are not bit-identical: upstream reads all requests'
# templates in one padded batch, the harness one template group at a time)
MEMIT_TOL = {"zs": 1e-5, "keys": 1e-6, "resid": 1e-5, "adj_keys": 1e-6, "update": 1e-5, "update_slice": 1e-5}


def memit_errors(tiny, implementation: str, v_batch_tokens: int) -> tuple[dict[str, float], object, dict]:
    """Relative disagreement of the harness's MEMIT with upstream, per quantity and layer (the zs
    optimised in one batch, or one request at a time with ``v_batch_tokens`` 0, as upstream does)."""
    case = GOLDEN["cases"]["memit_subject_last"]
    up = case["upstream"]
    model, tok = tiny
    hp = harness_hparams(MEMITHyperParams, case, implementation).replace(v_batch_tokens=v_batch_tokens)
    res = FixedResources(case["templates"], n_layer=4)
    subject, prompt, new, true = TINY_RECORDS[1]
    second = {"case_id": 101, "prompt": prompt, "subject": subject,
              "target_new": {"str": new}, "target_true": {"str": true}}
    assert [EIFFEL_REQUEST, second] == case["requests"]
    update = execute_memit(model, tok, [EIFFEL_REQUEST, second], hp, res)
    errors = {"zs": rel(update.zs, up["zs"])}
    for delta in update.deltas.values():
        ul = up["layers"][str(delta.layer)]
        d = delta.delta_out_in().double()
        errors[f"keys@{delta.layer}"] = rel(delta.keys, ul["keys"])
        errors[f"resid@{delta.layer}"] = rel(delta.resid, ul["resid"])
        errors[f"adj_keys@{delta.layer}"] = rel(delta.adj_keys, ul["adj_keys"])
        errors[f"update@{delta.layer}"] = abs(float(d.norm()) - ul["update_norm"]) / ul["update_norm"]
        errors[f"update_slice@{delta.layer}"] = rel(d[:5, :5], ul["update_slice_out_in_5x5"])
    return errors, update, up


@pytest.mark.parametrize("v_batch_tokens", [4096, 0], ids=["batched", "loop"])
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_memit_matches_upstream(tiny, implementation, v_batch_tokens):
    errors, update, up = memit_errors(tiny, implementation, v_batch_tokens)
    assert list(update.z_steps) == up["z_passes"]
    assert [d.layer for d in update.deltas.values()] == [int(l) for l in up["layers"]]
    bad = {k: e for k, e in errors.items() if e > MEMIT_TOL[k.split("@")[0]]}
    assert not bad, f"memit/{implementation}: relative disagreement with upstream {bad} (all: {errors})"
