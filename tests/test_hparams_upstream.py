"""GPT-2 and GPT-J hparams files against the upstream repositories' files, value by value (issue 14).

Every ``hparams/<ALG>/<model>.json`` for gpt2-medium, gpt2-large, gpt2-xl and EleutherAI_gpt-j-6B
is compared with the file of the same model in the repository the method comes from:

- ROME, FT, KN, MEND, KE: kmeng01/rome, commit 0874014cd9837e4365f3e6f3c71400ef11509e04
- MEMIT:                  kmeng01/memit, commit 80426fd9316cf9a50c5ba15e0912f2c2c5bfe84b
- WilKE:                  ChenhuiHu/WilKE, commit 2aa874b4a3dae915bdebf3ef765ac06d710cc9d6

The upstream values are written out below (not fetched), each file's table naming its source.
The JSON files are read with ``json`` directly, not through the hparams classes. Three kinds of
field are not compared, and each is listed so that a new field cannot slip through unchecked:

- ``PROJECT_ONLY``: fields upstream files do not have (the documented "beyond the reference"
  extras, WilKE's scan settings, MEND/KE trainer settings, ...);
- ``DELIBERATE``: fields both have whose values differ on purpose, with the reason, pinned to
  the project's value so a change to either side is noticed;
- fields only upstream has (MEMIT's ``layer_selection``, MEND/KE's ``n_toks``, ``counterfact``,
  ``zsre``, ``mini``, KN's ``model_name``, ``n_toks``, ``lr_scale``) are never read by this
  project's code and are absent from the project files; they are named in comments.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

HPARAMS_DIR = Path(__file__).resolve().parent.parent / "hparams"
ALGS = ("ROME", "WilKE", "MEMIT", "FT", "KN", "MEND", "KE")
MODEL_PREFIXES = ("gpt2-medium", "gpt2-large", "gpt2-xl", "EleutherAI_gpt-j-6B")

ROME_REPO = "kmeng01/rome@0874014cd9837e4365f3e6f3c71400ef11509e04"
MEMIT_REPO = "kmeng01/memit@80426fd9316cf9a50c5ba15e0912f2c2c5bfe84b"
WILKE_REPO = "ChenhuiHu/WilKE@2aa874b4a3dae915bdebf3ef765ac06d710cc9d6"

# Module templates, as in every upstream GPT-2 / GPT-J ROME, MEMIT, WilKE and FT file.
GPT2_MODULES = {
    "rewrite_module_tmp": "transformer.h.{}.mlp.c_proj",
    "layer_module_tmp": "transformer.h.{}",
    "mlp_module_tmp": "transformer.h.{}.mlp",
    "attn_module_tmp": "transformer.h.{}.attn",
    "ln_f_module": "transformer.ln_f",
    "lm_head_module": "transformer.wte",  # GPT-2's head is tied to the input embeddings
}
GPTJ_MODULES = {
    "rewrite_module_tmp": "transformer.h.{}.mlp.fc_out",
    "layer_module_tmp": "transformer.h.{}",
    "mlp_module_tmp": "transformer.h.{}.mlp",
    "attn_module_tmp": "transformer.h.{}.attn",
    "ln_f_module": "transformer.ln_f",
    "lm_head_module": "lm_head",  # GPT-J's head is a separate Linear (with bias)
}

# Values every upstream ROME-style file (ROME, WilKE) of these four models shares.
ROME_STYLE = {
    "fact_token": "subject_last",
    "v_num_grad_steps": 20,
    "v_lr": 0.5,
    "v_weight_decay": 0.5,
    "kl_factor": 0.0625,
    "mom2_adjustment": True,
    "context_template_length_params": [[5, 10], [10, 10]],
    "mom2_dataset": "wikipedia",
    "mom2_n_samples": 100000,
    "mom2_dtype": "float32",
}


def _rome_style(layers, clamp_norm_factor, v_loss_layer, modules):
    return {
        **ROME_STYLE,
        "layers": layers,
        "clamp_norm_factor": clamp_norm_factor,
        "v_loss_layer": v_loss_layer,
        **modules,
    }


# Values MEMIT's two upstream files share (plus layer_selection "all", which its code never reads).
MEMIT_STYLE = {
    "clamp_norm_factor": 0.75,
    "fact_token": "subject_last",
    "v_lr": 0.5,
    "v_weight_decay": 0.5,
    "kl_factor": 0.0625,
    "mom2_adjustment": True,
    "mom2_dataset": "wikipedia",
    "mom2_n_samples": 100000,
    "mom2_dtype": "float32",
}

FT_STYLE = {"num_steps": 25, "lr": 5e-4, "weight_decay": 0, "kl_factor": 0}

# MEND/KE: the upstream JSON files hold model_name, n_toks, lr_scale (and counterfact, zsre, mini);
# everything else comes from the MEND code base vendored in kmeng01/rome (baselines/mend/config/*.yaml,
# baselines/mend/algs/efk.py) and from the checkpoint names mend_main.py / efk_main.py build:
# f"{model_dir}/mend-{mini}{n_toks}tok-{train_ds}{model}.pt" downloaded from
# f"{REMOTE_ROOT_URL}/data/weights/..." (REMOTE_ROOT_URL https://rome.baulab.info, globals.yml).
MEND_CONFIG = {  # config/config.yaml (cedit, cloc, accumulate_bs, grad_clip, seed) + config/alg/mend.yaml
    "seed": 0,
    "c_edit": 0.1,
    "c_loc": 1.0,
    "accumulate_bs": 10,
    "grad_clip": 100.0,
    "lr": 1e-6,
    "edit_lr": 1e-4,
    "lr_lr": 1e-4,
    "n_hidden": 1,
    "rank": 1920,
    "norm": True,
    "combine": True,
    "shared": True,
}
KE_CONFIG = {  # config/config.yaml + config/alg/efk.yaml (lr) + algs/efk.py (OneShotLearner sizes)
    "seed": 0,
    "c_edit": 0.1,
    "c_loc": 1.0,
    "accumulate_bs": 10,
    "grad_clip": 100.0,
    "lr": 1e-5,
    "hidden_dim": 512,
    "condition_dim": 768,
    "max_scale": 1.0,
}
GPT2_XL_MEND_INNER = [  # config/model/gpt2xl.yaml
    "transformer.h.45.mlp.c_proj.weight",
    "transformer.h.45.mlp.c_fc.weight",
    "transformer.h.46.mlp.c_proj.weight",
    "transformer.h.46.mlp.c_fc.weight",
    "transformer.h.47.mlp.c_proj.weight",
    "transformer.h.47.mlp.c_fc.weight",
]
GPTJ_MEND_INNER = [  # config/model/gptj.yaml
    "transformer.h.25.mlp.fc_in.weight",
    "transformer.h.25.mlp.fc_out.weight",
    "transformer.h.26.mlp.fc_in.weight",
    "transformer.h.26.mlp.fc_out.weight",
    "transformer.h.27.mlp.fc_in.weight",
    "transformer.h.27.mlp.fc_out.weight",
]

# project file -> (upstream repository@commit, upstream path, upstream values of the shared fields)
UPSTREAM: dict[str, tuple[str, str, dict]] = {
    # ROME: kmeng01/rome (kmeng01/memit's and ChenhuiHu/WilKE's hparams/ROME copies hold the same values)
    "ROME/gpt2-medium.json": (ROME_REPO, "hparams/ROME/gpt2-medium.json", _rome_style([8], 3, 23, GPT2_MODULES)),
    "ROME/gpt2-large.json": (ROME_REPO, "hparams/ROME/gpt2-large.json", _rome_style([12], 4, 35, GPT2_MODULES)),
    "ROME/gpt2-xl.json": (ROME_REPO, "hparams/ROME/gpt2-xl.json", _rome_style([17], 4, 47, GPT2_MODULES)),
    "ROME/EleutherAI_gpt-j-6B.json": (
        ROME_REPO, "hparams/ROME/EleutherAI_gpt-j-6B.json", _rome_style([5], 4, 27, GPTJ_MODULES),
    ),
    # WilKE: ChenhuiHu/WilKE (layers: see DELIBERATE for gpt2-xl and GPT-J, whose upstream files hold [])
    "WilKE/gpt2-medium.json": (
        WILKE_REPO, "hparams/WilKE/gpt2-medium.json", _rome_style([8], 3, 23, GPT2_MODULES),
    ),
    "WilKE/gpt2-large.json": (
        WILKE_REPO, "hparams/WilKE/gpt2-large.json", _rome_style([12], 4, 35, GPT2_MODULES),
    ),
    "WilKE/gpt2-xl.json": (
        WILKE_REPO, "hparams/WilKE/gpt2-xl.json",
        {k: v for k, v in _rome_style([], 4, 47, GPT2_MODULES).items() if k != "layers"} | {"scanning_ceiling": 24},
    ),
    "WilKE/EleutherAI_gpt-j-6B.json": (
        WILKE_REPO, "hparams/WilKE/EleutherAI_gpt-j-6B.json",
        {k: v for k, v in _rome_style([], 4, 27, GPTJ_MODULES).items() if k != "layers"} | {"scanning_ceiling": 7},
    ),
    # MEMIT: kmeng01/memit (ChenhuiHu/WilKE's hparams/MEMIT copies hold the same values)
    "MEMIT/gpt2-xl.json": (
        MEMIT_REPO, "hparams/MEMIT/gpt2-xl.json",
        {**MEMIT_STYLE, "layers": [13, 14, 15, 16, 17], "v_num_grad_steps": 20, "v_loss_layer": 47,
         "mom2_update_weight": 20000, **GPT2_MODULES},
    ),
    "MEMIT/EleutherAI_gpt-j-6B.json": (
        MEMIT_REPO, "hparams/MEMIT/EleutherAI_gpt-j-6B.json",
        {**MEMIT_STYLE, "layers": [3, 4, 5, 6, 7, 8], "v_num_grad_steps": 25, "v_loss_layer": 27,
         "mom2_update_weight": 15000, **GPTJ_MODULES},
    ),
    # FT: kmeng01/rome (kmeng01/memit holds the same files). The project's <model>.json is FT-L,
    # upstream's <model>_constr.json. Upstream writes "norm_constraint": false for plain FT; the
    # project writes null (baselines/ft/ft_hparams.py: "None (the reference's false) is plain FT").
    "FT/gpt2-xl.json": (
        ROME_REPO, "hparams/FT/gpt2-xl_constr.json",
        {**FT_STYLE, "layers": [0], "norm_constraint": 5e-4, **GPT2_MODULES},
    ),
    "FT/gpt2-xl_unconstr.json": (
        ROME_REPO, "hparams/FT/gpt2-xl_unconstr.json",
        {**FT_STYLE, "layers": [1], "norm_constraint": None, **GPT2_MODULES},
    ),
    "FT/EleutherAI_gpt-j-6B.json": (
        ROME_REPO, "hparams/FT/EleutherAI_gpt-j-6B_constr.json",
        {**FT_STYLE, "layers": [0], "norm_constraint": 5e-5, **GPTJ_MODULES},
    ),
    "FT/EleutherAI_gpt-j-6B_unconstr.json": (
        ROME_REPO, "hparams/FT/EleutherAI_gpt-j-6B_unconstr.json",
        {**FT_STYLE, "layers": [21], "norm_constraint": None, **GPTJ_MODULES},
    ),
    # KN: kmeng01/rome hparams/KN/gpt2-xl.json (also model_name, n_toks 10, lr_scale 1.0, unread here);
    # module templates from its KnowledgeNeurons class ("transformer.h" + "mlp.c_proj" for GPT models).
    "KN/gpt2-xl.json": (
        ROME_REPO, "hparams/KN/gpt2-xl.json",
        {"steps": 20, "batch_size": 20, "adaptive_threshold": 0.2, "p": 0.4,
         "rewrite_module_tmp": "transformer.h.{}.mlp.c_proj", "layer_module_tmp": "transformer.h.{}"},
    ),
    # MEND: kmeng01/rome hparams/MEND/<model>.json (n_toks 10, counterfact/zsre/mini false)
    "MEND/gpt2-xl.json": (
        ROME_REPO, "hparams/MEND/gpt2-xl.json",
        {**MEND_CONFIG, "model_name": "gpt2-xl", "lr_scale": 1.0, "inner_params": GPT2_XL_MEND_INNER,
         "archive": "baselines/mend/weights/mend-10tok-gpt2-xl.pt",
         "archive_url": "https://rome.baulab.info/data/weights/mend-10tok-gpt2-xl.pt"},
    ),
    "MEND/EleutherAI_gpt-j-6B.json": (
        ROME_REPO, "hparams/MEND/EleutherAI_gpt-j-6B.json",
        {**MEND_CONFIG, "model_name": "EleutherAI/gpt-j-6B", "lr_scale": 1.0, "inner_params": GPTJ_MEND_INNER,
         "archive": "baselines/mend/weights/mend-10tok-gpt-j-6b.pt",
         "archive_url": "https://rome.baulab.info/data/weights/mend-10tok-gpt-j-6b.pt"},
    ),
    # KE: kmeng01/rome hparams/KE/gpt2-xl.json (n_toks 1, lr_scale 1.0, counterfact/zsre false)
    "KE/gpt2-xl.json": (
        ROME_REPO, "hparams/KE/gpt2-xl.json",
        {**KE_CONFIG, "model_name": "gpt2-xl", "inner_params": GPT2_XL_MEND_INNER,
         "archive": "baselines/efk/weights/efk-1tok-gpt2-xl.pt",
         "archive_url": "https://rome.baulab.info/data/weights/efk-1tok-gpt2-xl.pt"},
    ),
}

# GPT-2/GPT-J files without an upstream counterpart (no upstream repository has the model's file).
NO_UPSTREAM = {
    "KN/EleutherAI_gpt-j-6B.json": "kmeng01/rome has hparams/KN/gpt2-xl.json only",
    "KE/EleutherAI_gpt-j-6B.json": "kmeng01/rome has hparams/KE/gpt2-xl*.json only (efk_main.py loads gpt2-xl weights)",
}

# Shared fields whose values differ on purpose: (file, field) -> (upstream value, project value, reason).
DELIBERATE = {
    ("WilKE/gpt2-xl.json", "layers"): (
        [], [17],
        "upstream: 'Just keep it empty' (wilke_hparams.py), overwritten by the scan; the project's "
        "WilKE ignores it (candidate layers come from scanning_ceiling) but ROMEHyperParams.validate "
        "requires a layer, so it carries ROME's layer",
    ),
    ("WilKE/EleutherAI_gpt-j-6B.json", "layers"): (
        [], [5], "as for WilKE/gpt2-xl.json: upstream keeps it empty, the project needs ROME's layer there",
    ),
    ("KN/gpt2-xl.json", "refine"): (
        False, True,
        "upstream's KN runs on the bare prompt alone, where refine is a no-op (a neuron coarse in its "
        "one prompt is in more than p * 1 prompts); the project adds context-template prompts "
        "(baselines/kn/kn_main.py, step 1) and refines over them",
    ),
}

# Fields only the project's files have (never compared); upstream has no such field.
ROME_EXTRAS = {"consistent_keys", "mom2_max_length", "context_template_seed", "v_early_stop_loss", "implementation"}
EDITOR_TRAINING = {"train_ds", "train_steps", "val_interval", "val_records", "max_length", "implementation",
                   "trust_archive_pickle"}
PROJECT_ONLY = {
    "ROME": ROME_EXTRAS,
    # scanning_ceiling: upstream's gpt2-medium/large WilKE files lack it (its WilKEHyperParams requires it)
    "WilKE": ROME_EXTRAS | {"scanning_ceiling", "scan", "approx_grad_steps", "approx_top_k"},
    # upstream memit_main.py hard-codes the context templates as [(10, 5)] (length 10, 5 samples)
    "MEMIT": ROME_EXTRAS | {"context_template_length_params"},
    "FT": {"batch_size", "early_stop_loss"},
    "KN": {"context_template_length_params", "context_template_seed", "edit_scale", "old_token", "layers",
           "implementation", "ln_f_module", "lm_head_module"},
    # val_interval: the MEND code base's config.yaml has 5000 (and max_iters 1000000, val_steps 500)
    "MEND": EDITOR_TRAINING,
    "KE": EDITOR_TRAINING,
}


def _same(a, b) -> bool:
    """JSON equality that does not let True stand for 1 (or 0 for False)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if a != b:
        return False
    return type(a) is type(b) or {type(a), type(b)} <= {int, float}


