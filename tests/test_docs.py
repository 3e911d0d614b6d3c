"""The README is the front door and docs/ holds the rest; both must stay true as the code moves.

Checked here: the README stays short and its quick start is exactly the two commands; every relative
link and image of README.md and docs/*.md points at a file that exists (and a ``#fragment`` at a
heading of that file); every documented ``python -m <module>`` (or ``torchrun ... -m <module>``)
command names a module that exists. ``documented_commands`` is the extraction, meant to be reused
by checks that run each command's pre-model checks.
"""
from __future__ import annotations

import importlib.util
import re
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import pytest

from experiments.summary import doc_tables

REPO_ROOT = Path(__file__).resolve().parent.parent
README = REPO_ROOT / "README.md"
DOCS = sorted((REPO_ROOT / "docs").glob("*.md"))
PAGES = (README, *DOCS)
MAX_README_LINES = 300
QUICK_START = (
    (
        "bash scripts/install.sh && python -m experiments.evaluate --alg_name=WilKE --model_name=smollm2-135m "
        "--hparams_fname=smollm2-135m.json --ds_name=counterfact --dataset_size_limit=64 --edit_times=2 "
        "--skip_generation_tests"
    ),
    "python -m pytest -q",
)
SHELL_LANGS = ("bash", "sh", "shell")
LAUNCHERS = ("python", "python3", "torchrun")
FENCE = re.compile(r"^\s*```(\w*)\s*$")
INLINE_CODE = re.compile(r"`([^`]+)`")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
ASSIGNMENT = re.compile(r"^([A-Za-z_]\w*)=(\S*)$")
OPERATORS = ("&&", "||", ";", "|")
VARIABLE = re.compile(r"\$(?:\{(\w+)\}|(\w+))")


class CodeBlock(NamedTuple):
    lang: str
    first_line: int  # 1-based line number of the block's first content line
    lines: list[str]


class Command(NamedTuple):
    file: Path
    line: int  # 1-based line where the command starts
    command: str  # one shell command: continuations joined, comment dropped, variables expanded


def split_fences(text: str) -> tuple[list[CodeBlock], list[str]]:
    """The fenced code blocks of a markdown text, and its lines with those blocks blanked out
    (so prose and its line numbers can be read without the code)."""
    blocks: list[CodeBlock] = []
    prose: list[str] = []
    current: CodeBlock | None = None
    for number, line in enumerate(text.splitlines(), start=1):
        fence = FENCE.match(line)
        if current is None and fence:
            current = CodeBlock(fence.group(1).lower(), number + 1, [])
        elif current is not None and fence and not fence.group(1):
            blocks.append(current)
            current = None
        elif current is not None:
            current.lines.append(line)
        prose.append(line if current is None and not fence else "")
    assert current is None, "an unclosed ``` block"
    return blocks, prose


def logical_lines(block: CodeBlock) -> list[tuple[int, str]]:
    """(line number, text) of each shell line, with backslash continuations joined."""
    out: list[tuple[int, str]] = []
    pending: tuple[int, str] | None = None
    for offset, raw in enumerate(block.lines):
        start, text = pending if pending else (block.first_line + offset, "")
        text += raw.strip()
        if text.endswith("\\"):
            pending = (start, text[:-1].rstrip() + " ")
            continue
        pending = None
        out.append((start, text))
    if pending:
        out.append(pending)
    return out


def shell_words(line: str) -> list[str]:
    """The words of a shell line up to an unquoted word starting with ``#`` (a comment)."""
    lexer = shlex.shlex(line, posix=True)
    lexer.whitespace_split, lexer.commenters = True, ""
    words = []
    for word in lexer:
        if word.startswith("#"):
            break
        words.append(word)
    return words


def _expand(line: str, variables: dict[str, str]) -> str:
    return VARIABLE.sub(lambda m: variables.get(m.group(1) or m.group(2), m.group(0)), line)


def module_of(command: str) -> str | None:
    """The module a command runs with ``python -m`` or ``torchrun ... -m``; None for other commands."""
    words = shlex.split(command)
    for i, word in enumerate(words):
        if Path(word).name in LAUNCHERS:
            rest = words[i + 1:]
            return rest[rest.index("-m") + 1] if "-m" in rest[:-1] else None
    return None


def module_of_safe(text: str) -> str | None:
    """``module_of`` for text that may not be a shell line at all (an unbalanced quote)."""
    try:
        return module_of(text)
    except ValueError:
        return None


def _block_commands(path: Path, block: CodeBlock, variables: dict[str, str]) -> list[Command]:
    """Module commands of one shell block; ``NAME=value`` lines set variables for later blocks."""
    found = []
    for number, line in logical_lines(block):
        words = shell_words(_expand(line, variables))
        assignment = ASSIGNMENT.match(words[0]) if len(words) == 1 else None
        if assignment:
            variables[assignment.group(1)] = assignment.group(2)
            continue
        segment: list[str] = []
        for word in [*words, ";"]:
            if word not in OPERATORS:
                segment.append(word)
                continue
            if segment and module_of(shlex.join(segment)):
                found.append(Command(path, number, shlex.join(segment)))
            segment = []
    return found


