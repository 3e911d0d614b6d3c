"""What WILD evaluation and the capability probes cost, and how often the generation cap decides.

    python -m experiments.bench.wild --model smollm2-135m --records 50 --timing_records 10 --json wild_bench.json

Parts (``--parts``, default all):
- ``stops``: over the first ``--records`` known CounterFact records (every rewrite, paraphrase and
  neighbourhood prompt), generate with a generous cap (``--probe_cap``) under each template and
  report, for each candidate ``max_new_tokens``, the share of answers that cap would cut (an answer
  of L tokens is cut by cap c when L > c, or L == c and nothing else stopped it);
- ``wild``: seconds of ``wild_scores`` per record, batched (the default settings) and one prompt at
  a time, their ratio, and whether both gave the same answers;
- ``batch_sizes``: seconds of ``wild_scores_many`` over the timing records (their prompts generated
  together, as a run's checkpoint generates them) at each of ``--batch_sizes``, each size's ratio to
  the first, and how many answers equal the first size's (the table of docs/speed.md);
- ``capability``: one full ``CapabilityProbe`` pass (probes + perplexity; the default settings unless
  ``--tasks/--items/--few_shots`` say otherwise), its seconds and scores.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from experiments.py.capability import CapabilityProbe, CapabilitySettings, ProbeSetupError, check_capability_settings
from experiments.py.probe_tasks import DEFAULT_TASKS
from experiments.py.wild import TEMPLATES, WildSettings, generate_answers, wild_pairs, wild_scores, wild_scores_many
from util.generation import STOP_CAP

LOG = logging.getLogger("experiments.bench.wild")
PARTS = ("stops", "wild", "batch_sizes", "capability")
CANDIDATE_CAPS = (16, 32, 64, 128)


def cut_share(lengths: Sequence[tuple[int, str]], cap: int) -> float:
    """Share of answers a cap of ``cap`` tokens would stop, from answers generated under a larger cap."""
    return sum(n > cap or (n == cap and why == STOP_CAP) for n, why in lengths) / len(lengths)


def stop_statistics(model: nn.Module, tok: PreTrainedTokenizerBase, records: Sequence[dict], probe_cap: int) -> dict:
    out = {}
    for template in TEMPLATES:
        settings = WildSettings(max_new_tokens=probe_cap, template=template)
        prompts = [p for r in records for pairs in wild_pairs(r, "counterfact").values() for p, _ in pairs]
        lengths = [(len(g.token_ids), g.stopped_by) for g in generate_answers(model, tok, prompts, settings)]
        out[template] = {
            "answers": len(lengths),
            "median_tokens": statistics.median(n for n, _ in lengths),
            "max_tokens": max(n for n, _ in lengths),
            "stopped_by": {why: sum(w == why for _, w in lengths) / len(lengths) for why in sorted({w for _, w in lengths})},
            "cut_by_cap": {str(c): cut_share(lengths, c) for c in (*CANDIDATE_CAPS, probe_cap) if c <= probe_cap},
        }
        LOG.info("stops, %s: %s", template, out[template])
    return out


def time_wild(model: nn.Module, tok: PreTrainedTokenizerBase, records: Sequence[dict], settings: WildSettings) -> dict:
    """Seconds per record of batched and one-prompt-at-a-time WILD scoring, and whether they agree."""
    timings, answers = {}, {}
    for name, s in (("batched", settings), ("one_at_a_time", dataclasses.replace(settings, batch_size=1))):
        start = time.perf_counter()
        answers[name] = [wild_scores(model, tok, r, "counterfact", settings=s)["wild_answers"] for r in records]
        timings[name] = (time.perf_counter() - start) / len(records)
    prompts = sum(len(v) for a in answers["batched"] for v in a.values())
    same = sum(x == y for a, b in zip(answers["batched"], answers["one_at_a_time"]) for k in a for x, y in zip(a[k], b[k]))
    return {"seconds_per_record_batched": timings["batched"], "seconds_per_record_one_at_a_time": timings["one_at_a_time"],
            "speedup": timings["one_at_a_time"] / timings["batched"], "prompts": prompts, "same_answers": same,
            "records": len(records), "settings": settings.as_dict()}


def time_batch_sizes(model: nn.Module, tok: PreTrainedTokenizerBase, records: Sequence[dict],
                     sizes: Sequence[int], settings: WildSettings = WildSettings()) -> dict:
    """Seconds of one checkpoint's WILD generation over ``records`` at each batch size, in the order given
    (repeat a size to see the machine's noise), with the ratio to the first and the answers it shares."""
    rows, first = [], None
    for size in sizes:
        start = time.perf_counter()
        scored = wild_scores_many(model, tok, records, "counterfact", settings=dataclasses.replace(settings, batch_size=size))
        seconds = time.perf_counter() - start
        answers = [a for r in scored for group in r["wild_answers"].values() for a in group]
        first = first or (seconds, answers)
        rows.append({"batch_size": size, "seconds": seconds, "speedup_over_first": first[0] / seconds,
                     "same_answers_as_first": sum(a == b for a, b in zip(answers, first[1])), "prompts": len(answers)})
        LOG.info("WILD batch %d: %.1f s, %.2fx the first", size, seconds, first[0] / seconds)
    return {"records": len(records), "sizes": rows}


def known_records(model_name: str, n: int) -> list[dict]:
    from dsets.registry import resolve_edit_dataset
    from util.globals import load_paths
    from util.models import model_slug

    found = resolve_edit_dataset("counterfact", load_paths(), model_slug(model_name), size=n)
    if found.missing:
        raise SystemExit(f"no known subset for {model_name}: build it with python -m dsets.make_known (would be {found.source_path})")
    return found.records


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments.bench.wild", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--records", type=int, default=50, help="known CounterFact records for the stop statistics")
    p.add_argument("--timing_records", type=int, default=10, help="records timed batched and one at a time")
    p.add_argument("--batch_sizes", default="16,64,16,64,32",
                   help="batch_sizes part: WILD batch sizes timed in this order (a size repeated shows the noise)")
    p.add_argument("--probe_cap", type=int, default=128, help="max_new_tokens of the stop statistics")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated from {','.join(PARTS)}")
    p.add_argument("--tasks", default=",".join(DEFAULT_TASKS), help="capability probe tasks, comma-separated")
    p.add_argument("--items", type=int, default=CapabilitySettings.n_items, help="items per probe task")
    p.add_argument("--few_shots", type=int, default=CapabilitySettings.n_few_shots, help="few-shot examples per item")
    p.add_argument("--num_threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--device", default=None)
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    unknown = set(args.parts.split(",")) - set(PARTS)
    if unknown:
        p.error(f"--parts: unknown part(s) {sorted(unknown)}; choose from {list(PARTS)}")
    return args


