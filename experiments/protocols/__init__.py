"""Protocols as objects, one module each: ``rollback`` (the WilKE paper's, the default) and
``sequential`` (AlphaEdit's and EasyEdit's). ``PROTOCOLS`` maps the ``--protocol`` flag to them."""
from experiments.protocols.base import Protocol, RunContext
from experiments.protocols.rollback import RollbackProtocol
from experiments.protocols.sequential import SequentialProtocol

PROTOCOLS: dict[str, type[Protocol]] = {p.name: p for p in (RollbackProtocol, SequentialProtocol)}

__all__ = ["PROTOCOLS", "Protocol", "RollbackProtocol", "RunContext", "SequentialProtocol"]
