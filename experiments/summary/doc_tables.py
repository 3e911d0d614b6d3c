"""The results tables of a Markdown page, kept equal to the saved summaries they come from.

A page marks each table with ``<!-- table: docs/results/<name>.json [--metrics A,B] [--norms] -->``; the
Markdown tables that follow it (a summary's scores and, where it has them, its paired differences, a
blank line between; with ``--norms``, its norm table alone) are what ``python -m experiments.summarize
--from_summary <name>.json`` prints. When
runs are added and the summary is written again (its command, with ``--out``, sits above the table),
``python -m experiments.summarize --refresh_tables docs/results.md`` rewrites every marked table from
its summary, so the page never holds a hand-copied number; tests/test_docs.py checks they agree.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from util.atomic_files import write_text_atomic

TABLE_MARKER = re.compile(r"^<!-- table: (\S+)(?: --metrics (\S+))?( --norms)? -->$")


@dataclass(frozen=True)
class MarkedTable:
    """One marker: its line (1-based), the summary file and metrics it names, whether it marks the norm
    table, the lines its tables span."""

    line: int
    summary: str
    metrics: Optional[list[str]]
    norms: bool
    first: int  # index (0-based) of the first table line after the marker; == end when there is none
    end: int  # index just past the last table line
    table: str  # the tables as the page holds them, blank-line separated


def _table_span(lines: Sequence[str], start: int) -> tuple[int, int, list[list[str]]]:
    """(first, end, blocks): the tables that follow ``start`` (after blank lines), a blank line between
    two of them; with none, first == end is where they go."""
    i = start
    while i < len(lines) and not lines[i].strip():
        i += 1
    first = end = i
    blocks: list[list[str]] = []
    while i < len(lines) and (lines[i].startswith("|") or not lines[i].strip()):
        if lines[i].startswith("|"):
            if not blocks or not lines[i - 1].strip():
                blocks.append([])
            blocks[-1].append(lines[i])
            end = i + 1
        i += 1
    return first, end, blocks


def marked_tables(text: str) -> list[MarkedTable]:
    """Every marker of a page, with the tables that follow it."""
    lines = text.splitlines()
    found = []
    for i, line in enumerate(lines):
        m = TABLE_MARKER.match(line.strip())
        if m:
            first, end, blocks = _table_span(lines, i + 1)
            found.append(MarkedTable(i + 1, m.group(1), m.group(2).split(",") if m.group(2) else None, bool(m.group(3)),
                                     first, end, "\n\n".join("\n".join(b) for b in blocks)))
    return found


def refresh_tables(page: Path, root: Path, reprint: Callable[[Path, Optional[Sequence[str]], bool], str]) -> list[str]:
    """Rewrite ``page``'s marked tables with what ``reprint`` prints from each summary (paths relative to
    ``root``); returns the summaries whose tables changed. A marker whose summary is missing is an error
    that names it, and the page is left as it was."""
    text = Path(page).read_text(encoding="utf-8")
    lines = text.splitlines()
    changed, out, at = [], [], 0
    for marked in marked_tables(text):
        summary = root / marked.summary
        if not summary.is_file():
            raise FileNotFoundError(f"{page}:{marked.line}: the marked summary {marked.summary} does not exist")
        fresh = reprint(summary, marked.metrics, marked.norms)
        out += lines[at:marked.first] + fresh.split("\n")
        at = marked.end
        if at < len(lines) and lines[at].strip():  # a table written for the first time: a blank line ends it
            out.append("")
        if fresh != marked.table:
            changed.append(marked.summary)
    out += lines[at:]
    if changed:
        write_text_atomic(Path(page), "\n".join(out) + ("\n" if text.endswith("\n") else ""))
    return changed
