"""The tf-idf vectorizer of ROME's consistency metric (idf.npy + tfidf_vocab.json).

Found in DATA_DIR or its fallbacks, else downloaded; when neither works but attribute_snippets.json
is available the statistics are fitted on its texts and saved, as ROME does. Otherwise
``DataFileMissingError`` (a FileNotFoundError) with the official URLs, so callers can skip the
consistency metric and still compute fluency.
"""
from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np

from dsets.attr_snippets import AttributeSnippets
from dsets.files import DataFileMissingError, as_paths, atomic_write_bytes, atomic_write_json, locate_or_download
from dsets.records import DataFormatError, read_json
from util.globals import Paths

log = logging.getLogger(__name__)

IDF_FILE = "idf.npy"
VOCAB_FILE = "tfidf_vocab.json"


def _vectorizer(idf: np.ndarray, vocab: dict, source: Path):
    """A fitted ``TfidfVectorizer`` from stored statistics (no refit)."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    if not isinstance(vocab, dict) or len(vocab) != len(idf):
        raise DataFormatError(f"{source}: vocabulary has {len(vocab)} entries but idf has {len(idf)}")
    vec = TfidfVectorizer()
    vec.vocabulary_ = {str(k): int(v) for k, v in vocab.items()}
    vec.idf_ = np.asarray(idf, dtype=np.float64)
    return vec


def _fit_from_snippets(paths: Paths, allow_download: bool, missing: DataFileMissingError) -> tuple[Path, Path]:
    """ROME's fallback: fit idf on the attribute snippets and save both files into DATA_DIR."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    try:
        snippets = AttributeSnippets(paths, allow_download=allow_download)
    except DataFileMissingError as e:
        raise DataFileMissingError(f"{missing}\nCannot rebuild them either: {e}") from None
    log.info("fitting tf-idf statistics on %s", snippets.source)
    vec = TfidfVectorizer().fit(snippets.texts())
    buffer = io.BytesIO()
    np.save(buffer, vec.idf_)
    idf_path = atomic_write_bytes(paths.data_dir / IDF_FILE, [buffer.getvalue()])
    vocab_path = atomic_write_json(paths.data_dir / VOCAB_FILE, {k: int(v) for k, v in vec.vocabulary_.items()})
    return idf_path, vocab_path


def get_tfidf_vectorizer(data_dir: Paths | str | Path, allow_download: bool = True):
    """The tf-idf vectorizer ROME's consistency metric uses (an sklearn ``TfidfVectorizer``)."""
    paths = as_paths(data_dir)
    try:
        idf_path = locate_or_download(paths, IDF_FILE, allow_download)
        vocab_path = locate_or_download(paths, VOCAB_FILE, allow_download)
    except DataFileMissingError as missing:
        idf_path, vocab_path = _fit_from_snippets(paths, allow_download, missing)
    try:
        idf = np.load(idf_path)
    except (ValueError, OSError) as e:
        raise DataFormatError(f"{idf_path}: not a numpy array file ({e})") from None
    return _vectorizer(idf, read_json(vocab_path), vocab_path)
