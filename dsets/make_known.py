"""Build a model's 'known' CounterFact subset: the facts it already completes correctly.

WilKE edits and measures retention only on facts the unedited model knows: greedy decoding after
``prompt.format(subject)`` reproduces every token of target_true. This is decided by teacher-forced
scoring (``util.scoring.score_targets``), which gives the same verdict as generating, in one pass.

    python -m dsets.make_known --model_name smollm2-135m [--source both] [--limit N] [--data_dir D] [--out PATH]

writes ``counterfact_<model_slug>_known.json`` (``--source counterfact``) or
``counterfact_<model_slug>_known_<source>.json`` into DATA_DIR (atomically) and nothing else. With
``--source both`` the full-schema counterfact.json records win over flat KnowEdit records of the
same case_id, so known records keep every prompt list when one is available.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Optional, Sequence

from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from dsets.counterfact import CounterFactDataset
from dsets.files import atomic_write_json
from dsets.knowedit import load_knowedit_counterfact
from dsets.records import ON_BAD_RECORD_CHOICES, OnBadRecord, merge_by_case_id
from dsets.registry import known_subset_path
from util.globals import Paths, load_paths
from util.scoring import score_targets

log = logging.getLogger(__name__)

SOURCES = ("counterfact", "knowedit", "both")


def filter_known(
    model: nn.Module, tok: PreTrainedTokenizerBase, records: Sequence[dict], batch_size: int = 32
) -> list[dict]:
    """The records whose filled rewrite prompt the model completes greedily with target_true, in order."""
    kept: list[dict] = []
    for start in tqdm(range(0, len(records), batch_size), desc="known filter", unit="batch"):
        chunk = records[start : start + batch_size]
        rewrites = [r["requested_rewrite"] for r in chunk]
        prompts = [rw["prompt"].format(rw["subject"]) for rw in rewrites]
        targets = [rw["target_true"]["str"] for rw in rewrites]
        scores = score_targets(model, tok, prompts, targets, batch_size=batch_size)
        kept.extend(r for r, s in zip(chunk, scores) if s.correct)
    return kept


def candidate_records(paths: Paths, source: str = "both", on_bad_record: OnBadRecord = "raise") -> list[dict]:
    """Records to test, sorted by case_id; with 'both', full-schema records win over flat ones."""
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, not {source!r}")
    lists: list[list[dict]] = []
    if source in ("counterfact", "both"):
        lists.append(CounterFactDataset(paths, on_bad_record=on_bad_record).records)
    if source in ("knowedit", "both"):
        lists.append(load_knowedit_counterfact(paths, on_bad_record).records)
    return sorted(merge_by_case_id(*lists), key=lambda r: r["case_id"])


def build_known_subset(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    paths: Paths,
    model_slug: str,
    source: str = "both",
    limit: Optional[int] = None,
    batch_size: int = 32,
    out: Optional[Path] = None,
    on_bad_record: OnBadRecord = "raise",
) -> Path:
    """Filter the candidates (the first ``limit`` by case_id) and write the known subset atomically."""
    candidates = candidate_records(paths, source, on_bad_record)[:limit]
    known = filter_known(model, tok, candidates, batch_size)
    out = Path(out) if out is not None else known_subset_path(paths, model_slug, source)
    atomic_write_json(out, known)
    rate = len(known) / len(candidates) if candidates else 0.0
    log.info("%s knows %d of %d candidate records (%.1f%%); wrote %s",
             model_slug, len(known), len(candidates), 100 * rate, out)
    if not known:
        log.warning("no known records for %s: the subset at %s is empty", model_slug, out)
    return out


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m dsets.make_known", description=__doc__.split("\n")[0])
    p.add_argument("--model_name", required=True, help="model name as util.models.load_model accepts it")
    p.add_argument("--source", choices=SOURCES, default="both",
                   help="full-schema counterfact.json, flat KnowEdit files, or both")
    p.add_argument("--limit", type=int, default=None, help="test only the first N candidates by case_id")
    p.add_argument("--data_dir", default=None, help="DATA_DIR override (the known subset is written there)")
    p.add_argument("--out", type=Path, default=None, help="output path instead of DATA_DIR/counterfact_<slug>_known.json")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--device", default=None, help="default: cuda when available")
    p.add_argument("--on_bad_record", choices=ON_BAD_RECORD_CHOICES, default="raise")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> Path:
    from util.models import load_model, model_slug  # imported here: loading models is only the CLI's job

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    paths = load_paths(data_dir=args.data_dir)
    model, tok = load_model(args.model_name, paths, device=args.device)
    return build_known_subset(
        model, tok, paths, model_slug(args.model_name), source=args.source, limit=args.limit,
        batch_size=args.batch_size, out=args.out, on_bad_record=args.on_bad_record,
    )


if __name__ == "__main__":
    main()
