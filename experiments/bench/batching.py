"""Batched against one-at-a-time value optimisation, timed in one process on the same model.

    python -m experiments.bench.batching --model smollm2-135m --batches 1,16,100 --scan_edits 3 --threads 1

- z optimisation (MEMIT's hparams; AlphaEdit, RECT and PRUNE share it): seconds per request for a
  batch of 1, 16, 100 requests, one request at a time (``v_batch_tokens`` 0, the reference's loop)
  against one batch, the two interleaved in each repetition. The early stop is off, so both run
  ``--steps`` passes (default: the hparams' v_num_grad_steps) for every request and do the same work;
  also the largest relative difference between their z's.
- WilKE's exact scan (its hparams): seconds per edit of ``choose_layer``, candidates one after
  another against one batch, alternating which runs first per record; whether both choose the same
  layer, and the largest relative difference between their LAs.

Models: an embedded, local or hub name (``util.models``, hparams from ``hparams/MEMIT`` and
``hparams/WilKE``), ``tiny`` (the test suite's 6-layer Llama), or ``random:<arch>:<layers>:<width>``
(a randomly initialised model of that size with its family's head width and vocabulary, built on
the device: the per-step cost of a real shape on a GPU machine without weights; no statistics, so
WilKE scores its candidates without the covariance, and MEMIT's z's need none).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from editing.requests import normalise_request, record_request
from editing.resources import EditResources
from memit.memit_hparams import MEMITHyperParams
from memit.memit_main import compute_zs
from util.globals import load_paths
from util.placement import synchronize
from wilke.wilke_hparams import WilKEHyperParams
from wilke.wilke_main import choose_layer

LOG = logging.getLogger("experiments.bench.batching")
# per family: head width, MLP width / model width (None: the config's own), vocabulary (GPT-2, GPT-J, Llama 3)
RANDOM_FAMILIES = {"gpt2": (64, None, 50257), "gptj": (256, None, 50400), "llama": (128, 3.5, 128256)}
UNLIMITED = 1 << 40  # a token budget that holds any batch


@dataclasses.dataclass
class Bench:
    model: Any
    tok: Any
    memit: MEMITHyperParams
    wilke: WilKEHyperParams
    records: list[dict]
    resources: Callable[[], EditResources]


def _random_hparams(arch: str, n_layer: int) -> tuple[MEMITHyperParams, WilKEHyperParams]:
    from util.tiny_models import rank_one_hparams

    base = rank_one_hparams(arch, n_layer, fact_token="subject_last", mom2_adjustment=False, v_weight_decay=0.5,
                            clamp_norm_factor=4.0, context_template_length_params=[[5, 5], [10, 5]])
    top = max(1, n_layer // 3)
    memit = MEMITHyperParams.from_dict({**base, "layers": list(range(max(0, top - 2), top + 1)), "mom2_update_weight": 100.0,
                                        "clamp_norm_factor": 0.75, "context_template_length_params": [[10, 5]]})
    return memit, WilKEHyperParams.from_dict({**base, "scanning_ceiling": max(2, n_layer // 2)})


def load_bench(name: str, device: Optional[str], dtype: torch.dtype) -> Bench:
    """The model, its MEMIT and WilKE hparams, records to edit and a fresh-resources factory."""
    from util.models import load_model, model_slug, pick_device
    from util.tiny_models import make_model, make_tokenizer, tiny_records

    paths = load_paths()
    if name == "tiny" or name.startswith("random:"):
        arch, n_layer, width = ("llama", 6, 64) if name == "tiny" else _random_spec(name)
        head, mlp, vocab = RANDOM_FAMILIES[arch] if name != "tiny" else (width // 4, None, None)
        model = make_model(arch, n_layer, width=width, heads=width // head, mlp=int(mlp * width) if mlp else None,
                           vocab=vocab, device=str(pick_device(device)), dtype=dtype)
        memit, wilke = _random_hparams(arch, n_layer)
        return Bench(model, make_tokenizer(), memit, wilke, tiny_records(), lambda: EditResources(paths, name, progress=False))
    slug = model_slug(name)
    if not (paths.hparams_dir / "MEMIT" / f"{slug}.json").is_file():
        raise SystemExit(f"--model {name}: no hparams/MEMIT/{slug}.json to time MEMIT's z's with (none for Gemma 2/3: "
                         f"util/architectures.py check_residual_targets)")
    model, tok = load_model(name, device=device, dtype=dtype)
    memit = MEMITHyperParams.from_json(paths.hparams_dir / "MEMIT" / f"{slug}.json")
    wilke = WilKEHyperParams.from_json(paths.hparams_dir / "WilKE" / f"{slug}.json")
    return Bench(model, tok, memit, wilke, _counterfact(), lambda: EditResources(paths, slug, progress=False))


def _random_spec(name: str) -> tuple[str, int, int]:
    try:
        _, arch, layers, width = name.split(":")
        if arch not in RANDOM_FAMILIES:
            raise ValueError
        return arch, int(layers), int(width)
    except ValueError:
        raise SystemExit(f"--model {name!r}: expected random:<{'|'.join(RANDOM_FAMILIES)}>:<layers>:<width>") from None


def _counterfact() -> list[dict]:
    from dsets.counterfact import CounterFactDataset
    from util.tiny_models import tiny_records

    try:
        return CounterFactDataset(load_paths(), allow_download=False).records
    except FileNotFoundError:
        return tiny_records()


def requests(bench: Bench, n: int) -> list[dict]:
    """The first n records' requests (cycled when there are fewer records)."""
    return [normalise_request(record_request(bench.records[i % len(bench.records)])) for i in range(n)]



