"""WISE on tiny models: EasyEdit's side memory, thresholds, shards, merge and routing reproduced; the
router sends edited prompts to the side memory and unrelated ones to the untouched layer; weights
untouched; memory bytes per edit; a killed run resumed with its memory."""
from __future__ import annotations

import itertools
import json

import pytest
import torch

from baselines.wise import SideMemory, WISEHyperParams, apply_wise_to_model
from baselines.wise.editor import WISEEditor
from baselines.wise.merging import ties_merge
from baselines.wise.router import choose, side_output
from dsets.records import DataFormatError
from editing.resources import EditResources
from experiments.store.checkpoints import load_editor_state
from tests.memory_helpers import b64_tensor, fixture, killed_and_resumed, request, write_unrelated
from util import nethook
from util.architectures import ARCHITECTURES, check_hparams_against_model
from util.globals import REPO_ROOT, load_paths
from util.hparams import HParamsError
from util.scoring import prompt_ids, score_targets
from util.tiny_models import TinyWorld, make_model, make_tokenizer

MODULE = "model.layers.{}.mlp.down_proj"


def wise_dict(**overrides) -> dict:
    spec = ARCHITECTURES["llama"]
    hp = {"layer": 2, "edit_module_tmp": MODULE, "layer_module_tmp": spec.layer_module_tmp, "ln_f_module": spec.ln_f_module,
          "edit_lr": 1.0, "n_iter": 30, "mask_ratio": 0.2, "act_margin": [0.5, 2.0, 1.0], "act_ratio": 0.5,
          "norm_constraint": 1.0, "save_freq": 2, "merge_freq": 4, "densities": 0.53, "weights": 1.0}
    return {**hp, **overrides}


def resources(tmp_path) -> EditResources:
    rows = [{"loc": f"nq question: who wrote book number {i}", "loc_ans": "the egyptians"} for i in range(3)]
    (tmp_path / "zsre_mem_train.json").write_text(json.dumps(rows))
    return EditResources(load_paths(data_dir=str(tmp_path), stats_dir=str(tmp_path / "stats")), "tiny", progress=False)


def last_logits(model, tok, prompt: str) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([prompt_ids(tok, prompt)])).logits[0, -1]


def choices(editor: WISEEditor, prompts: list[str]) -> list[int]:
    """The router's decision for each prompt alone: 0 the layer, 1 the side memory, 2.. a stored shard."""
    module = nethook.get_module(editor.model, editor.hparams.module_name)
    out = []
    for prompt in prompts:
        with torch.no_grad(), nethook.Trace(editor.model, editor.hparams.module_name, retain_input=True) as tr:
            editor.model(input_ids=torch.tensor([prompt_ids(editor.tok, prompt)]))
        real = torch.ones(tr.output.shape[:2], dtype=torch.bool)
        choice, _ = choose(editor.memory, module, editor.act, editor.hparams.act_ratio, tr.input, tr.output, real)
        out.append(int(choice[0]))
    return out


