"""Frozen hyperparameter dataclasses loaded from JSON.

Every algorithm's hparams subclass ``HyperParams``. Loading checks the JSON against the
dataclass: an unknown field, a missing required field or a value of the wrong type is an
``HParamsError`` that names the file and the field, raised before any model work starts.
Hparams are never mutated; use ``dataclasses.replace`` to derive a variant (e.g. one layer).
"""
from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping, Type, TypeVar

T = TypeVar("T", bound="HyperParams")

# Fields (by prefix) that only one family of methods has, and why: a file that sets one for a method
# outside the family gets the reason in its "unknown field" error, not just the list of known fields.
FAMILY_FIELDS: Mapping[str, str] = MappingProxyType({
    "value_norm_anchor": "NAS (the norm anchor) applies only to the locate-then-edit methods (ROME, r-ROME, "
                         "MEMIT, AlphaEdit, RECT, PRUNE, WilKE): it rescales the value vector they solve for, "
                         "which this method does not have",
})


class HParamsError(ValueError):
    """A hyperparameter file that cannot be used as it is."""


def _type_ok(value: Any, annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return True
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        return any(_type_ok(value, a) for a in args)
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        if not args:
            return True
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            return len(args) == len(value) and all(_type_ok(v, a) for v, a in zip(value, args))
        return all(_type_ok(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    return True


def _freeze(value: Any) -> Any:
    """Lists become tuples so frozen hparams are hashable and cannot be changed in place."""
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


def _thaw(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    return value


@dataclasses.dataclass(frozen=True)
class HyperParams:
    """Base class: subclasses are frozen dataclasses with typed fields."""

    @classmethod
    def from_dict(cls: Type[T], data: dict, source: str = "<dict>") -> T:
        if not isinstance(data, dict):
            raise HParamsError(f"{source}: expected a JSON object of hyperparameters, got {type(data).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        hints = typing.get_type_hints(cls)
        unknown = sorted(set(data) - set(fields))
        if unknown:
            why = next((reason for prefix, reason in FAMILY_FIELDS.items() if unknown[0].startswith(prefix)), None)
            raise HParamsError(
                f"{source}: unknown field {unknown[0]!r} for {cls.__name__} "
                + (f"({why})" if why else f"(known fields: {', '.join(sorted(fields))})")
            )
        missing = [
            n
            for n, f in fields.items()
            if n not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        if missing:
            raise HParamsError(f"{source}: missing required field {missing[0]!r} for {cls.__name__}")
        for name, value in data.items():
            if not _type_ok(value, hints[name]):
                raise HParamsError(
                    f"{source}: field {name!r} has value {value!r}, expected {hints[name]}"
                )
        obj = cls(**{k: _freeze(v) for k, v in data.items()})
        try:
            obj.validate()
        except HParamsError as e:
            raise HParamsError(f"{source}: {e}") from None
        return obj

    @classmethod
    def from_json(cls: Type[T], path: str | Path) -> T:
        path = Path(path)
        if not path.is_file():
            raise HParamsError(f"hyperparameter file {path} does not exist")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise HParamsError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(data, source=str(path))

    def validate(self) -> None:
        """Cross-field checks; raise HParamsError naming the field."""

    def to_dict(self) -> dict:
        return {f.name: _thaw(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def replace(self: T, **changes: Any) -> T:
        return dataclasses.replace(self, **{k: _freeze(v) for k, v in changes.items()})


def resolve_hparams_file(hparams_dir: Path, alg: str, fname: str | None, model_slug: str) -> Path:
    """``fname`` when it is a file, else ``<hparams_dir>/<alg>/<fname or model_slug.json>``."""
    name = fname or f"{model_slug}.json"
    given = Path(name)
    if given.is_file():
        return given
    path = Path(hparams_dir) / alg / name
    if not path.is_file():
        available = sorted(p.name for p in (Path(hparams_dir) / alg).glob("*.json"))
        raise HParamsError(f"hyperparameter file {path} does not exist; available for {alg}: {available}")
    return path