def _timed(model, fn: Callable[[], Any]) -> tuple[tuple[float, float], Any]:
    """((wall seconds, this process's CPU seconds), fn()). On a shared CPU the CPU seconds of a
    one-thread run do not count the time other processes held the cores; on a GPU the wall counts."""
    synchronize(model)
    start, cpu = time.perf_counter(), time.process_time()
    out = fn()
    synchronize(model)
    return (time.perf_counter() - start, time.process_time() - cpu), out


def _figures(times: dict[str, list[tuple[float, float]]], unit: str, reduce: Callable[[list[float]], float]) -> dict:
    """Wall and CPU seconds per ``unit`` of each form (``reduce`` over repetitions), and loop / batched."""
    out: dict[str, float] = {}
    for i, kind in enumerate(("", "cpu_")):
        loop, batched = (reduce([t[i] for t in times[m]]) for m in ("loop", "batched"))
        out.update({f"loop_{kind}seconds_per_{unit}": loop, f"batched_{kind}seconds_per_{unit}": batched,
                    f"loop_over_batched{'_cpu' if kind else ''}": loop / batched})
    return out


def time_zs(bench: Bench, batch: int, repeats: int, steps: Optional[int], batch_tokens: Optional[int]) -> dict:
    """Seconds per request of MEMIT's z's for ``batch`` requests: one at a time, then in batches of
    ``batch_tokens`` padded prompt positions (default: the hparams' v_batch_tokens)."""
    hp = bench.memit.replace(v_early_stop_loss=0.0, v_num_grad_steps=steps or bench.memit.v_num_grad_steps)
    batch_tokens = hp.v_batch_tokens if batch_tokens is None else batch_tokens
    reqs, res = requests(bench, batch), bench.resources()
    compute_zs(bench.model, bench.tok, reqs[:2], hp.replace(v_num_grad_steps=1), res)  # templates, strategy checks
    times: dict[str, list[tuple[float, float]]] = {"loop": [], "batched": []}
    zs: dict[str, torch.Tensor] = {}
    for _ in range(repeats):
        for mode, tokens in (("loop", 0), ("batched", batch_tokens)):
            (wall, cpu), (zs[mode], passes, _, _) = _timed(bench.model, lambda: compute_zs(
                bench.model, bench.tok, reqs, hp.replace(v_batch_tokens=tokens), res))
            if set(passes) != {hp.v_num_grad_steps}:
                raise RuntimeError(f"z's ran {sorted(set(passes))} passes, not {hp.v_num_grad_steps}: the timing is unfair")
            times[mode].append((wall / batch, cpu / batch))
    diff = ((zs["batched"] - zs["loop"]).norm(dim=0) / zs["loop"].norm(dim=0)).max()
    return {"batch": batch, "passes": hp.v_num_grad_steps, "repeats": repeats, "batch_tokens": batch_tokens,
            **_figures(times, "request", min), "max_relative_z_difference": float(diff)}