def test_side_memory_thresholds_shards_merge_and_routing_are_easyedits(tmp_path, monkeypatch):
    """EasyEdit 14cea82 WISE (retrieve, one WISE object across edits) on the same tiny Llama
    (tests/fixtures/memory_upstream.md): W' after every edit, each shard's threshold, the shards stored
    at edits 2 and 4, their TIES merge at edit 4, and every probe's routing decision and logits."""
    torch.set_num_threads(1)
    gold = fixture("wise_upstream.json")
    torch.manual_seed(0)
    model, tok = make_model("llama", width=32), make_tokenizer()
    h = gold["hparams"]
    hp = WISEHyperParams.from_dict(wise_dict(**{k: h[k] for k in ("edit_lr", "n_iter", "mask_ratio", "act_ratio",
                                                                   "norm_constraint", "save_freq", "merge_freq", "densities",
                                                                   "weights")}, act_margin=[h["alpha"], h["beta"], h["gamma"]],
                                             implementation="reference"))
    editor = WISEEditor(model, tok, hp, resources(tmp_path))
    editor.templates, editor.unrelated = gold["templates"], [e["unrelated"] for e in gold["edits"]]
    masks = [e["mask"] for e in gold["edits"]]

    def upstream_mask(memory: SideMemory, hparams: WISEHyperParams) -> None:  # numpy's draws, recorded
        if memory.n_edits % hparams.save_freq == 0:
            mask = torch.zeros(memory.original.numel(), dtype=torch.bool)
            mask[masks[memory.n_edits]] = True
            memory.mask = mask.view_as(memory.original)

    monkeypatch.setattr(SideMemory, "start_edit", upstream_mask)
    for step in gold["edits"]:
        outcome = editor.edit([request(step["prompt"], step["target"])])
        memory = editor.memory
        assert outcome.orig_weights == {} and memory.n_edits == step["n_edits"]
        # bit-identical where the goldens were made; rounding-level on another CPU's kernels (AVX-512)
        torch.testing.assert_close(memory.weight.view(-1), b64_tensor(step["side_weight"]), rtol=1e-4, atol=1e-7)
        assert memory.threshold == step["threshold"] and memory.memory_thresholds == step["memory_thresholds"]
        assert [torch.allclose(m.view(-1), b64_tensor(g), rtol=1e-4, atol=1e-7)
                for m, g in zip(memory.memories, step["memories"])] == [True] * len(step["memories"])
        assert choices(editor, [p["prompt"] for p in step["probes"]]) == [p["chosen"] for p in step["probes"]]
        with editor.for_evaluation():
            for probe in step["probes"]:
                logits = last_logits(model, tok, probe["prompt"])
                if "logits" in probe:
                    torch.testing.assert_close(logits, b64_tensor(probe["logits"]), rtol=1e-4, atol=1e-5)
                else:
                    assert int(logits.argmax()) == probe["argmax"]
    assert [len(e["memories"]) for e in gold["edits"]] == [0, 1, 1, 1, 1]  # stored at 2; at 4 stored, then merged
    assert sorted({p["chosen"] for e in gold["edits"] for p in e["probes"]}) == [1, 2]


def test_edits_take_through_the_side_memory_and_the_weights_stay(tmp_path):
    torch.set_num_threads(1)
    model, tok = make_model("llama"), make_tokenizer()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    edits = [("The Eiffel Tower is located in the city of", " Rome"), ("Danielle Darrieux's mother tongue is", " English")]
    _, orig, editor = apply_wise_to_model(model, tok, [request(p, t) for p, t in edits], WISEHyperParams.from_dict(
        wise_dict(save_freq=10, merge_freq=20)), resources=resources(tmp_path))
    assert orig == {} and all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert choices(editor, [p for p, _ in edits]) == [1, 1]
    with editor.for_evaluation():
        assert [score_targets(model, tok, [p], [t])[0].correct for p, t in edits] == [True, True]
    assert [score_targets(model, tok, [p], [t])[0].correct for p, t in edits] == [False, False]  # router off


def token_inputs(model, tok, prompts: list[str], module_name: str) -> torch.Tensor:
    rows = []
    for prompt in prompts:
        with torch.no_grad(), nethook.Trace(model, module_name, retain_input=True) as tr:
            model(input_ids=torch.tensor([prompt_ids(tok, prompt)]))
        rows.append(tr.input[0])
    return torch.cat(rows)


