"""Perplexity on a fixed slice of the WikiText-2 raw test text: the cheap companion of the probes.

The slice: the first ``n_tokens`` tokens of ``wiki.test.raw`` as the model's tokenizer splits the
file's text read from its first character (headings and newlines included, nothing skipped), cut
into consecutive windows of ``window`` tokens that are scored independently. Where the tokenizer
adds a BOS token (Gemma) each window starts with it and all its tokens are predicted; otherwise
the first token of a window is context only. Perplexity = exp(total NLL / predicted tokens).
The same model and tokenizer therefore always see the same tokens.

AlphaEdit's ``glue_eval`` instead joins the first 20 WikiText-103 *train* texts and scores their
first 100 tokens in one sequence (dividing by all 100 tokens, the first one unpredicted): one
short, noisy window of a split that is not available offline.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from editing.corpus import corpus_dirs
from util.architectures import context_length
from util.globals import Paths
from util.scoring import final_hidden, lm_logits, model_device, pad_right, pad_token_id

WIKITEXT2_TEST = "wikitext-2-raw/wiki.test.raw"


@dataclasses.dataclass(frozen=True)
class PerplexitySettings:
    n_tokens: int = 4096
    window: int = 512
    batch_size: int = 4
    file: str | None = None  # a text file to read instead of WikiText-2's test split

    def __post_init__(self) -> None:
        if self.n_tokens < 2 or self.window < 2 or self.batch_size < 1:
            raise ValueError(f"perplexity needs n_tokens >= 2, window >= 2 and batch_size >= 1, got {self}")


def find_wikitext_test(settings: PerplexitySettings, paths: Paths | None = None) -> Path:
    """``settings.file``, or the WikiText-2 raw test file in the corpus folders (WILKE_CORPUS_DIR,
    ../shared/data/corpus, ...)."""
    if settings.file is not None:
        if not Path(settings.file).is_file():
            raise FileNotFoundError(f"perplexity: text file {settings.file} not found")
        return Path(settings.file)
    dirs = corpus_dirs(paths)
    for base in dirs:
        if (base / WIKITEXT2_TEST).is_file():
            return base / WIKITEXT2_TEST
    raise FileNotFoundError(f"perplexity: {WIKITEXT2_TEST} not found in any of {', '.join(map(str, dirs))}")


def adds_bos(tok: PreTrainedTokenizerBase) -> bool:
    return tok.bos_token_id is not None and tok("a")["input_ids"][:1] == [tok.bos_token_id]


def slice_ids(tok: PreTrainedTokenizerBase, text: str, n_tokens: int) -> list[int]:
    """The first ``n_tokens`` token ids of ``text``: a prefix of the text is tokenized, long enough
    that the token cut at its end lies well past the slice."""
    chars = 8 * n_tokens
    while True:
        ids = tok(text[:chars], add_special_tokens=False)["input_ids"]
        if len(ids) > n_tokens + 8 or chars >= len(text):
            break
        chars *= 2
    if len(ids) < n_tokens:
        raise ValueError(f"perplexity: the text has only {len(ids)} tokens, fewer than n_tokens={n_tokens}")
    return list(ids[:n_tokens])


def windows(tok: PreTrainedTokenizerBase, ids: Sequence[int], window: int) -> list[list[int]]:
    bos = [tok.bos_token_id] if adds_bos(tok) else []
    return [bos + list(ids[i : i + window]) for i in range(0, len(ids), window)]


@torch.no_grad()
def sequence_nll(model: nn.Module, tok: PreTrainedTokenizerBase, sequences: Sequence[Sequence[int]],
                 batch_size: int) -> tuple[float, int]:
    """Total NLL of every token of every sequence given the ones before it, and how many were predicted."""
    device = model_device(model)
    total, count = 0.0, 0
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start : start + batch_size]
        ids, mask = pad_right(chunk, pad_token_id(tok), device)
        hidden = final_hidden(model, ids, mask)
        for row, seq in enumerate(chunk):
            logp = torch.log_softmax(lm_logits(model, hidden[row, : len(seq) - 1]).float(), dim=-1)
            total += float(-logp.gather(1, ids[row, 1 : len(seq), None]).sum())
            count += len(seq) - 1
    return total, count


def perplexity(model: nn.Module, tok: PreTrainedTokenizerBase, path: Path,
               settings: PerplexitySettings = PerplexitySettings()) -> dict:
    """Perplexity of the model on the slice of ``path`` that ``settings`` fixes."""
    text = Path(path).read_text(encoding="utf-8")
    window = min(settings.window, context_length(model))  # a model with a shorter context scores shorter windows
    seqs = windows(tok, slice_ids(tok, text, settings.n_tokens), window)
    total, count = sequence_nll(model, tok, seqs, settings.batch_size)
    return {"perplexity": math.exp(total / count), "mean_nll": total / count, "predicted_tokens": count,
            "windows": len(seqs)}