def _load(rel: str) -> dict:
    return json.loads((HPARAMS_DIR / rel).read_text())


def _gpt_files() -> list[str]:
    return sorted(
        f"{alg}/{p.name}"
        for alg in ALGS
        for p in (HPARAMS_DIR / alg).glob("*.json")
        if p.name.startswith(MODEL_PREFIXES)
    )


def test_every_gpt2_and_gptj_file_is_compared_or_has_no_upstream():
    files = _gpt_files()
    assert files, f"no GPT-2/GPT-J hparams files found under {HPARAMS_DIR}"
    missing = [f for f in files if f not in UPSTREAM and f not in NO_UPSTREAM]
    assert not missing, f"GPT-2/GPT-J hparams files with no upstream entry in this test: {missing}"
    stale = [f for f in (*UPSTREAM, *NO_UPSTREAM) if f not in files]
    assert not stale, f"entries for files that no longer exist: {stale}"


@pytest.mark.parametrize("rel", sorted(UPSTREAM))
def test_values_equal_upstream(rel):
    repo, path, expected = UPSTREAM[rel]
    project = _load(rel)
    diffs = []
    for field, value in expected.items():
        if (rel, field) in DELIBERATE:
            continue
        if field not in project:
            diffs.append(f"{field}: missing, upstream {value!r}")
        elif not _same(project[field], value):
            diffs.append(f"{field}: {project[field]!r}, upstream {value!r}")
    assert not diffs, f"hparams/{rel} differs from {repo} {path}:\n  " + "\n  ".join(diffs)