def test_router_sends_unrelated_prompts_to_the_layer_and_edited_ones_to_the_side_memory(tmp_path):
    """A hand-made side memory: W' = W + u v^T with v orthogonal to every token input of the unrelated
    prompts, so their score is 0 and the layer answers them, bit for bit; the edited prompts' tokens
    have a component along v, score above the threshold and get W'."""
    torch.set_num_threads(1)
    model, tok = make_model("llama"), make_tokenizer()
    editor = WISEEditor(model, tok, WISEHyperParams.from_dict(wise_dict()), resources(tmp_path))
    edited = ["The Eiffel Tower is located in the city of", "Danielle Darrieux's mother tongue is"]
    unrelated = ["Berlin is the capital of", "Apple A5 was created by", "Microsoft was founded by"]
    name = editor.hparams.module_name
    span = torch.linalg.svd(token_inputs(model, tok, unrelated, name).double(), full_matrices=True).Vh
    rank = int(torch.linalg.matrix_rank(token_inputs(model, tok, unrelated, name).double()))
    free = span[rank:]  # directions no unrelated token input has
    v = free.T @ (free @ token_inputs(model, tok, edited, name).double().mean(0))
    u = torch.randn(editor.memory.original.shape[0], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    editor.memory.weight = editor.memory.original + (20 * torch.outer(u, v / v.norm())).float()
    editor.memory.threshold = 0.01
    plain = {p: last_logits(model, tok, p) for p in unrelated + edited}
    assert choices(editor, edited) == [1, 1] and choices(editor, unrelated) == [0, 0, 0]
    with editor.for_evaluation():
        assert all(torch.equal(last_logits(model, tok, p), plain[p]) for p in unrelated)
        assert not any(torch.allclose(last_logits(model, tok, p), plain[p]) for p in edited)
    for ratio, expected in ((None, [1, 1, 0, 0, 0]), (1e6, [0] * 5)):  # the run's act_ratio, then one no score reaches
        seen: list[int] = []
        with editor.routed(ratio, observe=lambda choice: seen.extend(choice.tolist())):
            for p in edited + unrelated:
                last_logits(model, tok, p)
        assert seen == expected
    editor.memory.threshold = 1e9  # a side memory without edits answers nothing
    assert choices(editor, edited) == [0, 0]


def test_each_sequence_of_a_padded_batch_is_routed_alone(tmp_path):
    """Upstream routes a batch by its mean score; here a batch answers as each of its rows alone would."""
    torch.set_num_threads(1)
    model, tok = make_model("llama"), make_tokenizer()
    edited, unrelated = "The Eiffel Tower is located in the city of", "Berlin is the capital of"
    _, _, editor = apply_wise_to_model(model, tok, [request(edited, " Rome")], WISEHyperParams.from_dict(wise_dict()),
                                       resources=resources(tmp_path))
    with editor.for_evaluation():
        alone = [score_targets(model, tok, [p], [" Rome"])[0] for p in (edited, unrelated)]
        together = score_targets(model, tok, [edited, unrelated], [" Rome", " Rome"])
    assert [s.correct for s in together] == [s.correct for s in alone] == [True, False]
    assert [s.nll for s in together] == pytest.approx([s.nll for s in alone], abs=1e-5)


def test_memory_bytes_grow_by_one_matrix_per_stored_shard_and_shrink_on_merge(tmp_path):
    """No bytes per edit inside a shard; one matrix (4 x numel for float32) and its threshold per
    stored shard; the merge of save/merge shards leaves one."""
    torch.set_num_threads(1)
    model, tok = make_model("llama"), make_tokenizer()
    editor = WISEEditor(model, tok, WISEHyperParams.from_dict(wise_dict(n_iter=2)), resources(tmp_path))
    sizes = [editor.memory.nbytes]
    for prompt in ("Berlin is the capital of", "Apple A5 was created by", "Toko Yasuda plays the", "Tokyo is the capital of"):
        editor.edit([request(prompt, " Rome")])
        sizes.append(editor.memory.nbytes)
    matrix = 4 * editor.memory.original.numel() + 8
    assert [b - a for a, b in itertools.pairwise(sizes)] == [0, matrix, 0, 0]
    assert len(editor.memory.memories) == 1 and editor.memory.n_merges == 1


@pytest.mark.parametrize("arch, name", [("gpt2", "transformer.h.1.mlp.c_fc"), ("gptj", "transformer.h.1.mlp.fc_out"),
                                        ("llama", "model.layers.1.mlp.down_proj")])
def test_a_memory_holding_the_layers_own_weight_reproduces_its_output(arch, name):
    """GPT-2's Conv1D (x W + b) and GPT-J's biased fc_out included (upstream drops GPT-J's bias)."""
    model, tok = make_model(arch), make_tokenizer()
    module = nethook.get_module(model, name)
    with torch.no_grad(), nethook.Trace(model, name, retain_input=True) as tr:
        model(input_ids=torch.tensor([prompt_ids(tok, "The Eiffel Tower is located in")]))
    torch.testing.assert_close(side_output(module, tr.input, module.weight), tr.output, rtol=0, atol=1e-6)


def test_ties_merge_keeps_the_largest_changes_and_the_elected_sign():
    base = torch.zeros(2, 2)
    a = torch.tensor([[1.0, -4.0], [0.1, 2.0]])
    b = torch.tensor([[3.0, 1.0], [-0.2, -1.0]])
    # density 0.5 keeps two entries of each change: a's -4 and 2, b's 3 and 1. At (0, 1) the elected
    # sign is that of 0.5 (-4) + 0.5 (1) < 0, so only a's -4 counts there; (1, 0) keeps nothing.
    merged = ties_merge(base, [a, b], [0.5, 0.5], 0.5)
    assert torch.equal(merged, torch.tensor([[3.0, -4.0], [0.0, 2.0]]))


def test_state_round_trips(tmp_path):
    torch.set_num_threads(1)
    model, tok = make_model("llama"), make_tokenizer()
    editor = WISEEditor(model, tok, WISEHyperParams.from_dict(wise_dict(n_iter=2)), resources(tmp_path))
    for prompt in ("Berlin is the capital of", "Apple A5 was created by", "Toko Yasuda plays the"):
        editor.edit([request(prompt, " Rome")])
    fresh = WISEEditor(model, tok, editor.hparams, editor.resources)
    fresh.load_state_dict({k: v.clone() for k, v in editor.state_dict().items()})
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), editor.state_dict().values()))
    assert fresh.templates == editor.templates


