"""Summarise lifelong-editing runs: ES, GS, LS, ERS, ORS and S per algorithm and checkpoint.

    python -m experiments.summarize --dir_name WilKE,ROME [--runs run_000,run_001] \
        [--checkpoints 1,2,4] [--results_dir R] [--plots DIR] [--out FILE] [--paired_with ROME]

Reads the run folders of ``experiments.evaluate`` (see ``experiments.summary.runs``), prints mean
and std over runs of every score (definitions in ``experiments.summary.metrics``), writes the table
as CSV and JSON (``--out``; default ``<results_dir>/summary_<dir names>.csv`` and ``.json``) and,
with ``--plots``, the figures of ``experiments.summary.plots`` as PNG. Run folders that are incomplete or
damaged are reported and left out; they never stop the summary. ``--paired_with B`` adds every other
algorithm's difference from B seed by seed on the same edit stream (``experiments.summary.paired``);
``--norms`` the edited weights' and value vectors' norms at each checkpoint (``experiments.summary.norm_table``).
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from experiments.store.files import write_json_atomic
from experiments.summary.metrics import DEFAULT_FLASH_FACTOR, Summary, summarize
from experiments.summary.norm_table import format_norm_markdown, summary_norm_rows
from experiments.summary.paired import format_paired_markdown, paired_differences, paired_json, paired_rows_from_json
from experiments.summary.runs import available_dir_names, load_runs
from experiments.summary.saved import read_summary, summary_from_json, with_saved
from experiments.summary.timing import format_timing
from util.atomic_files import write_text_atomic
from util.globals import REPO_ROOT, load_paths

LOG = logging.getLogger("experiments.summarize")
EXIT_NO_RUNS, EXIT_PLOT_FAILED = 2, 1


def _csv_list(text: Optional[str]) -> Optional[list[str]]:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def _checkpoint_list(text: str) -> list[int]:
    try:
        points = sorted({int(t) for t in text.split(",") if t.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"--checkpoints wants comma-separated integers, got {text!r}") from None
    if not points or points[0] < 1:
        raise argparse.ArgumentTypeError("--checkpoints must be positive edit counts")
    return points


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments.summarize", description=__doc__.split("\n")[0])
    p.add_argument("--dir_name", default=None,
                   help="results sub-folder(s), comma-separated (default: every folder with run_NNN inside)")
    p.add_argument("--runs", default=None, help="run folders to use, comma-separated (default: all)")
    p.add_argument("--checkpoints", type=_checkpoint_list, default=None,
                   help="edit counts, comma-separated (default: every retention checkpoint of the runs)")
    p.add_argument("--results_dir", default=None, help="default: RESULTS_DIR of globals.yml / $WILKE_RESULTS_DIR")
    p.add_argument("--plots", default=None, help="folder for the PNG figures")
    p.add_argument("--out", default=None, help="table file (.csv or .json; the other format is written beside it)")
    p.add_argument("--flash_factor", type=float, default=DEFAULT_FLASH_FACTOR,
                   help="a toxicity flash is an update norm above this many times the median of earlier edits")
    p.add_argument("--include_partial", action="store_true", help="also summarise runs that stopped before edit_times")
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown too (for a README or a paper)")
    p.add_argument("--metrics", default=None, help="--markdown: these columns only, comma-separated (default: all)")
    p.add_argument("--paired_with", default=None,
                   help="a --dir_name to pair against: each other algorithm minus it, per seed on the same "
                        "edit stream, mean ± std and sign count over the seeds")
    p.add_argument("--from_summary", default=None,
                   help="print the tables of a summary JSON this command wrote earlier (no run folders read): "
                   "how docs/results/*.json reprint the tables of docs/results.md; with --plots, draw its figures")
    p.add_argument("--with_summary", default=None, metavar="JSON",
                   help="saved summaries (comma-separated) whose algorithms join the table and the figures, before "
                   "the runs read now: comparisons whose runs finished on different machines")
    p.add_argument("--refresh_tables", default=None, metavar="PAGE",
                   help="rewrite every table of a Markdown page marked <!-- table: SUMMARY.json --> from its saved "
                   "summary (after its summarize command has written it again); no run folders read")
    p.add_argument("--norms", action="store_true",
                   help="also print the norm growth at each checkpoint (edited weights, update, ||v*||, ||v0||; percent "
                   "per 100 edits): the numbers of norm_growth.png")
    p.add_argument("--timing", action="store_true",
                   help="also print where each run's time went (editing, evaluation, WILD, probes, statistics)")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    if args.flash_factor <= 0:
        p.error("--flash_factor must be positive")
    return args


def table_columns(summary: Summary) -> list[str]:
    metrics = summary.present_metrics()
    return ["algorithm", "checkpoint", "n_runs", "runs", "evaluated"] + [f"{m}_{s}" for m in metrics for s in ("mean", "std")]


def _plain(value: Any) -> Any:
    """NaN as None: JSON has no NaN, and an empty CSV cell reads as missing everywhere."""
    return None if isinstance(value, float) and math.isnan(value) else value


def table_csv(summary: Summary) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=table_columns(summary), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in summary.rows:
        writer.writerow({k: "" if _plain(v) is None else v for k, v in row.items()})
    return buf.getvalue()


def summary_json(summary: Summary, results_dir: Path) -> dict[str, Any]:
    columns = table_columns(summary)
    return {
        "results_dir": str(results_dir),
        "algorithms": summary.algorithms,
        "metrics": summary.present_metrics(),
        "flash_factor": summary.flash_factor,
        "std": "population standard deviation over runs (ddof=0)",
        "rows": [{k: _plain(row[k]) for k in columns} for row in summary.rows],
        "per_run": [{k: _plain(v) for k, v in row.items()} for row in summary.per_run],
        # what norm_growth.png draws, so the figure can be drawn again once the run folders are gone
        "norm_curves": [c.to_json() for a in summary.algorithms for c in summary.norm_curves_of(a) if not c.empty],
        "skipped": [{"path": str(s.path), "reason": s.reason} for s in summary.skipped],
        "notes": summary.notes,
    }


def checkpoint_cell(row: dict[str, Any]) -> str:
    """n, and how many records a sampled checkpoint averaged over (``--eval_sample``)."""
    n, evaluated = row["checkpoint"], row.get("evaluated", row["checkpoint"])
    return str(n) if evaluated >= n else f"{n} ({evaluated} sampled)"


def format_table(summary: Summary, digits: int = 3) -> str:
    """The table as aligned text, each cell 'mean±std'."""
    metrics = summary.present_metrics()
    header = ["algorithm", "n", "runs", *metrics]
    lines = [header]
    for row in summary.rows:
        cells = [row["algorithm"], checkpoint_cell(row), str(row["n_runs"])]
        for m in metrics:
            mean, std = _plain(row[f"{m}_mean"]), _plain(row[f"{m}_std"])
            cells.append("-" if mean is None else f"{mean:.{digits}f}±{std:.{digits}f}")
        lines.append(cells)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths))) for line in lines)


def checked_metrics(summary: Summary, metrics: Optional[Sequence[str]]) -> list[str]:
    """``--metrics`` (default: every metric the runs have); ValueError naming any the runs lack."""
    present = summary.present_metrics()
    unknown = [m for m in metrics or () if m not in present]
    if unknown:
        raise ValueError(f"--metrics: {', '.join(unknown)} not in these runs (they have {', '.join(present)})")
    return list(metrics or present)


def format_markdown(summary: Summary, metrics: Optional[Sequence[str]] = None, digits: int = 3) -> str:
    """The table as Markdown: 'mean ± std (population)' where several runs were averaged, the value alone for one."""
    metrics = checked_metrics(summary, metrics)
    lines = ["| " + " | ".join(["algorithm", "after n edits", "runs", *metrics]) + " |", "|" + "---|" * (3 + len(metrics))]
    for row in summary.rows:
        cells = [row["algorithm"], checkpoint_cell(row), str(row["n_runs"])]
        for m in metrics:
            mean, std = _plain(row[f"{m}_mean"]), _plain(row[f"{m}_std"])
            cells.append("-" if mean is None else f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if row["n_runs"] > 1 else ""))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def output_paths(out: Optional[str], results_dir: Path, dir_names: Sequence[str]) -> tuple[Path, Path]:
    """(csv, json) paths: ``--out`` with either suffix, or a default under the results folder."""
    base = Path(out) if out else results_dir / f"summary_{'+'.join(dir_names)}.csv"
    stem = base.with_suffix("") if base.suffix.lower() in (".csv", ".json") else base
    return stem.with_name(stem.name + ".csv"), stem.with_name(stem.name + ".json")


def _report(summary: Summary) -> None:
    print(format_table(summary))
    for note in summary.notes:
        print(f"note: {note}")
    if summary.skipped:
        print(f"\nSkipped {len(summary.skipped)} run folder(s):")
        for s in summary.skipped:
            print(f"  {s.path}: {s.reason}")


def _report_paired(summary: Summary, baseline: str, metrics: Optional[Sequence[str]]) -> dict[str, Any]:
    """Print the paired differences from ``baseline`` as Markdown; return them for the JSON file."""
    metrics = checked_metrics(summary, metrics)
    rows, notes = paired_differences(summary, baseline)
    print(f"\nPaired differences from {baseline} (same seed, same edit stream; ↑/↓: seeds above/below):")
    print(format_paired_markdown(rows, metrics))
    for note in notes:
        print(f"note: {note}")
    return paired_json(rows, notes)


def reprint(path: Path, metrics: Optional[Sequence[str]], norms: bool = False) -> str:
    """The Markdown tables of a saved summary: the scores, then the paired differences if it has them;
    with ``norms``, its norm table alone (``<!-- table: X.json --norms -->`` on a results page)."""
    data = json.loads(Path(path).read_text())
    summary = summary_from_json(data, str(path))
    if norms:
        return format_norm_markdown(summary_norm_rows(summary))
    text = format_markdown(summary, metrics)
    if "paired" in data:
        text += "\n\n" + format_paired_markdown(paired_rows_from_json(data["paired"]), checked_metrics(summary, metrics))
    return text


def norm_report(summary: Summary) -> str:
    """The norm table of every algorithm whose runs recorded norms, at the checkpoints of its rows."""
    rows = summary_norm_rows(summary)
    if not rows:
        return "\nNorms: no run here recorded weight or value norms (methods without value vectors, or older runs)"
    return ("\nNorm growth (edited weights' joint ||W||_F; the fastest-growing weight's ratio to after step 1; the "
            "update's ||Delta||_F, mean ||v*|| and ||v0||, each over the last steps holding about 16 edits, one step in "
            "batches of 16 or more; %/100: growth per 100 edits since the "
            "checkpoint before):\n"
            + format_norm_markdown(rows))


def _refresh(page: Path) -> int:
    from experiments.summary.doc_tables import refresh_tables

    try:
        changed = refresh_tables(page, REPO_ROOT, reprint)
    except (OSError, ValueError, KeyError) as e:  # a missing page or summary, or one this code cannot read
        print(f"--refresh_tables: {e}", file=sys.stderr)
        return EXIT_NO_RUNS
    print(f"{page}: {len(changed)} table(s) rewritten" + "".join(f"\n  from {c}" for c in changed))
    return 0


def _draw(summary: Summary, out_dir: Path) -> int:
    from experiments.summary.plots import save_figures

    saved = save_figures(summary, out_dir)
    print(f"Plots in {out_dir}: {', '.join(saved.paths) or 'none'}")
    for name, error in saved.failures.items():
        print(f"  could not draw {name}: {error}", file=sys.stderr)
    return EXIT_PLOT_FAILED if saved.failures else 0


def _with_saved_summaries(summary: Summary, paths: Sequence[str]) -> Summary:
    """The saved summaries' algorithms before the runs read now, the first file's first (ValueError naming
    the file that cannot be read or that repeats an algorithm)."""
    for path in reversed(paths):
        summary = with_saved(summary, read_summary(Path(path)), path)
    return summary


def _from_summary(args: argparse.Namespace) -> int:
    try:
        summary = read_summary(Path(args.from_summary))  # a missing or foreign file: named, not a traceback
        print(reprint(Path(args.from_summary), _csv_list(args.metrics)))
        if args.norms:
            print(norm_report(summary))
    except ValueError as e:
        print(e, file=sys.stderr)
        return EXIT_NO_RUNS
    return _draw(summary, Path(args.plots)) if args.plots else 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.from_summary:
        return _from_summary(args)
    if args.refresh_tables:
        return _refresh(Path(args.refresh_tables))
    results_dir = load_paths(results_dir=args.results_dir).results_dir
    dir_names = _csv_list(args.dir_name) or available_dir_names(results_dir)
    if not dir_names:
        print(f"no run folders under {results_dir}", file=sys.stderr)
        return EXIT_NO_RUNS
    loaded = load_runs(results_dir, dir_names, _csv_list(args.runs), args.include_partial)
    summary = summarize(loaded, args.checkpoints, args.flash_factor)
    if not summary.runs:
        _report(summary)
        print(f"no usable runs of {', '.join(dir_names)} under {results_dir}", file=sys.stderr)
        return EXIT_NO_RUNS
    try:
        summary = _with_saved_summaries(summary, _csv_list(args.with_summary) or [])
    except ValueError as e:
        print(f"--with_summary: {e}", file=sys.stderr)
        return EXIT_NO_RUNS
    _report(summary)
    if args.norms:
        print(norm_report(summary))
    if args.timing:
        print("\nWhere the time went (from the runs' files):\n" + format_timing(summary.runs))
    if args.markdown:
        try:
            print("\n" + format_markdown(summary, _csv_list(args.metrics)))
        except ValueError as e:
            print(e, file=sys.stderr)
            return EXIT_NO_RUNS
    data = summary_json(summary, results_dir)
    if args.paired_with:
        try:
            data["paired"] = _report_paired(summary, args.paired_with, _csv_list(args.metrics))
        except ValueError as e:
            print(e, file=sys.stderr)
            return EXIT_NO_RUNS
    csv_path, json_path = output_paths(args.out, results_dir, dir_names)
    write_text_atomic(csv_path, table_csv(summary))
    write_json_atomic(json_path, data)
    print(f"\nTable: {csv_path} and {json_path}")
    return _draw(summary, Path(args.plots)) if args.plots else 0


if __name__ == "__main__":
    sys.exit(main())
