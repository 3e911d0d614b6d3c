"""The prompts of a value optimisation: what a request's v* (or z) is optimised on, and a stack of them.

A ``ValueProblem`` is one request's rewriting prompts (each context template + the prompt + the
target's leading tokens), the positions whose next token is read (every target position, then the
KL read at the subject of "{} is a"), and where the delta is injected (the fact token of every
prompt). A ``ValueTask`` is a problem with its injection point; ``stack_tasks`` puts several tasks in
one right-padded batch (editing/value_optimisation.py optimises them together).
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import torch
from transformers import PreTrainedTokenizerBase

from editing.forward import Entries, PromptBatch
from editing.representations import fact_token_index
from util.scoring import pad_right, pad_token_id, prompt_ids, target_ids

KL_PROMPT = "{} is a"


@dataclasses.dataclass
class ValueProblem:
    """The prompts of one request's optimisation, tokenized once and shared by every candidate layer."""

    batch: PromptBatch  # rows/cols: every target position of the rewriting prompts, then the KL position
    fact_rows: torch.Tensor  # one entry per prompt: where the delta is injected
    fact_cols: torch.Tensor
    n_rewrite: int
    target: list[int]
    n_read_rewrite: int  # how many of batch.rows belong to rewriting prompts
    pad_id: int = 0  # the id padding batch.input_ids (stacking pads further with it)


def build_value_problem(
    tok: PreTrainedTokenizerBase,
    request: dict,
    context_templates: Sequence[str],
    fact_token: str,
    device: torch.device,
) -> ValueProblem:
    tgt = target_ids(tok, request["target_new"]["str"])
    stem = tok.decode(tgt[:-1]) if len(tgt) > 1 else ""
    rewriting = [ctx.format(request["prompt"]) + stem for ctx in context_templates]
    templates = rewriting + [KL_PROMPT]
    subject = request["subject"]
    seqs, fact_cols, rows, cols = [], [], [], []
    for i, template in enumerate(templates):
        ids = prompt_ids(tok, template.format(subject))
        seqs.append(ids)
        fact_cols.append(fact_token_index(tok, template, subject, fact_token))
        if i < len(rewriting):
            # the target tokens occupy the last len(tgt)-1 positions plus the next one
            end = len(ids)
            for j in range(len(tgt)):
                rows.append(i)
                cols.append(end - len(tgt) + j)
        else:
            rows.append(i)
            cols.append(fact_cols[-1])
    ids, mask = pad_right(seqs, pad_token_id(tok), device)
    as_t = lambda xs: torch.tensor(xs, dtype=torch.long, device=device)  # noqa: E731
    return ValueProblem(
        batch=PromptBatch(ids, mask, as_t(rows), as_t(cols)),
        fact_rows=torch.arange(len(templates), device=device),
        fact_cols=as_t(fact_cols),
        n_rewrite=len(rewriting),
        target=tgt,
        n_read_rewrite=len(rewriting) * len(tgt),
        pad_id=pad_token_id(tok),
    )


@dataclasses.dataclass(frozen=True)
class ValueTask:
    """One optimisation: a request's prompts, with the delta added to ``inject_module``'s output."""

    problem: ValueProblem
    inject_module: str
    start_block: int  # the block that holds inject_module: blocks below it never see the delta
    clamp_norm_factor: float

    @property
    def padded_tokens(self) -> int:
        return int(self.problem.batch.input_ids.numel())


@dataclasses.dataclass
class StackedTasks:
    """Several tasks' prompts in one right-padded batch, task after task, in entry-block order."""

    batch: PromptBatch  # reads: each task's rewriting reads then its KL read
    fact_cols: torch.Tensor  # per row: where its task's delta is injected (every row has one)
    row_task: torch.Tensor  # per row: its task (index into the stacked tasks)
    first_rows: torch.Tensor  # per task: the row of its first prompt, where v0 is read
    read_target: torch.Tensor  # per read: the target token (0 at a KL read, which has no weight)
    read_weights: torch.Tensor  # tasks x reads: 1 / (n_rewrite * n_target) on the task's rewriting reads
    kl_reads: torch.Tensor  # per task: its KL read
    entries: Entries
    modules: list[str]  # per task

    @property
    def n_rows(self) -> int:
        return int(self.batch.input_ids.shape[0])


def stack_tasks(tasks: Sequence[ValueTask]) -> StackedTasks:
    """One batch of the tasks' prompts (a single task's batch is its own, unchanged)."""
    blocks = [t.start_block for t in tasks]
    if blocks != sorted(blocks):
        raise ValueError(f"tasks must come in increasing order of start block, got {blocks}")
    width = max(t.problem.batch.input_ids.shape[1] for t in tasks)
    ids, masks, rows, cols, fact_cols, row_task, targets = [], [], [], [], [], [], []
    first_rows, kl_reads, spans = [], [], []
    n_rows = n_reads = 0
    for k, task in enumerate(tasks):
        p, b = task.problem, task.problem.batch
        if len(b.rows) != p.n_read_rewrite + 1 or len(p.fact_rows) != b.input_ids.shape[0]:
            raise ValueError("a value problem has one KL read after its rewriting reads and a fact token on every row")
        pad = width - b.input_ids.shape[1]
        ids.append(torch.nn.functional.pad(b.input_ids, (0, pad), value=p.pad_id))
        masks.append(torch.nn.functional.pad(b.attention_mask, (0, pad), value=0))
        rows.append(b.rows + n_rows)
        cols.append(b.cols)
        fact_cols.append(p.fact_cols)
        row_task.append(torch.full((b.input_ids.shape[0],), k, dtype=torch.long, device=b.rows.device))
        targets.append(torch.tensor(p.target * p.n_rewrite + [0], dtype=torch.long, device=b.rows.device))
        first_rows.append(n_rows)
        spans.append((n_reads, n_reads + p.n_read_rewrite, 1.0 / p.n_read_rewrite))
        kl_reads.append(n_reads + p.n_read_rewrite)
        n_rows += b.input_ids.shape[0]
        n_reads += len(b.rows)
    device = tasks[0].problem.batch.rows.device
    weights = torch.zeros(len(tasks), n_reads, device=device)
    for k, (a, z, w) in enumerate(spans):
        weights[k, a:z] = w
    ends = [sum(t.problem.batch.input_ids.shape[0] for t in tasks if t.start_block <= b) for b in sorted(set(blocks))]
    batch = tasks[0].problem.batch if len(tasks) == 1 else PromptBatch(torch.cat(ids), torch.cat(masks), torch.cat(rows), torch.cat(cols))
    as_t = lambda xs: torch.tensor(xs, dtype=torch.long, device=device)  # noqa: E731
    return StackedTasks(batch, torch.cat(fact_cols), torch.cat(row_task), as_t(first_rows), torch.cat(targets),
                        weights, as_t(kl_reads), Entries(tuple(sorted(set(blocks))), tuple(ends)),
                        [t.inject_module for t in tasks])
