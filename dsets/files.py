"""Finding data files: DATA_DIR, its fallbacks, then the official ROME download.

Users with internet get ROME's behaviour (a missing file is fetched into DATA_DIR); offline, the
failure says where to put the file instead of surfacing a bare urllib traceback.
"""
from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from util.atomic_files import atomic_path
from util.globals import Paths, load_paths

log = logging.getLogger(__name__)

DOWNLOAD_TIMEOUT_S = 10.0
SHARED_HINT = "in this environment the ROME data folder is mirrored at ../shared/data/dsets"


class DataFileMissingError(FileNotFoundError):
    """A data file that is neither on disk nor downloadable; the message says where to put it."""


def as_paths(data_dir: Paths | str | Path) -> Paths:
    """Accept ROME-style ``data_dir`` strings as well as ``Paths`` (the fallbacks of globals.yml still apply)."""
    if isinstance(data_dir, Paths):
        return data_dir
    return load_paths(data_dir=str(data_dir))


def official_url(paths: Paths, name: str) -> str:
    """Where ROME serves a file of its data folder."""
    return f"{paths.remote_root_url.rstrip('/')}/data/dsets/{name}"


def atomic_write_bytes(path: Path, chunks: Any) -> Path:
    """Write an iterable of byte chunks to a temporary file beside ``path``, then rename it into place."""
    # mode=None: the umask's permissions, so a shared DATA_DIR stays as its owners set it up.
    with atomic_path(path, mode=None) as tmp, tmp.open("xb") as f:
        for chunk in chunks:
            f.write(chunk)
    return path


def atomic_write_json(path: Path, obj: Any) -> Path:
    """JSON written so that a crash never leaves a truncated file that later loads as a short dataset."""
    text = json.dumps(obj, indent=2, ensure_ascii=False) + "\n"
    return atomic_write_bytes(path, [text.encode("utf-8")])


def _response_chunks(response: Any, name: str, chunk_size: int = 1 << 20) -> Any:
    total = int(response.headers.get("Content-Length") or 0) or None
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {name}") as bar:
        while chunk := response.read(chunk_size):
            bar.update(len(chunk))
            yield chunk


def download(url: str, dest: Path, timeout: float = DOWNLOAD_TIMEOUT_S) -> Path:
    """Fetch ``url`` into ``dest`` atomically; network errors propagate as OSError/URLError."""
    log.info("downloading %s to %s", url, dest)
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return atomic_write_bytes(dest, _response_chunks(response, dest.name))


def missing_message(paths: Paths, name: str, reason: str) -> str:
    searched = ", ".join(str(p) for p in (paths.data_dir, *paths.data_dir_fallbacks))
    return (
        f"{name} not found (searched {searched}); {reason}. Put {name} in {paths.data_dir} "
        f"(DATA_DIR in globals.yml, WILKE_DATA_DIR or --data_dir) or list its folder in "
        f"DATA_DIR_FALLBACKS; {SHARED_HINT}. Official copy: {official_url(paths, name)}"
    )


def locate_or_download(paths: Paths, name: str, allow_download: bool = True) -> Path:
    """The file ``name`` from DATA_DIR or a fallback, else downloaded into DATA_DIR."""
    found = paths.find_data_file(name)
    if found is not None:
        return found
    if not allow_download:
        raise DataFileMissingError(missing_message(paths, name, "downloading is disabled"))
    url = official_url(paths, name)
    try:
        return download(url, paths.data_dir / name)
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise DataFileMissingError(missing_message(paths, name, f"the download from {url} failed ({e})")) from None