@pytest.mark.parametrize("rel", sorted(UPSTREAM))
def test_no_field_goes_unchecked(rel):
    """Every field of the file is compared, a recorded deliberate difference, or a project extra."""
    alg = rel.split("/")[0]
    checked = set(UPSTREAM[rel][2]) | {f for (r, f) in DELIBERATE if r == rel}
    unchecked = sorted(set(_load(rel)) - checked - PROJECT_ONLY[alg])
    assert not unchecked, f"hparams/{rel}: fields neither compared with upstream nor listed as extras: {unchecked}"


@pytest.mark.parametrize("key", sorted(DELIBERATE), ids=lambda k: f"{k[0]}:{k[1]}")
def test_deliberate_differences_are_as_recorded(key):
    rel, field = key
    upstream, project_value, reason = DELIBERATE[key]
    assert reason and not _same(upstream, project_value)
    assert _same(_load(rel).get(field), project_value), (
        f"hparams/{rel} {field} is {_load(rel).get(field)!r}; this test records {project_value!r} as a "
        f"deliberate difference from upstream {upstream!r} ({reason}); update the record or the file"
    )


def test_gpt2_medium_clamp_norm_factor_is_upstreams_3():
    """Issue 14: ROME, MEMIT and WilKE all give gpt2-medium clamp_norm_factor 3 (gpt2-large/xl and GPT-J: 4)."""
    for rel in ("ROME/gpt2-medium.json", "WilKE/gpt2-medium.json"):
        assert _same(_load(rel)["clamp_norm_factor"], 3), rel
