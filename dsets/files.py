"""Finding data files: DATA_DIR, its fallbacks, then the official download.

Users with internet get ROME's behaviour (a missing file is fetched into DATA_DIR); offline, the
failure says where to put the file instead of surfacing a bare urllib traceback.

Official copies come from REMOTE_ROOT_URL (ROME's site by default), except the files only MEMIT's
site serves: MEMIT and AlphaEdit (globals.yml ``REMOTE_ROOT_URL: https://memit.baulab.info``)
download ``multi_counterfact.json`` from there, and ROME's code never reads it. A REMOTE_ROOT_URL
other than ROME's (a mirror) is used for every file.
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
SHARED_HINT = ("in this environment part of the ROME data folder is mirrored at ../shared/data/dsets "
               "(../shared/data/README.md lists what is there)")
ROME_ROOT_URL = "https://rome.baulab.info"
MEMIT_ROOT_URL = "https://memit.baulab.info"
MEMIT_ONLY_FILES = ("multi_counterfact.json",)


class DataFileMissingError(FileNotFoundError):
    """A data file that is neither on disk nor downloadable; the message says where to put it."""


def as_paths(data_dir: Paths | str | Path) -> Paths:
    """Accept ROME-style ``data_dir`` strings as well as ``Paths`` (the fallbacks of globals.yml still apply)."""
    if isinstance(data_dir, Paths):
        return data_dir
    return load_paths(data_dir=str(data_dir))


def official_url(paths: Paths, name: str) -> str:
    """Where the official site serves a file of its data folder (MEMIT's for MEMIT's files)."""
    root = paths.remote_root_url.rstrip("/")
    if name in MEMIT_ONLY_FILES and root == ROME_ROOT_URL:
        root = MEMIT_ROOT_URL
    return f"{root}/data/dsets/{name}"


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


def missing_message(paths: Paths, name: str, reason: str, aliases: tuple[str, ...] = ()) -> str:
    searched = ", ".join(str(p) for p in (paths.data_dir, *paths.data_dir_fallbacks))
    also = f" (or under the name {' or '.join(aliases)})" if aliases else ""
    return (
        f"{name}{also} not found (searched {searched}); {reason}. Put {name} in {paths.data_dir} "
        f"(DATA_DIR in globals.yml, WILKE_DATA_DIR or --data_dir) or list its folder in "
        f"DATA_DIR_FALLBACKS; {SHARED_HINT}. Official copy: {official_url(paths, name)}"
    )


def locate_or_download(paths: Paths, name: str, allow_download: bool = True, aliases: tuple[str, ...] = ()) -> Path:
    """The file ``name`` (or one of its ``aliases``: other names copies of it go by) from DATA_DIR
    or a fallback, else ``name`` downloaded into DATA_DIR."""
    for candidate in (name, *aliases):
        found = paths.find_data_file(candidate)
        if found is not None:
            return found
    if not allow_download:
        raise DataFileMissingError(missing_message(paths, name, "downloading is disabled", aliases))
    url = official_url(paths, name)
    try:
        return download(url, paths.data_dir / name)
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = f"the download from {url} failed ({e})"
        raise DataFileMissingError(missing_message(paths, name, reason, aliases)) from None
