"""Statistics collection sharded over processes with torch.distributed (launched by torchrun).

Every process computes the same batch plan (``stats_plan``) and sums the batches i with
i % world_size == rank, in plan order (round-robin over batches sorted longest first, so the
processes get about the same number of tokens). The float64 sums and the token counts are then
added with one all-reduce (gloo on CPU, nccl on GPU) and rank 0 writes the cache. The forward pass
of a batch does not depend on which process runs it, so the result differs from a single process
only in the order of the float64 additions (relative difference about 1e-15).

Outside torchrun (no process group) everything here is the identity: one process, rank 0.
"""
from __future__ import annotations

import dataclasses
import datetime
import logging
import os
from typing import Any, Sequence

import torch
import torch.distributed as dist

from editing.stats_moments import SecondMoment

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DistContext:
    """This process's place in the collection: rank, number of processes, backend."""

    rank: int = 0
    world_size: int = 1
    backend: str = ""

    @classmethod
    def current(cls) -> "DistContext":
        """The default process group when one is initialised, else a single process."""
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size(), str(dist.get_backend()))
        return cls()

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def owns(self, batch_index: int) -> bool:
        """Round-robin assignment of the plan's batches to processes."""
        return batch_index % self.world_size == self.rank

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every process (so all agree on what is cached, for instance)."""
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        """Every process's ``obj``, by rank (for reports)."""
        if not self.active:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def max(self, value: float) -> float:
        """The largest ``value`` over processes."""
        if not self.active:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t.item())

    def sum_moments(self, moments: dict[str, SecondMoment], layers: Sequence[str], device: torch.device) -> dict[str, SecondMoment]:
        """Every process's sums and counts added (float64, int64); a process that summed no batch
        of a module contributes zeros."""
        if not self.active:
            return moments
        dims = [None] * self.world_size
        dist.all_gather_object(dims, {n: m.dim for n, m in moments.items()})
        out: dict[str, SecondMoment] = {}
        comm = self._comm_device()
        counts = torch.tensor([moments[n].count if n in moments else 0 for n in layers], dtype=torch.int64, device=comm)
        dist.all_reduce(counts)
        for i, name in enumerate(layers):
            dim = next(d[name] for d in dims if name in d)
            total = moments[name].sum.to(comm, torch.float64) if name in moments else torch.zeros(dim, dim, dtype=torch.float64, device=comm)
            dist.all_reduce(total)
            out[name] = SecondMoment(dim, device=device)
            out[name].sum, out[name].count = total.to(device), int(counts[i])
        return out

    def _comm_device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(timeout_minutes: float = 60.0) -> DistContext:
    """Join the process group torchrun describes (nccl when CUDA is available, else gloo); each
    process takes GPU LOCAL_RANK. A single process without torchrun gets rank 0 of 1."""
    if not launched_by_torchrun():
        return DistContext()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    ctx = DistContext.current()
    logger.info("rank %d of %d (%s)", ctx.rank, ctx.world_size, backend)
    return ctx


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
