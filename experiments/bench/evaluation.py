"""How long evaluation takes per record, one record at a time against many records per scoring pass.

    python -m experiments.bench.evaluation --model smollm2-135m --records 64

A sequential run evaluates every record edited so far at each checkpoint, so its evaluation cost
grows as n^2. Both ways are timed on the same model and records (CounterFact's metrics and
unchanged-prediction locality of each record, as the sequential protocol writes them): the
per-record path (``rewrite_quality`` and the locality pass, two scoring passes a record) and
``evaluate_records`` (the records' prompts scored together in length-sorted batches, the pairs that
metrics and locality share scored once). Prints seconds per record, the ratio, and whether every
verdict agrees; ``--json`` keeps them.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from experiments.bench.cli import bench_records
from experiments.bench.models import load_bench_model
from experiments.py.dataset_metrics import evaluate_records, metrics_for
from experiments.py.locality import argmax_answers, unchanged

VERDICTS = ("rewrite_prompts_correct", "paraphrase_prompts_correct", "neighborhood_prompts_correct",
            "neighborhood_prompts_unchanged")


def time_evaluation(model, tok, records: Sequence[dict], chunk: int) -> dict:
    metrics = metrics_for("counterfact")
    unedited = [argmax_answers(model, tok, metrics.neighborhood_pairs(r)) for r in records]
    start = time.perf_counter()
    one_by_one = []
    for record, before in zip(records, unedited):
        post = metrics.rewrite_quality(model, tok, record, None)
        post.update(unchanged(before, argmax_answers(model, tok, metrics.neighborhood_pairs(record))))
        one_by_one.append(post)
    looped = time.perf_counter() - start
    start = time.perf_counter()
    batched = [post for i in range(0, len(records), chunk)
               for post in evaluate_records(model, tok, metrics, records[i : i + chunk], unedited[i : i + chunk])]
    together = time.perf_counter() - start
    same = all(a[k] == b[k] for a, b in zip(one_by_one, batched) for k in VERDICTS)
    return {"records": len(records), "chunk": chunk, "seconds_per_record_one_at_a_time": looped / len(records),
            "seconds_per_record_batched": together / len(records), "speedup": looped / together,
            "same_verdicts": same}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments.bench.evaluation", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="tiny, smollm2-135m, gemma-3-270m or a model path")
    p.add_argument("--records", type=int, default=64, help="CounterFact records evaluated")
    p.add_argument("--chunk", type=int, default=16, help="records per scoring pass (the sequential protocol's)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--device", default=None)
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model, tok, *_ = load_bench_model(args.model, Path(tmp), device=args.device)
        result = {"model": args.model, "torch_threads": torch.get_num_threads(),
                  **time_evaluation(model, tok, bench_records(args.records), args.chunk)}
    print(f"{result['model']}: {result['records']} records, {result['seconds_per_record_one_at_a_time']:.3f} s/record "
          f"one at a time, {result['seconds_per_record_batched']:.3f} s/record batched ({result['chunk']} per pass): "
          f"{result['speedup']:.2f}x; same verdicts: {result['same_verdicts']}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