def bench_model_and_records(name: str, n: int, device: str | None, tmp: Path) -> tuple:
    """A real model and its known records, or (``tiny``, ``random:<shape>``: a GPU machine without
    weights) a built one and the first valid CounterFact records (or the tiny test records)."""
    from experiments.bench.cli import bench_records
    from experiments.bench.models import load_bench_model

    model, tok, *_ = load_bench_model(name, tmp, device=device)
    synthetic = name == "tiny" or name.startswith("random:")
    return model, tok, bench_records(n) if synthetic else known_records(name, n)


def main(argv: Sequence[str] | None = None) -> dict:
    import tempfile

    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    LOG.setLevel(logging.INFO)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    parts = args.parts.split(",")
    probe_settings = CapabilitySettings(tasks=tuple(t for t in args.tasks.split(",") if t), n_items=args.items,
                                        n_few_shots=args.few_shots)
    if "capability" in parts:
        try:
            check_capability_settings(probe_settings)
        except ProbeSetupError as e:
            raise SystemExit(f"error: {e}") from None
    tmp = tempfile.TemporaryDirectory()
    model, tok, records = bench_model_and_records(args.model, max(args.records, args.timing_records), args.device,
                                                  Path(tmp.name))
    results: dict = {"model": args.model, "torch_threads": torch.get_num_threads(),
                     "command": ["python", "-m", "experiments.bench.wild", *(sys.argv[1:] if argv is None else argv)]}
    if "stops" in parts:
        results["stops"] = stop_statistics(model, tok, records[: args.records], args.probe_cap)
    if "wild" in parts:
        results["wild"] = time_wild(model, tok, records[: args.timing_records], WildSettings())
        LOG.info("wild: %s", results["wild"])
    if "batch_sizes" in parts:
        sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
        results["batch_sizes"] = time_batch_sizes(model, tok, records[: args.timing_records], sizes)
    if "capability" in parts:
        start = time.perf_counter()
        results["capability"] = CapabilityProbe(probe_settings).run(model, tok)
        results["capability"]["seconds_total"] = time.perf_counter() - start
        results["capability"]["settings"] = probe_settings.as_dict()
    print(json.dumps(results, indent=1))
    if args.json:
        from util.atomic_files import write_json_atomic

        write_json_atomic(Path(args.json), results)
    return results


if __name__ == "__main__":
    main()
