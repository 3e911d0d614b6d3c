"""Where data, statistics, results and model caches live.

Read from ``globals.yml`` at the repository root (never relative to the working directory),
then overridden by ``WILKE_<NAME>`` environment variables, then by explicit arguments (CLI flags).
Nothing here is mutable module state: callers hold the ``Paths`` they were given.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Optional

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
GLOBALS_FILE = REPO_ROOT / "globals.yml"


@dataclasses.dataclass(frozen=True)
class Paths:
    data_dir: Path
    data_dir_fallbacks: tuple[Path, ...]
    stats_dir: Path
    results_dir: Path
    hparams_dir: Path
    model_cache_dir: Path
    remote_root_url: str

    def find_data_file(self, name: str) -> Optional[Path]:
        """The first existing ``name`` in DATA_DIR, then in the fallbacks; None if absent."""
        for base in (self.data_dir, *self.data_dir_fallbacks):
            candidate = base / name
            if candidate.exists():
                return candidate
        return None


def _resolve(value: str | Path) -> Path:
    p = Path(os.path.expanduser(str(value)))
    return p if p.is_absolute() else (REPO_ROOT / p).resolve()


def load_paths(
    data_dir: Optional[str] = None,
    stats_dir: Optional[str] = None,
    results_dir: Optional[str] = None,
    hparams_dir: Optional[str] = None,
    model_cache_dir: Optional[str] = None,
    globals_file: Path = GLOBALS_FILE,
) -> Paths:
    try:
        raw = yaml.safe_load(globals_file.read_text()) or {}
    except FileNotFoundError:
        raw = {}
    except yaml.YAMLError as e:
        raise ValueError(f"{globals_file}: not valid YAML ({e})") from None

    def pick(key: str, explicit: Optional[str], default: str) -> Path:
        if explicit:
            return _resolve(explicit)
        env = os.environ.get(f"WILKE_{key}")
        return _resolve(env if env else raw.get(key, default))

    fallbacks = raw.get("DATA_DIR_FALLBACKS") or []
    env_fb = os.environ.get("WILKE_DATA_DIR_FALLBACKS")
    if env_fb is not None:
        fallbacks = [p for p in env_fb.split(os.pathsep) if p]
    return Paths(
        data_dir=pick("DATA_DIR", data_dir, "data/dsets"),
        data_dir_fallbacks=tuple(_resolve(p) for p in fallbacks),
        stats_dir=pick("STATS_DIR", stats_dir, "data/stats"),
        results_dir=pick("RESULTS_DIR", results_dir, "results"),
        hparams_dir=pick("HPARAMS_DIR", hparams_dir, "hparams"),
        model_cache_dir=pick("MODEL_CACHE_DIR", model_cache_dir, "data/models"),
        remote_root_url=str(os.environ.get("WILKE_REMOTE_ROOT_URL") or raw.get("REMOTE_ROOT_URL", "https://rome.baulab.info")),
    )
