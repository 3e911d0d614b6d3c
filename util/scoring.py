"""Teacher-forced scoring of target completions, shared by metrics, retention and known-subset filtering.

"Greedy decoding after the prompt reproduces every token of the target" is decided without
generating: with prompt+target fed at once, greedy decoding reproduces the target exactly when
the argmax at every target position equals the next target token. One batched forward pass
therefore gives both the NLL and the greedy verdict, and the vocabulary projection is applied
only at the target positions (it dominates the forward cost of small models with large vocabularies).
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase


class Continuation(str):
    """A target scored exactly as written: no leading space is added.

    An answer ("Paris") follows its prompt after a space, which ``target_ids`` adds, as ROME does.
    ROME's zsRE neighbourhood pairs instead hold the exact text that follows the prompt: the decoded
    next token of the answer, which may continue a word (prompt "...? L", target "ec" of
    " Lecanorales"); with a space added it would be another token (SmolLM2: " ec" is 2948, the
    answer's token is 1159). ROME compares against ``tok(target)`` as written.
    """

    __slots__ = ()


def target_ids(tok: PreTrainedTokenizerBase, target: str) -> list[int]:
    """Token ids of a target string: an answer gets one leading space (as in ROME) unless it has
    one; a ``Continuation`` is tokenized as written."""
    text = target if isinstance(target, Continuation) or target.startswith(" ") else " " + target
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"target {target!r} tokenizes to nothing")
    return list(ids)


def prompt_ids(tok: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    """Prompt ids with the tokenizer's own special tokens (BOS for Gemma, none for SmolLM2/GPT-2)."""
    return list(tok(prompt)["input_ids"])


def model_device(model: nn.Module) -> torch.device:
    """Where a model's inputs go: its first parameter's device (the embedding), or, when accelerate
    has offloaded that parameter, the device its hook computes on."""
    first = next(model.parameters()).device
    if first.type != "meta":
        return first
    from util.placement import module_device

    return next((module_device(m) for m in model.modules() if getattr(m, "_hf_hook", None) is not None), first)


def lm_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Final-norm hidden states to logits, with the final soft-capping some families use."""
    logits = model.get_output_embeddings()(hidden)
    cap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def final_hidden(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Hidden states after the final norm, before the vocabulary projection."""
    out = model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out[0] if isinstance(out, tuple) else out.last_hidden_state


def pad_right(sequences: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.tensor(list(s), dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)


def pad_token_id(tok: PreTrainedTokenizerBase) -> int:
    for candidate in (tok.pad_token_id, tok.eos_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0


@dataclasses.dataclass(frozen=True)
class TargetScore:
    nll: float  # mean negative log-likelihood per target token
    correct: bool  # greedy decoding reproduces every target token
    token_correct: tuple[bool, ...] = ()  # per target token: argmax == that token (zsRE's accuracy)
    argmax: tuple[int, ...] = ()  # the argmax token at each target position (teacher forced)


@torch.no_grad()
def score_targets(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    targets: Sequence[str],
    batch_size: int = 32,
) -> list[TargetScore]:
    """Score each (prompt, target) pair; targets get a leading space (``Continuation`` targets do not)."""
    if len(prompts) != len(targets):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
    device = model_device(model)
    pad = pad_token_id(tok)
    results: list[TargetScore] = []
    for start in range(0, len(prompts), batch_size):
        chunk_p = prompts[start : start + batch_size]
        chunk_t = targets[start : start + batch_size]
        p_ids = [prompt_ids(tok, p) for p in chunk_p]
        t_ids = [target_ids(tok, t) for t in chunk_t]
        ids, mask = pad_right([p + t for p, t in zip(p_ids, t_ids)], pad, device)
        hidden = final_hidden(model, ids, mask)
        rows, cols, gold = [], [], []
        for i, (p, t) in enumerate(zip(p_ids, t_ids)):
            for j, token in enumerate(t):
                rows.append(i)
                cols.append(len(p) - 1 + j)
                gold.append(token)
        logits = lm_logits(model, hidden[torch.tensor(rows, device=device), torch.tensor(cols, device=device)])
        logp = torch.log_softmax(logits.float(), dim=-1)
        gold_t = torch.tensor(gold, device=device)
        token_nll = -logp.gather(1, gold_t[:, None]).squeeze(1)
        argmax = logits.argmax(-1)
        token_ok = (argmax == gold_t).tolist()
        argmax = argmax.tolist()
        offset = 0
        for t in t_ids:
            n = len(t)
            ok = tuple(bool(v) for v in token_ok[offset : offset + n])
            results.append(TargetScore(nll=float(token_nll[offset : offset + n].mean()), correct=all(ok),
                                       token_correct=ok, argmax=tuple(argmax[offset : offset + n])))
            offset += n
    return results


def score_pairs(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    pairs: Sequence[tuple[str, str]],
    batch_size: int = 64,
) -> list[TargetScore]:
    """``score_targets`` over many (prompt, target) pairs, e.g. many records' at once: each distinct
    pair is scored once, in batches of similar length (less padding), and the scores come back in
    the order of ``pairs``. Equal to scoring them one group at a time up to float rounding (a row's
    numbers can move in the last bits with the batch it shares)."""
    unique = list(dict.fromkeys((p, t, isinstance(t, Continuation)) for p, t in pairs))
    order = sorted(range(len(unique)), key=lambda i: len(unique[i][0]) + len(unique[i][1]))
    prompts = [unique[i][0] for i in order]
    targets = [Continuation(unique[i][1]) if unique[i][2] else unique[i][1] for i in order]
    scored = score_targets(model, tok, prompts, targets, batch_size) if order else []
    by_pair = {unique[i]: score for i, score in zip(order, scored)}
    return [by_pair[(p, t, isinstance(t, Continuation))] for p, t in pairs]