@pytest.mark.parametrize("field, value", [("act_ratio", 0), ("act_ratio", -0.5), ("mask_ratio", 0), ("mask_ratio", 1.5),
                                          ("act_margin", [0.5, 0.0, 1.0]), ("merge_freq", 3), ("save_freq", 0),
                                          ("densities", 2.0), ("norm_constraint", 0), ("layer", -2)])
def test_bad_hparams_name_the_field(field, value):
    with pytest.raises(HParamsError, match=f"'{field}'|'beta'|'save_freq'"):
        WISEHyperParams.from_dict(wise_dict(**{field: value}))


def test_a_layer_outside_the_model_and_a_missing_unrelated_file_fail_before_any_edit(tmp_path):
    with pytest.raises(HParamsError, match="'layer' is 7"):
        check_hparams_against_model(WISEHyperParams.from_dict(wise_dict(layer=7)), make_model("llama"), "WISE/tiny.json")
    (tmp_path / "zsre_mem_train.json").write_text(json.dumps([{"loc": "nq question: who"}]))
    res = EditResources(load_paths(data_dir=str(tmp_path), stats_dir=str(tmp_path)), "tiny", progress=False)
    with pytest.raises(DataFormatError, match="'loc_ans'"):
        WISEEditor(make_model("llama"), make_tokenizer(), WISEHyperParams.from_dict(wise_dict()), res)


def test_shipped_files_carry_easyedits_values():
    """EasyEdit 14cea82 hparams/WISE/{gpt2-xl,gpt-j-6B,llama3-8b}.yaml."""
    expected = {"gpt2-xl": (8, "transformer.h.{}.mlp.c_fc", 1.0, 40, [5.0, 20.0, 10.0], 0.8),
                "EleutherAI_gpt-j-6B": (21, "transformer.h.{}.mlp.fc_out", 1.0, 70, [15.0, 40.0, 20.0], 0.88),
                "meta-llama_Meta-Llama-3-8B": (29, MODULE, 0.9, 30, [2.0, 20.0, 10.0], 0.5)}
    for model, values in expected.items():
        hp = json.loads((REPO_ROOT / "hparams" / "WISE" / f"{model}.json").read_text())
        fields = ("layer", "edit_module_tmp", "edit_lr", "n_iter", "act_margin", "act_ratio")
        assert tuple(hp[f] for f in fields) == values
        shared = ("mask_ratio", "norm_constraint", "save_freq", "merge_freq", "densities", "weights")
        assert tuple(hp[f] for f in shared) == (0.2, 1.0, 500, 1000, 0.53, 1.0)


def cli_args(world: TinyWorld, hp, name: str, **flags) -> list[str]:
    flags = {"edit_times": 4, "num_threads": 1, "checkpoint_every": 100, "dir_name": name, **flags}
    return world.cli_args("WISE", hp, **flags)


