"""Where WISE's router sends each kind of prompt after a run, and what each memory answers.

    python -m experiments.py.wise_routing results/WISE_seq1_wild_smollm2/run_000 --act_ratios 0,0.5,0.88

WISE keeps the model's weight W and answers from its side memory W' only for inputs whose activation
score passes act_ratio x the threshold learned from the edits (baselines/wise/router.py). A run's
scores cannot tell a router that isolates badly from a side memory that forgot: this rebuilds the
run's editor from its last checkpoint and, for the edited records' rewrite and paraphrase prompts
(target: the new object), their neighbourhood prompts and the untouched facts' prompts (target: the
true object), reports the share routed to W' (or a stored shard) and the share answered right,
under each act_ratio given: 0 sends everything to W' (what W' alone holds), the run's own is what its
evaluation saw, and ``--act_ratios`` can add any other without editing again. "W alone" (the router
off) is the unedited model.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch

from baselines.wise import WISEHyperParams
from baselines.wise.editor import WISEEditor
from editing.resources import EditResources
from experiments.store.checkpoints import CHECKPOINT_FILE, load_editor_state
from util.globals import load_paths
from util.models import load_model
from util.scoring import score_targets

KINDS = ("rewrite", "paraphrase", "neighbourhood", "untouched")


def prompt_pairs(records: Sequence[dict], kind: str) -> list[tuple[str, str]]:
    """(prompt, target) of one kind: the new object for the edit's own prompts, the true one otherwise."""
    pairs = []
    for r in records:
        rw = r["requested_rewrite"]
        new, true = rw["target_new"]["str"], rw["target_true"]["str"]
        if kind == "rewrite":
            pairs.append((rw["prompt"].format(rw["subject"]), new))
        elif kind == "paraphrase":
            pairs += [(p, new) for p in r.get("paraphrase_prompts", [])]
        elif kind == "neighbourhood":
            pairs += [(p, true) for p in r.get("neighborhood_prompts", [])]
        else:
            pairs.append((rw["prompt"].format(rw["subject"]), true))
    return pairs


def measure(editor: WISEEditor, pairs: Sequence[tuple[str, str]], act_ratio: Optional[float]) -> dict:
    """{"correct": share answered right, "to_memory": share routed away from W} under ``act_ratio``
    (None: the router off, W alone). One prompt per forward pass, as each sequence is routed alone."""
    prompts, targets = [p for p, _ in pairs], [t for _, t in pairs]
    choices: list[torch.Tensor] = []  # per forward pass, which memory answered (0: W, 1: W', 2..: shards)
    if act_ratio is None:
        scores = score_targets(editor.model, editor.tok, prompts, targets, batch_size=1)
    else:
        with editor.routed(act_ratio, observe=lambda choice: choices.append(choice.cpu())):
            scores = score_targets(editor.model, editor.tok, prompts, targets, batch_size=1)
    routed = torch.cat(choices) if choices else torch.zeros(0)
    return {"n": len(pairs), "correct": sum(s.correct for s in scores) / max(1, len(scores)),
            "to_memory": float((routed > 0).float().mean()) if routed.numel() else 0.0}


def rebuild_editor(run_dir: Path, data_dir: Optional[str]) -> tuple[WISEEditor, dict]:
    """The run's WISE editor at its last checkpoint, on a freshly loaded model."""
    meta = json.loads((run_dir / "run.json").read_text())
    if meta.get("alg_name") != "WISE":
        raise ValueError(f"{run_dir}: a {meta.get('alg_name')!r} run, not WISE")
    paths = load_paths(data_dir=data_dir) if data_dir else load_paths()
    model, tok = load_model(meta["model_name"], paths, device=meta.get("device"))
    hparams = WISEHyperParams.from_dict(json.loads((run_dir / "params.json").read_text()))
    editor = WISEEditor(model, tok, hparams, EditResources(paths, meta.get("model_slug", "model"), progress=False))
    editor.load_state_dict(load_editor_state(run_dir / CHECKPOINT_FILE))
    return editor, meta


def edited_and_untouched(meta: dict, n_records: Optional[int]) -> tuple[list[dict], list[dict]]:
    """The records edited up to the checkpoint (the first ``n_records`` of them) and as many untouched."""
    records = {r["case_id"]: r for r in json.loads(Path(meta["dataset_file"]).read_text())}
    done = int(meta.get("last_checkpoint") or 0) * int(meta.get("num_edits") or 1)
    stream = meta["edit_stream_case_ids"][: min(done, n_records or done)]
    kept = meta.get("orig_retention_case_ids", [])[: len(stream)]
    return [records[c] for c in stream], [records[c] for c in kept]


def report(editor: WISEEditor, edited: Sequence[dict], untouched: Sequence[dict],
           ratios: Sequence[Optional[float]]) -> Iterator[dict]:
    for kind in KINDS:
        pairs = prompt_pairs(untouched if kind == "untouched" else edited, kind)
        for ratio in ratios:
            yield {"kind": kind, "act_ratio": ratio, **measure(editor, pairs, ratio)}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments.py.wise_routing", description=__doc__.split("\n")[0])
    p.add_argument("run_dir", type=Path, help="a WISE run folder with its weights_checkpoint.safetensors")
    p.add_argument("--act_ratios", default="0", help="comma-separated act_ratio values besides the run's own")
    p.add_argument("--records", type=int, default=None, help="at most this many edited records (and untouched)")
    p.add_argument("--data_dir", default=None, help="where the run read its data (the unrelated rows)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, default=None)
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> list[dict]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    editor, meta = rebuild_editor(args.run_dir, args.data_dir)
    extra = [float(r) for r in args.act_ratios.split(",") if r.strip()]
    ratios = [None, *dict.fromkeys([editor.hparams.act_ratio, *extra])]
    edited, untouched = edited_and_untouched(meta, args.records)
    rows = list(report(editor, edited, untouched, ratios))
    print("| prompts | n | act_ratio | routed to W' or a shard | answered right |\n|---|---|---|---|---|")
    for row in rows:
        ratio = "router off (W)" if row["act_ratio"] is None else f"{row['act_ratio']:g}"
        print(f"| {row['kind']} | {row['n']} | {ratio} | {row['to_memory']:.3f} | {row['correct']:.3f} |")
    if args.json:
        args.json.write_text(json.dumps({"run_dir": str(args.run_dir), "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()