def _inline_commands(path: Path, prose: list[str]) -> list[Command]:
    """Module commands written as inline code spans in the prose (spans may wrap lines)."""
    text = "\n".join(prose)
    found = []
    for match in INLINE_CODE.finditer(text):
        span = " ".join(match.group(1).split())
        if module_of_safe(span):
            found.append(Command(path, text.count("\n", 0, match.start()) + 1, span))
    return found


def documented_commands(pages: Sequence[Path] = PAGES, inline: bool = False) -> list[Command]:
    """Every ``python -m`` / ``torchrun -m`` command in the shell code blocks of ``pages``, in order,
    with its file and line. A ``NAME=value`` line sets ``$NAME`` for the page's later commands.
    ``inline=True`` adds inline code spans of the prose, which are often fragments (``...``)."""
    commands: list[Command] = []
    for path in pages:
        blocks, prose = split_fences(path.read_text(encoding="utf-8"))
        variables: dict[str, str] = {}
        for block in blocks:
            if block.lang in SHELL_LANGS:
                commands += _block_commands(path, block, variables)
        if inline:
            commands += _inline_commands(path, prose)
    return commands


def heading_anchors(path: Path) -> set[str]:
    """GitHub's anchors for the headings of a markdown file (duplicates get -1, -2, ...)."""
    _, prose = split_fences(path.read_text(encoding="utf-8"))
    anchors: set[str] = set()
    for line in prose:
        heading = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not heading:
            continue
        slug = re.sub(r"[^\w\- ]", "", heading.group(1).replace("`", "").lower()).replace(" ", "-")
        candidate, n = slug, 0
        while candidate in anchors:
            n += 1
            candidate = f"{slug}-{n}"
        anchors.add(candidate)
    return anchors


def relative_links(path: Path) -> list[tuple[int, str]]:
    """(line, target) of every link and image of a markdown file that is not a URL, outside code."""
    _, prose = split_fences(path.read_text(encoding="utf-8"))
    links = []
    for number, line in enumerate(prose, start=1):
        for target in LINK.findall(INLINE_CODE.sub("", line)):
            if not re.match(r"^[a-z][a-z0-9+.-]*:", target):
                links.append((number, target))
    return links


def rel(path: Path) -> str:
    return str(path.relative_to(REPO_ROOT))


def test_readme_is_short():
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n < MAX_README_LINES, f"README.md has {n} lines; move detail to docs/ (limit {MAX_README_LINES})"


def test_quick_start_is_the_two_commands():
    text = README.read_text(encoding="utf-8")
    assert "\n## Quick start\n" in text, "README.md has no '## Quick start' section"
    section = text.split("\n## Quick start\n", 1)[1].split("\n## ", 1)[0]
    blocks, _ = split_fences(section)
    assert blocks, "no code block in the quick start"
    assert blocks[0].lang == "bash", f"the quick start block is ```{blocks[0].lang}, not ```bash"
    assert tuple(line for line in blocks[0].lines if line.strip()) == QUICK_START


def test_every_doc_page_is_in_the_index():
    index = REPO_ROOT / "docs" / "README.md"
    linked = {(index.parent / target.split("#")[0]).resolve() for _, target in relative_links(index)}
    missing = [rel(p) for p in DOCS if p != index and p.resolve() not in linked]
    assert not missing, f"docs/README.md does not link {missing}"


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_relative_links_resolve(page: Path):
    broken = []
    for number, target in relative_links(page):
        file_part, _, fragment = target.partition("#")
        dest = (page.parent / file_part).resolve() if file_part else page
        if not dest.is_file():
            broken.append(f"{rel(page)}:{number}: {target} (no such file)")
        elif fragment and dest.suffix == ".md" and fragment not in heading_anchors(dest):
            broken.append(f"{rel(page)}:{number}: {target} (no heading #{fragment} in {rel(dest)})")
    assert not broken, "\n".join(broken)


TABLE_SEPARATOR = re.compile(r"^\|(\s*:?-+:?\s*\|)+\s*$")


def unended_tables(text: str) -> list[int]:
    """Lines (1-based) of text that directly follow a Markdown table's last row: GitHub reads such a
    line as one more row of the table."""
    lines = text.split("\n")
    found, in_table = [], False
    for i, line in enumerate(lines):
        if in_table and not line.startswith("|"):
            in_table = False
            if line.strip():
                found.append(i + 1)
        if not in_table and line.startswith("|") and i + 1 < len(lines) and TABLE_SEPARATOR.match(lines[i + 1]):
            in_table = True
    return found


def test_a_table_ends_at_a_blank_line_not_in_the_text_after_it():
    assert unended_tables("| a |\n|---|\n| 1 |\ntext\n\n| b |\n|---|\n\n||x|| is a norm\n- item") == [4]
    late = {rel(p): unended_tables(p.read_text(encoding="utf-8")) for p in PAGES}
    assert not {page: lines for page, lines in late.items() if lines}, late