def time_scan(bench: Bench, n_edits: int) -> dict:
    """Seconds per WilKE exact scan, candidates one after another and in one batch, on the same model."""
    hp, res = bench.wilke.replace(scan="exact"), bench.resources()
    runs: dict[str, list] = {"loop": [], "batched": []}
    modes = {"loop": hp.replace(v_batch_tokens=0), "batched": hp}
    for i, request in enumerate(requests(bench, n_edits + 1)):
        order = ("loop", "batched") if i % 2 else ("batched", "loop")
        for mode in order:
            seconds, (update, la) = _timed(bench.model, lambda: choose_layer(bench.model, bench.tok, request, modes[mode], res))
            if i:  # the first record warms up templates, statistics and strategy checks
                runs[mode].append((seconds, update.layer, la))
    times = {m: [r[0] for r in runs[m]] for m in runs}
    diffs = [abs(a[2][l] - b[2][l]) / b[2][l] for a, b in zip(runs["batched"], runs["loop"]) for l in b[2]]
    return {"edits": n_edits, "candidates": hp.scanning_ceiling, **_figures(times, "edit", lambda xs: sum(xs) / len(xs)),
            "same_layers": [r[1] for r in runs["batched"]] == [r[1] for r in runs["loop"]],
            "layers": [r[1] for r in runs["batched"]], "max_relative_la_difference": max(diffs)}


def table(result: dict) -> str:
    rows = [("part", "loop s", "batched s", "loop / batched", "CPU s: loop / batched", "agreement")]

    def row(name: str, r: dict, unit: str, agreement: str) -> tuple[str, ...]:
        return (name, f"{r[f'loop_seconds_per_{unit}']:.3f}/{unit}", f"{r[f'batched_seconds_per_{unit}']:.3f}/{unit}",
                f"{r['loop_over_batched']:.2f}x", f"{r['loop_over_batched_cpu']:.2f}x", agreement)

    for z in result["zs"]:
        rows.append(row(f"z's, batch {z['batch']} ({z['passes']} passes)", z, "request",
                        f"z rel. diff {z['max_relative_z_difference']:.1e}"))
    if "scan" in result:
        s = result["scan"]
        rows.append(row(f"WilKE exact scan, {s['candidates']} candidates", s, "edit",
                        f"same layers {s['same_layers']}, LA rel. diff {s['max_relative_la_difference']:.1e}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments.bench.batching", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="a model name, 'tiny' or random:<arch>:<layers>:<width>")
    p.add_argument("--batches", default="1,16,100", help="batch sizes of the z timing, comma-separated ('' skips it)")
    p.add_argument("--repeats", type=int, default=1, help="timed repetitions per batch size (the fastest counts)")
    p.add_argument("--steps", type=int, default=None, help="passes per z (default: the MEMIT hparams' v_num_grad_steps)")
    p.add_argument("--batch_tokens", type=int, default=None,
                   help=f"v_batch_tokens of the batched z's (default: the hparams'; {UNLIMITED}: one batch whatever its size)")
    p.add_argument("--scan_edits", type=int, default=3, help="timed WilKE exact scans, after one warm-up (0 skips it)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    try:
        args.batch_sizes = [int(b) for b in args.batches.split(",") if b.strip()]
    except ValueError:
        p.error(f"--batches {args.batches!r}: expected comma-separated integers")
    if any(b < 1 for b in args.batch_sizes) or args.repeats < 1 or args.scan_edits < 0:
        p.error("--batches and --repeats must be positive, --scan_edits at least 0")
    return args


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    bench = load_bench(args.model, args.device, getattr(torch, args.dtype))
    result: dict[str, Any] = {"model": args.model, "dtype": args.dtype, "device": str(next(bench.model.parameters()).device),
                              "torch_threads": torch.get_num_threads(), "zs": []}
    for batch in args.batch_sizes:
        result["zs"].append(time_zs(bench, batch, args.repeats, args.steps, args.batch_tokens))
        print(json.dumps(result["zs"][-1]), flush=True)
    if args.scan_edits:
        result["scan"] = time_scan(bench, args.scan_edits)
        print(json.dumps(result["scan"]), flush=True)
    print(table(result))
    result["command"] = ["python", "-m", "experiments.bench.batching", *(sys.argv[1:] if argv is None else argv)]
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
