"""One corpus pass of a statistics collection: batches that fit, and progress that survives a kill.

- Fit: a batch whose forward pass runs out of memory (``torch.OutOfMemoryError``, or a
  RuntimeError saying "out of memory") is split in two halves, recursively down to single samples;
  the halves keep the batch's padded width and their keys are concatenated in row order, so the
  batch adds exactly the keys it would have added whole (bit-identical where the forward pass of a
  row does not depend on how many rows run beside it, as on CPU; on GPU, kernels chosen by shape
  can change the last float bits). A single sample that does not fit raises
  ``StatsOutOfMemoryError`` saying what to lower.
- Progress: this process's sums, counts and done batches are saved (``stats_checkpoint``) every
  ``checkpoint_every`` batches, at least every ``checkpoint_seconds``, and when the pass is
  interrupted by an exception; a rerun loads them and skips the done batches.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Optional, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from editing.stats_checkpoint import Partial, PartialStore
from editing.stats_distributed import DistContext
from editing.stats_moments import CollectionRun, SecondMoment
from editing.stats_plan import DEFAULT_BATCH_TOKENS, BatchPlan
from util import nethook
from util.scoring import model_device

logger = logging.getLogger(__name__)

OOM_ERRORS: tuple[type[BaseException], ...] = (getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError),)


@dataclasses.dataclass(frozen=True)
class CollectionOptions:
    """How a collection runs; none of it changes the statistics beyond float rounding."""

    batch_tokens: int = DEFAULT_BATCH_TOKENS  # padded positions per forward pass (the memory knob)
    checkpoint_every: int = 0  # save partial statistics every this many batches (0: by time only)
    checkpoint_seconds: float = 600.0  # ... and at least this often (math.inf: never by time)
    progress: bool = True


class StatsOutOfMemoryError(RuntimeError):
    """Even one sample does not fit in memory."""


def is_oom(error: BaseException) -> bool:
    if isinstance(error, StatsOutOfMemoryError):
        return False
    return isinstance(error, OOM_ERRORS) or (isinstance(error, RuntimeError) and "out of memory" in str(error).lower())


def _forward_keys(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, layers: Sequence[str],
                  dtype: torch.dtype, run: CollectionRun) -> dict[str, torch.Tensor]:
    """The inputs of each traced module at the real (non-pad) tokens, row by row, in ``dtype``."""
    device = model_device(model)
    ids, mask = ids.to(device), mask.to(device)
    run.forward_calls += 1
    with nethook.TraceDict(model, layers, retain_output=False, retain_input=True, stop=True) as td:
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    real = mask.bool()
    return {name: td[name].input[real].to(dtype) for name in layers}


def batch_keys(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, layers: Sequence[str],
               dtype: torch.dtype, run: CollectionRun) -> dict[str, torch.Tensor]:
    """``_forward_keys``, halving the batch on out-of-memory errors (see the module docstring)."""
    message = ""
    try:
        return _forward_keys(model, ids, mask, layers, dtype, run)
    except RuntimeError as e:
        if not is_oom(e):
            raise
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
    # Outside the except block, so the failed attempt's frames and activations are freed.
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    rows = ids.shape[0]
    if rows == 1:
        raise StatsOutOfMemoryError(
            f"out of memory on a single sample of {int(mask.sum())} tokens ({message}); lower the "
            "statistics' max_length (hparams 'mom2_max_length'), collect fewer modules at once, or use a "
            "device with more free memory")
    half = (rows + 1) // 2
    run.oom_splits += 1
    logger.warning("out of memory on a batch of %d x %d tokens (%s); retrying as %d + %d rows "
                   "(a smaller batch_tokens avoids the retries)", rows, ids.shape[1], message, half, rows - half)
    parts = [batch_keys(model, ids[:half], mask[:half], layers, dtype, run),
             batch_keys(model, ids[half:], mask[half:], layers, dtype, run)]
    return {name: torch.cat([p[name] for p in parts]) for name in layers}


class _Checkpointer:
    """Saves a process's partial statistics every K batches / T seconds."""

    def __init__(self, store: Optional[PartialStore], options: CollectionOptions, base_seconds: float):
        self.store, self.options = store, options
        self.base_seconds = base_seconds
        self.start = self.last = time.perf_counter()
        self.batches = 0

    def seconds(self) -> float:
        return self.base_seconds + time.perf_counter() - self.start

    def after_batch(self, partial: Partial) -> None:
        self.batches += 1
        every, period = self.options.checkpoint_every, self.options.checkpoint_seconds
        if (every and self.batches >= every) or time.perf_counter() - self.last >= period:
            self.save(partial)

    def save(self, partial: Partial) -> None:
        if self.store is None:
            return
        partial.seconds = self.seconds()
        self.store.save(partial)
        self.last, self.batches = time.perf_counter(), 0


def run_pass(model: nn.Module, plan: BatchPlan, layers: Sequence[str], dtype: torch.dtype, options: CollectionOptions,
             ctx: DistContext, store: Optional[PartialStore], run: CollectionRun) -> Partial:
    """Sum k k^T over this process's batches of the plan, resuming from ``store``; returns its partial
    statistics (the sums of this process only; ``DistContext.sum_moments`` adds the processes')."""
    device = model_device(model)
    partial = (store.load(device) if store is not None else None) or Partial({}, set(), 0.0)
    mine = [i for i in range(len(plan.batches)) if ctx.owns(i)]
    todo = [i for i in mine if i not in partial.done]
    run.batches_resumed += len(mine) - len(todo)
    saver = _Checkpointer(store, options, partial.seconds)
    desc = f"mom2 {layers[0]}" + (f" .. {layers[-1]} ({len(layers)} modules)" if len(layers) > 1 else "")
    adding = False
    try:
        for i in tqdm(todo, desc=desc, disable=not options.progress, leave=False):
            keys = batch_keys(model, *plan.batch(i), layers, dtype, run)
            adding = True  # a batch is added to every module or, if interrupted, not saved
            for name in layers:
                partial.moments.setdefault(name, SecondMoment(keys[name].shape[1], device=device)).add(keys[name])
            partial.done.add(i)
            adding = False
            run.forward_tokens += plan.padded_tokens(i)
            run.real_tokens += sum(len(plan.samples[j]) for j in plan.batches[i])
            saver.after_batch(partial)
    except BaseException:
        if not adding and todo:
            saver.save(partial)
        raise
    if ctx.active:
        saver.save(partial)  # a process that finished keeps its work if another one dies
    partial.seconds = saver.seconds()
    run.seconds += time.perf_counter() - saver.start
    return partial
