"""The approximate scan's agreement with the exact one, measured per edit and kept on disk.

Each edit gets one exact scan; the approximate choice of every (grad_steps, top_k) setting is read
off it (``approximate_choice``), so one measurement covers the whole grid. Results are
kept one JSON line per edit (``AgreementStore``), so a long measurement resumes where it stopped
and can be sharded over processes.
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import nn
from tqdm import tqdm

from editing.norm_anchor import anchored_rome_value
from editing.requests import normalise_request, record_request
from rome.compute_v import right_vector
from rome.rome_main import RankOneUpdate
from wilke.wilke_hparams import WilKEHyperParams
from wilke.wilke_main import choose_layer, scan_layers, weight_norm

LOG = logging.getLogger("experiments.bench")


def norm_by_pass(update: RankOneUpdate) -> list[float]:
    """||Delta|| had v*'s optimisation stopped after pass 1, 2, ... (the last is ``update.norm``): the
    right vector of v0 + the delta each pass ran with (NAS-anchored when it is on), as the update's own."""
    value, cur, reference = update.value, update.cur_value, update.norm_reference
    by_pass = torch.stack([right_vector(anchored_rome_value(value.v0 + d, cur, reference), update.key, cur, update.u)
                           for d in value.deltas])
    return (by_pass.norm(dim=1) * update.u.norm()).tolist()


def adaptabilities(model: nn.Module, updates: Mapping[int, RankOneUpdate]) -> tuple[dict[int, float], dict[int, list[float]]]:
    """(LA per layer, LA per layer after each optimisation pass) of a scan's updates."""
    norms = {l: weight_norm(model, u.module_name) for l, u in updates.items()}
    return ({l: u.norm / norms[l] for l, u in updates.items()},
            {l: [n / norms[l] for n in norm_by_pass(u)] for l, u in updates.items()})


def approximate_choice(
    la_by_pass: Mapping[int, Sequence[float]], la: Mapping[int, float], grad_steps: int, top_k: int
) -> int:
    """The layer ``scan: approximate`` would choose, read off an exact scan.

    ``la_by_pass[l]`` is layer l's LA had its optimisation stopped after pass 1, 2, ... and ``la[l]``
    its final LA. An optimisation of ``grad_steps`` passes is the first ``grad_steps`` passes of the
    full one, so this is the choice ``wilke_main.choose_layer`` makes, without running it: one exact
    scan per edit measures the agreement of every (grad_steps, top_k) setting at once.
    """
    rough = {l: v[min(grad_steps, len(v)) - 1] for l, v in la_by_pass.items()}
    shortlist = sorted(rough, key=rough.get)[:top_k]
    return min(shortlist, key=lambda l: la[l])


def mean(xs) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def agreement_config(wh: WilKEHyperParams) -> dict:
    """What an exact scan depends on; stored lines with another config are not reused."""
    return {"scanning_ceiling": wh.scanning_ceiling, "v_num_grad_steps": wh.v_num_grad_steps, "v_lr": wh.v_lr,
            "layers_of": wh.rewrite_module_tmp, "context_template_length_params": wh.context_template_length_params,
            "mom2_n_samples": wh.mom2_n_samples, "mom2_adjustment": wh.mom2_adjustment}


class AgreementStore:
    """Per-edit agreement results, one JSON line each, so a long measurement resumes where it stopped.

    Each line is flushed and fsynced as soon as its edit is measured; a line cut short by a kill
    is ignored on reading (and logged), as are lines measured under another configuration.
    """

    def __init__(self, path: Path, config: dict):
        self.path = Path(path)
        self.config = json.loads(json.dumps(config))  # normalised as it will read back
        self.done: dict[str, dict] = {}
        if self.path.exists():
            for n, line in enumerate(self.path.read_text().splitlines(), 1):
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    LOG.warning("%s line %d is not JSON (cut short by a kill?); ignored", self.path, n)
                    continue
                if isinstance(entry, dict) and entry.get("config") == self.config and "case_id" in entry:
                    self.done[str(entry["case_id"])] = entry

    def get(self, case_id: Any) -> Optional[dict]:
        return self.done.get(str(case_id))

    def add(self, entry: dict) -> None:
        entry = {**entry, "config": self.config}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(entry) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.done[str(entry["case_id"])] = entry


