"""Protocols as objects, one module each, and their registry.

``rollback`` (the WilKE paper's, the default), ``sequential`` (AlphaEdit's: evaluated after the last
edit) and ``immediate`` (EasyEdit's since 2026-06: each request evaluated right after its own edit).
Adding a protocol is one module (a ``Protocol`` subclass: its flags, steps, files and reader; see
protocols/base.py) and one line in the tuple below; a fork may also call ``register_protocol`` from
its own module before ``experiments.evaluate.main`` runs.
"""
from experiments.protocols.base import FlagError, Protocol, RunContext
from experiments.protocols.immediate import ImmediateProtocol
from experiments.protocols.rollback import RollbackProtocol
from experiments.protocols.sequential import SequentialProtocol

PROTOCOLS: dict[str, type[Protocol]] = {}


def register_protocol(cls: type[Protocol]) -> type[Protocol]:
    """Make ``cls`` available as ``--protocol <cls.name>`` (and to the summaries)."""
    if PROTOCOLS.get(cls.name, cls) is not cls:
        raise ValueError(f"protocol name {cls.name!r} is taken by {PROTOCOLS[cls.name].__qualname__}")
    PROTOCOLS[cls.name] = cls
    return cls


def get_protocol(name: str) -> type[Protocol]:
    if name not in PROTOCOLS:
        raise KeyError(f"unknown protocol {name!r}; choose one of: {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name]


for _protocol in (RollbackProtocol, SequentialProtocol, ImmediateProtocol):
    register_protocol(_protocol)

__all__ = ["PROTOCOLS", "FlagError", "Protocol", "RunContext", "get_protocol", "register_protocol"]
