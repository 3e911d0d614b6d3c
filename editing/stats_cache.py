"""Cache files of the second-moment statistics, in ROME's layout, so ROME's official files load as they are.

ROME (``rome/layer_stats.py``) writes ``<stats_dir>/<model>/<dataset>_stats/<module>_<precision>_mom2_<n>.npz``
where ``<model>`` is ``model.config._name_or_path.replace("/", "_")`` ("gpt2-xl",
"EleutherAI_gpt-j-6B"), with the state of ``CombinedStat(mom2=SecondMoment())`` plus tally's args:
``mom2.constructor`` (a string), ``mom2.count`` (tokens), ``mom2.mom2`` (the SUM of k k^T in the
collection precision, float32 for the official files: E[k k^T] = mom2 / count) and
``sample_size``. Its sample is always seeded with 1 (``random_sample=1``). Files written here keep
those keys (the sum in float64) and add ``meta.*`` entries saying how they were made.

A file is looked up under the harness's model name first, then under ROME's name for the same
model, so official files copied from rome.baulab.info/data/stats/ are found where a user puts them.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from editing.corpus_sample import FIRST, ROME_SAMPLE_SEED, SEEDED
from editing.stats_moments import SecondMoment, StatsMeta
from util.atomic_files import atomic_path

logger = logging.getLogger(__name__)


def stats_path(stats_dir: Path, model_slug: str, corpus_slug: str, module: str, dtype: str, n_samples: int) -> Path:
    """ROME's file name for one module's cached second moment (where this harness writes it)."""
    model_dir = model_slug.replace("/", "_")
    return Path(stats_dir) / model_dir / f"{corpus_slug}_stats" / f"{module}_{dtype}_mom2_{n_samples}.npz"


def model_dir_names(stats_dir: Path, model_slug: str, name_or_path: str = "") -> list[str]:
    """Folders of ``stats_dir`` that may hold this model's files, the harness's name first: ROME's
    ``_name_or_path.replace("/", "_")``, the last component of a local path, and an existing
    ``<org>_<slug>`` folder (a local copy of "EleutherAI/gpt-j-6B" named "gpt-j-6B")."""
    names = [model_slug.replace("/", "_")]
    if name_or_path:
        names += [name_or_path.replace("/", "_"), Path(name_or_path).name]
    root = Path(stats_dir)
    if root.is_dir():
        names += sorted(p.name for p in root.iterdir() if p.is_dir() and p.name.endswith("_" + names[0]))
    return [n for n in dict.fromkeys(names) if n]


def find_stats_file(stats_dir: Path, model_dirs: list[str], corpus_slug: str, module: str, dtype: str, n_samples: int) -> Path:
    """The first existing file among the model folders; the harness's own path when none exists."""
    paths = [stats_path(stats_dir, d, corpus_slug, module, dtype, n_samples) for d in model_dirs]
    return next((p for p in paths if p.is_file()), paths[0])


def save_moment(path: Path, moment: SecondMoment) -> None:
    """Written atomically: a concurrent run may be reading the cache."""
    arrays = {
        "mom2.constructor": np.array("util.runningstats.SecondMoment()"),
        "mom2.mom2": moment.sum.detach().cpu().numpy(),
        "mom2.count": np.array(moment.count, dtype=np.int64),
        "sample_size": np.array(moment.meta.n_samples_requested, dtype=np.int64),
    }
    for field in dataclasses.fields(StatsMeta):
        arrays[f"meta.{field.name}"] = np.array(getattr(moment.meta, field.name))
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, **arrays)


def load_moment(path: Path) -> SecondMoment:
    """Read a cached moment, ours or ROME's (no pickles). The sum is widened to float64, so
    E[k k^T] = sum / count is computed exactly from ROME's float32 sums."""
    with np.load(path, allow_pickle=False) as data:
        total = torch.from_numpy(np.array(data["mom2.mom2"])).to(torch.float64)
        count = int(data["mom2.count"])
        values = {}
        for field in dataclasses.fields(StatsMeta):
            key = f"meta.{field.name}"
            if key in data.files:
                values[field.name] = type(getattr(StatsMeta(), field.name))(data[key].item())
        rome = not any(name.startswith("meta.") for name in data.files)
        sample_size = _int_or_missing(data, "sample_size")
        precision = str(data["mom2.mom2"].dtype)
    moment = SecondMoment(total.shape[0])
    moment.sum, moment.count, moment.from_cache = total, count, True
    if rome:  # ROME's tally always draws with random_sample=1
        values = {"n_samples_requested": sample_size, "n_tokens": count, "dtype": precision,
                  "sampling": SEEDED, "sample_seed": ROME_SAMPLE_SEED}
        moment.origin = "rome"
    moment.meta = StatsMeta(**values)
    return moment


def _int_or_missing(data: np.lib.npyio.NpzFile, key: str) -> int:
    """An integer entry, -1 when absent or null (ROME writes a NaN-boxed null for "all samples")."""
    if key not in data.files or data[key].dtype.kind not in "iu":
        return -1
    return int(data[key])


def same_sample(meta: StatsMeta, sampling: str, seed: int) -> tuple[bool, str]:
    """Whether a file's texts are the ones this request draws, and if not, why."""
    if meta.sampling == "":  # written before seeded sampling: the first n texts
        if 0 <= meta.n_samples < meta.n_samples_requested:
            return True, ""  # the corpus ran out, so every text was used
        return False, "was collected from the corpus's first texts (before seeded sampling)"
    if meta.whole_corpus:
        return True, ""
    if meta.sampling == FIRST and sampling == SEEDED and meta.corpus_size < 0:
        return True, ""  # a stream of unknown length: a seeded sample cannot be drawn from it
    if (meta.sampling, meta.sample_seed) != (sampling, seed):
        return False, f"was drawn with sampling {meta.sampling!r}, seed {meta.sample_seed}, not {sampling!r}, seed {seed}"
    return True, ""


def made_with_length(meta: StatsMeta, context: int) -> int:
    """Tokens per text a file was collected with: its ``meta.max_length``, else (an official file,
    which records none) the model's context, ROME's ``maxlen = model.config.n_positions``."""
    return meta.max_length if meta.max_length > 0 else context


def usable_cache(path: Path, max_length: int, dim: Optional[int], sampling: str, seed: int,
                 context: int = -1) -> Optional[SecondMoment]:
    """The cached moment at ``path`` when it exists and matches this request, else None.
    ``context`` is the model's context length (-1: unknown, a file without a length is then used)."""
    if not path.is_file():
        return None
    try:
        moment = load_moment(path)
    except (OSError, KeyError, ValueError) as e:
        logger.warning("ignoring unreadable statistics file %s (%s); recomputing", path, e)
        return None
    made = made_with_length(moment.meta, context)
    if made not in (-1, max_length):
        logger.warning("%s was collected from texts truncated to %d tokens, not %d; recomputing and replacing it",
                       path, made, max_length)
        return None
    if dim is not None and moment.dim != dim:
        logger.warning("%s has dimension %d but the module takes %d inputs; recomputing", path, moment.dim, dim)
        return None
    same, why = same_sample(moment.meta, sampling, seed)
    if not same:
        logger.warning("%s %s; recomputing and replacing it", path, why)
        return None
    if moment.origin == "rome":
        logger.info("loaded ROME's statistics file %s (%d tokens, sample seed %d)", path, moment.count, ROME_SAMPLE_SEED)
    return moment
