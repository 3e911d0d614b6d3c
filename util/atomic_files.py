"""One way to write a file so that readers never see half of it.

Results, statistics caches, checkpoints, downloads and figures are all read by later runs (resume,
summaries, notebooks) that may start while a writer is killed. Every writer therefore writes a
temporary file in the destination's folder (same file system, so the rename is atomic), flushes it to
disk, and renames it over the destination only when the write finished.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from pathlib import Path
from typing import Any, Iterator, Optional

SHARED_FILE_MODE = 0o644  # results and caches are meant to be read by the other users of a machine


@contextlib.contextmanager
def atomic_path(path: Path, mode: Optional[int] = SHARED_FILE_MODE) -> Iterator[Path]:
    """Yield a fresh temporary path beside ``path``; when the block succeeds, move it onto ``path``.

    The temporary name is not created in advance, so writers that insist on opening their own file
    (``savefig``, ``safetensors.save_file``, ``torch.save``) can use it. ``mode=None`` keeps the
    permissions the writer's umask gave. If the block raises, the destination keeps its old content
    and the temporary file is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"the writer of {path} did not create its temporary file {tmp}")
        with open(tmp, "rb") as written:
            os.fsync(written.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str, mode: Optional[int] = SHARED_FILE_MODE) -> None:
    with atomic_path(path, mode) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: Path, obj: Any) -> None:
    """A JSON file (indent 1) that is never half-written."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