APPROX_GRID = [(steps, top_k) for steps in (1, 2, 3, 5, 8) for top_k in (1, 2, 3)]


def bench_approximate(model, tok, wh, records, fresh_resources, store: Optional[AgreementStore] = None,
                      n_timed: int = 4, shard: tuple[int, int] = (0, 1)) -> dict:
    """Agreement of the approximate scan with the exact one, each edit from the unedited weights.

    Each edit gets one exact scan; the approximate choice for every (grad_steps, top_k) of
    APPROX_GRID is read off it (approximate_choice, equal by construction and tested).
    On the first ``n_timed`` edits the approximate scan is also run for real, to time it and to
    confirm the read-off choice. ``shard`` (i, n) measures only edits i, i+n, i+2n, ... so n
    processes can share one store; a later unsharded call reads all of them back.
    """
    res = fresh_resources()
    approx_hp = wh.replace(scan="approximate")
    entries, reused = [], 0
    for i, record in enumerate(tqdm(records, desc="exact vs approximate scan", unit="edit")):
        request = normalise_request(record_request(record))
        entry = store.get(request.get("case_id")) if store else None
        if i % shard[1] != shard[0]:
            if entry is not None:
                entries.append(entry)
            continue
        if entry is None:
            t0 = time.perf_counter()
            la, la_by_pass = adaptabilities(model, scan_layers(model, tok, request, wh, wh.candidate_layers, res))
            entry = {"case_id": request.get("case_id"), "exact_layer": min(la, key=la.get),
                     "exact_seconds": time.perf_counter() - t0,
                     "la": {str(l): v for l, v in la.items()}, "la_by_pass": {str(l): v for l, v in la_by_pass.items()}}
            if store:
                store.add(entry)
        else:
            reused += 1
        if i < n_timed and entry.get("approx_setting") != [wh.approx_grad_steps, wh.approx_top_k]:
            t0 = time.perf_counter()
            approx, _ = choose_layer(model, tok, request, approx_hp, res)
            entry = {**entry, "approx_layer": approx.layer, "approx_seconds": time.perf_counter() - t0,
                     "approx_setting": [wh.approx_grad_steps, wh.approx_top_k]}
            if store:
                store.add(entry)
        LOG.info("agreement %d/%d: case %s exact layer %s", i + 1, len(records), entry["case_id"], entry["exact_layer"])
        entries.append(entry)
    if not entries:
        return {"edits": 0}
    grid = {f"{s}x{k}": sum(_read_off(e, s, k) == e["exact_layer"] for e in entries) / len(entries) for s, k in APPROX_GRID}
    setting = (wh.approx_grad_steps, wh.approx_top_k)
    timed = [e for e in entries if e.get("approx_setting") == list(setting)]
    return {
        "edits": len(entries), "reused_from_file": reused,
        "approx_grad_steps": setting[0], "approx_top_k": setting[1],
        "agreement": sum(_read_off(e, *setting) == e["exact_layer"] for e in entries) / len(entries),
        "agreement_by_setting": grid,
        "exact_scan_seconds": mean([e["exact_seconds"] for e in entries]),
        "approx_scan_seconds": mean([e["approx_seconds"] for e in timed]) if timed else None,
        "approx_runs_matching_read_off": f"{sum(e['approx_layer'] == _read_off(e, *setting) for e in timed)}/{len(timed)}",
        "disagreements": [(e["case_id"], e["exact_layer"], _read_off(e, *setting)) for e in entries
                          if _read_off(e, *setting) != e["exact_layer"]],
    }


def _read_off(entry: dict, steps: int, top_k: int) -> int:
    """The approximate scan's choice for a stored entry (JSON keys are strings)."""
    la_by_pass = {int(l): v for l, v in entry["la_by_pass"].items()}
    return approximate_choice(la_by_pass, {int(l): v for l, v in entry["la"].items()}, steps, top_k)
