"""Edit examples and their tokenised batches.

An ``EditExample`` is what one editor training step (or one validation edit) needs, as in MEND's
zsRE setup: the edit input x_e with its new target, an equivalent input x_e' (a paraphrase) with the
same target, and an unrelated input x_loc whose predictions must not change. ``EditBatch`` packs
any such sequences into one right-padded batch and records which positions' next-token logits are
read: the target positions of edit sequences (for NLL and greedy accuracy) and every position of
locality sequences (for the KL term), so one forward pass serves the whole step.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import torch
from transformers import PreTrainedTokenizerBase

from editing.forward import PromptBatch
from util.scoring import pad_right, pad_token_id, prompt_ids, target_ids

INNER, OUTER, LOC = "inner", "outer", "loc"


@dataclasses.dataclass(frozen=True)
class EditExample:
    prompt: str  # the edit input x_e, filled
    target: str  # the new answer (a leading space is added when tokenised)
    paraphrase: Optional[str] = None  # x_e'
    loc_prompt: Optional[str] = None  # x_loc
    loc_target: Optional[str] = None  # its answer (tokens whose greedy prediction should not change)
    case_id: object = None


@dataclasses.dataclass(frozen=True)
class Segment:
    kind: str  # INNER, OUTER or LOC
    prompt: str
    target: str


@dataclasses.dataclass
class EditBatch:
    """Right-padded sequences and the positions read from them.

    Per read position: ``seq`` (its sequence), ``gold`` (the next token, -1 where there is none)
    and ``is_target`` (the position predicts a target token). ``kinds[s]`` is sequence s's kind.
    """

    prompt: PromptBatch
    seq: torch.Tensor
    gold: torch.Tensor
    is_target: torch.Tensor
    kinds: list[str]

    @property
    def input_ids(self) -> torch.Tensor:
        return self.prompt.input_ids

    def positions_of(self, *kinds: str, targets_only: bool = True) -> torch.Tensor:
        """Boolean mask over read positions belonging to sequences of these kinds."""
        wanted = torch.tensor([k in kinds for k in self.kinds], device=self.seq.device)
        mask = wanted[self.seq]
        return mask & self.is_target if targets_only else mask

    def sequences_of(self, kind: str) -> list[int]:
        return [i for i, k in enumerate(self.kinds) if k == kind]

    def sequence_ids(self, index: int) -> torch.Tensor:
        """The unpadded token ids of one sequence, as a (1, length) batch (KE's condition input)."""
        length = int(self.prompt.attention_mask[index].sum())
        return self.prompt.input_ids[index : index + 1, :length]


def segments_of(example: EditExample, with_outer: bool = True, with_loc: bool = True) -> list[Segment]:
    segs = [Segment(INNER, example.prompt, example.target)]
    if with_outer and example.paraphrase:
        segs.append(Segment(OUTER, example.paraphrase, example.target))
    if with_loc and example.loc_prompt and example.loc_target:
        segs.append(Segment(LOC, example.loc_prompt, example.loc_target))
    return segs


def _truncate(p: list[int], t: list[int], max_length: Optional[int]) -> tuple[list[int], list[int]]:
    """Keep the target whole and drop prompt tokens from the left when too long."""
    if max_length is None or len(p) + len(t) <= max_length:
        return p, t
    keep = max(1, max_length - len(t))
    return p[-keep:], t[: max_length - keep]


def make_batch(
    tok: PreTrainedTokenizerBase,
    segments: Sequence[Segment],
    device: torch.device,
    max_length: Optional[int] = None,
) -> EditBatch:
    sequences, kinds = [], []
    rows, cols, seq, gold, is_target = [], [], [], [], []
    for s_index, segment in enumerate(segments):
        p, t = _truncate(prompt_ids(tok, segment.prompt), target_ids(tok, segment.target), max_length)
        ids = p + t
        sequences.append(ids)
        kinds.append(segment.kind)
        first_target = len(p) - 1
        read = range(len(ids)) if segment.kind == LOC else range(first_target, len(ids) - 1)
        for pos in read:
            rows.append(s_index)
            cols.append(pos)
            seq.append(s_index)
            gold.append(ids[pos + 1] if pos + 1 < len(ids) else -1)
            is_target.append(first_target <= pos < len(ids) - 1)
    input_ids, mask = pad_right(sequences, pad_token_id(tok), device)
    as_long = lambda v: torch.tensor(v, dtype=torch.long, device=device)  # noqa: E731
    prompt = PromptBatch(input_ids, mask, as_long(rows), as_long(cols))
    return EditBatch(prompt, as_long(seq), as_long(gold), torch.tensor(is_target, device=device), kinds)


def request_example(request: dict) -> EditExample:
    """The edit input of a ROME-style request ({prompt, subject, target_new})."""
    return EditExample(
        prompt=request["prompt"].format(request["subject"]),
        target=request["target_new"]["str"],
        case_id=request.get("case_id"),
    )


def record_example(record: dict, paraphrase_index: int = 0) -> EditExample:
    """A CounterFact or zsRE record (ROME schema) as a training example.

    zsRE neighbourhood entries are {prompt, target} (the NQ question and its answer); CounterFact's
    are bare prompts whose answer is the record's target_true.
    """
    rw = record["requested_rewrite"]
    paraphrases = record.get("paraphrase_prompts") or []
    neighbours = record.get("neighborhood_prompts") or []
    loc_prompt = loc_target = None
    if neighbours:
        first = neighbours[0]
        if isinstance(first, dict):
            loc_prompt, loc_target = first["prompt"], first["target"]
        else:
            loc_prompt, loc_target = first, rw["target_true"]["str"]
    return EditExample(
        prompt=rw["prompt"].format(rw["subject"]),
        target=rw["target_new"]["str"],
        paraphrase=paraphrases[paraphrase_index % len(paraphrases)] if paraphrases else None,
        loc_prompt=loc_prompt,
        loc_target=loc_target,
        case_id=record.get("case_id"),
    )