def test_documented_commands_are_found():
    """The extraction sees the quick start, joined continuations, torchrun and expanded variables."""
    commands = documented_commands()
    texts = [c.command for c in commands]
    assert texts[:2] == [QUICK_START[0].split(" && ")[1], QUICK_START[1]]
    assert any(module_of(t) == "experiments.collect_stats" and t.startswith("torchrun") for t in texts)
    assert not any("\\" in t or "$M" in t for t in texts), "a continuation or $M was left in a command"
    assert any("--metrics ES,GS,LS,LU,PS," in t and "--paired_with" in t for t in texts)


def test_extraction_of_a_block(tmp_path: Path):
    page = tmp_path / "page.md"
    page.write_text("text `python -m pkg.inline --x`\n\n```bash\nA=1,2\npython -m pkg.a --v $A \\\n"
                    "    --w   # comment; not a command\nnice -n 10 torchrun --nproc_per_node 2 -m pkg.b\n"
                    "ls && python3 -m pkg.c\necho done\n```\n\n```python\npython -m not.shell\n```\n")
    assert documented_commands([page]) == [
        Command(page, 5, "python -m pkg.a --v 1,2 --w"),
        Command(page, 7, "nice -n 10 torchrun --nproc_per_node 2 -m pkg.b"),
        Command(page, 8, "python3 -m pkg.c"),
    ]
    assert documented_commands([page], inline=True)[-1] == Command(page, 1, "python -m pkg.inline --x")


@pytest.mark.parametrize("command", documented_commands(inline=True),
                         ids=lambda c: f"{rel(c.file)}:{c.line}")
def test_documented_module_exists(command: Command):
    module = module_of(command.command)
    try:
        spec = importlib.util.find_spec(module)
    except ModuleNotFoundError:  # a parent package is missing
        spec = None
    assert spec is not None, (
        f"{rel(command.file)}:{command.line}: no module {module!r} for `{command.command}`")


# ------------------------------------------------------------------------------------------------
# Every documented command runs as printed, as far as this machine can run it without a model:
# evaluate through every check it makes before the model loads (with the shared data where a command
# names it), every other CLI through its own argument parser, the rest through --help.


def module_arguments(command: str) -> tuple[str, list[str]]:
    words = shlex.split(command)
    start = next(i for i, w in enumerate(words) if w == "-m") + 2
    return words[start - 1], words[start:]


def run_as_printed(command: str) -> str | None:
    """Check ``command``; None when fully checked, else what cannot be checked on this machine."""
    import importlib

    module, argv = module_arguments(command)
    if module == "experiments.evaluate":
        from experiments.evaluate import parse_args
        from experiments.run.setup import check_without_model

        return check_without_model(parse_args(argv))
    if module == "pytest":
        return "the test command itself"
    cli = importlib.import_module(module)
    if not hasattr(cli, "parse_args") and hasattr(cli, "__path__"):  # a package run through its __main__
        cli = importlib.import_module(f"{module}.cli")
    if hasattr(cli, "parse_args"):
        cli.parse_args(argv)
        return None
    proc = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return "only --help (no parse_args to give the printed arguments to)"


@pytest.mark.parametrize("command", documented_commands(), ids=lambda c: f"{c.file.name}:{c.line}")
def test_documented_command_runs_as_printed(command: Command):
    unchecked = run_as_printed(command.command)
    if unchecked:
        pytest.skip(f"{command.file.name}:{command.line}: checked up to what this machine lacks: {unchecked}")


# ------------------------------------------------------------------------------------------------
# Results tables under a marker ``<!-- table: docs/results/<name>.json [--metrics A,B] -->`` are what
# ``python -m experiments.summarize --from_summary`` prints from that saved summary, to the character
# (``--refresh_tables PAGE`` rewrites them so; experiments/summary/doc_tables.py);
# the summary itself is what the command above the table wrote with ``--out`` from the run folders.

def marked_tables(path: Path) -> list[tuple[int, str, str | None, bool, str]]:
    """(line, summary file, metrics, norms, the table that follows the marker) of every marker in ``path``."""
    return [(m.line, m.summary, ",".join(m.metrics) if m.metrics else None, m.norms, m.table)
            for m in doc_tables.marked_tables(path.read_text(encoding="utf-8"))]


MARKED = [(page, *t) for page in DOCS for t in marked_tables(page)]


@pytest.mark.parametrize("page, line, summary, metrics, norms, table", MARKED, ids=[f"{m[0].name}:{m[1]}" for m in MARKED])
def test_results_table_is_what_its_saved_summary_prints(page, line, summary, metrics, norms, table):
    from experiments.summarize import reprint

    path = REPO_ROOT / summary
    assert path.is_file(), f"{page.name}:{line}: {summary} is not in the repository"
    assert table and reprint(path, metrics.split(",") if metrics else None, norms) == table, f"{page.name}:{line}"
    text = page.read_text(encoding="utf-8")
    assert f"--out {Path(summary).with_suffix('')}" in text, f"{page.name}: no summarize command writes {summary}"