def test_cli_sequential_run_killed_and_resumed_keeps_the_side_memory(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    world = TinyWorld(tmp_path, "llama")
    write_unrelated(world)
    hp = world.write_hparams("WISE", wise_dict(n_iter=10, save_freq=2, merge_freq=4))
    whole, resumed = killed_and_resumed(world, lambda name: cli_args(world, hp, name, protocol="sequential"), WISEEditor,
                                        monkeypatch)
    assert resumed == whole and max(whole) == "evaluation_after_edit_4.json"
    assert [whole[f"batch_{b}.json"]["edit"]["shard_events"] for b in (1, 2, 3, 4)] == [[], ["stored"], [], ["stored", "merged"]]
    assert whole["batch_1.json"]["edit"]["update_norm"] == 0.0
    state = load_editor_state(world.results_dir / "whole" / "run_000" / "weights_checkpoint.safetensors")
    assert int(state["n_edits"]) == 4 and state["memories"].shape[0] == 1 and int(state["n_merges"]) == 1


def test_cli_rollback_run(tmp_path):
    from experiments.evaluate import cli

    torch.set_num_threads(1)
    world = TinyWorld(tmp_path, "llama")
    write_unrelated(world)
    hp = world.write_hparams("WISE", wise_dict(n_iter=10))
    assert cli(cli_args(world, hp, "rollback", edit_times=2)) == 0
    first = next((world.results_dir / "rollback" / "run_000").glob("edit_1_on_case_*.json"))
    result = json.loads(first.read_text())
    assert (result["edit"]["n_edits"], result["rollback"]["n_edits"]) == (1, 2)  # the roll-back trains W' back
    assert result["rollback"]["shard_events"] == ["stored"] and result["edit"]["update_norm"] == 0.0


def test_routing_report_rebuilds_the_run_and_reads_what_its_evaluation_read(tmp_path):
    """experiments.py.wise_routing on a finished run: under the run's own act_ratio the rewrite prompts
    answer as the run's last evaluation scored them; act_ratio 0 sends every prompt to the memory;
    with the router off nothing is routed and the untouched facts answer as the unedited model."""
    from experiments.evaluate import cli
    from experiments.py.wise_routing import main as routing_main

    torch.set_num_threads(1)
    world = TinyWorld(tmp_path, "llama")
    write_unrelated(world)
    hp = world.write_hparams("WISE", wise_dict(n_iter=10))
    assert cli(cli_args(world, hp, "seq", protocol="sequential", checkpoint_every=1)) == 0
    run_dir = world.results_dir / "seq" / "run_000"
    rows = routing_main([str(run_dir), "--act_ratios", "0", "--data_dir", str(world.root), "--json", str(tmp_path / "r.json")])
    by = {(r["kind"], r["act_ratio"]): r for r in rows}
    assert {k for k, _ in by} == {"rewrite", "paraphrase", "neighbourhood", "untouched"}
    evaluation = json.loads((run_dir / "evaluation_after_edit_4.json").read_text())["records"]
    rewrite = [v for r in evaluation for v in r["post"]["rewrite_prompts_correct"]]
    assert by["rewrite", 0.5]["n"] == len(rewrite) == 4
    assert by["rewrite", 0.5]["correct"] == pytest.approx(sum(rewrite) / len(rewrite))
    assert all(by[kind, 0.0]["to_memory"] == 1.0 for kind in ("rewrite", "paraphrase", "neighbourhood", "untouched"))
    assert all(by[kind, None]["to_memory"] == 0.0 for kind in ("rewrite", "untouched"))
    model = make_model("llama")
    untouched = [r for r in rows if r["kind"] == "untouched" and r["act_ratio"] is None][0]
    meta = json.loads((run_dir / "run.json").read_text())
    records = {r["case_id"]: r for r in json.loads(world.data_file.read_text())}
    kept = [records[c]["requested_rewrite"] for c in meta["orig_retention_case_ids"][:4]]
    plain = score_targets(model, make_tokenizer(), [k["prompt"].format(k["subject"]) for k in kept],
                          [k["target_true"]["str"] for k in kept])
    assert untouched["n"] == len(kept) and untouched["correct"] == pytest.approx(sum(s.correct for s in plain) / len(kept))
    assert json.loads((tmp_path / "r.json").read_text())["rows"] == rows
