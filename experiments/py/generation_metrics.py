"""CounterFact generation tests (ROME's ``test_generation``,
kmeng01/rome ``experiments/py/eval_utils_counterfact.py``): fluency and consistency.

Text is sampled from each record's ``generation_prompts`` the way ROME's ``generate_fast`` does:
top-k (k=5) sampling, ``n_gen_per_prompt`` samples per prompt, ``max_out_len`` tokens in total
counting the prompt (ROME: 1 and 100), decoded, NFKD-normalised, blank lines joined. Unlike ROME
the sampling is seeded (one generator per record, from the run seed and the case_id), so two runs
generate the same text.

- fluency, ``ngram_entropy``: ROME's weighted bigram/trigram entropy of each text (weights 2/3 and
  4/3, base 2), averaged over texts. Words come from ``nltk.word_tokenize``; without NLTK's punkt
  data (not installable offline) the same Treebank word tokenizer runs without the sentence split
  (``preserve_line=True``), which only differs on sentence-final periods inside a text.
- consistency, ``reference_score``: tf-idf cosine between all generated texts and all reference
  snippets about (relation, target_new) (dsets.attr_snippets + dsets.tfidf_stats). Needs
  attribute_snippets.json and the idf/vocabulary files; when they are missing the score is skipped
  and that is logged once, when the tests are set up.
"""
from __future__ import annotations

import collections
import logging
import unicodedata
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from experiments.py.numerics import check_logits
from util.scoring import model_device, prompt_ids

LOG = logging.getLogger(__name__)

TOP_K = 5
DEFAULT_MAX_OUT_LEN = 100
DEFAULT_N_GEN_PER_PROMPT = 1
NGRAM_ORDERS = (2, 3)
NGRAM_WEIGHTS = (2 / 3, 4 / 3)

Tokenize = Callable[[str], list[str]]


def word_tokenizer() -> tuple[Tokenize, str]:
    """NLTK's ``word_tokenize`` (ROME's), without the punkt sentence split when punkt is absent."""
    import nltk

    try:
        nltk.data.find("tokenizers/punkt_tab/english/")
        return nltk.word_tokenize, "nltk.word_tokenize"
    except LookupError:
        return (lambda text: nltk.word_tokenize(text, preserve_line=True)), "nltk.word_tokenize(preserve_line=True)"


def compute_freq(sentence: str, n: int, tokenize: Tokenize) -> collections.Counter:
    """Counts of the word n-grams of ``sentence``."""
    words = tokenize(sentence)
    return collections.Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))


def compute_n_gram_entropy(
    sentence: str,
    tokenize: Optional[Tokenize] = None,
    ns: Sequence[int] = NGRAM_ORDERS,
    weights: Sequence[float] = NGRAM_WEIGHTS,
) -> float:
    """Mean over n of weight_n * (entropy in bits of the n-gram distribution of ``sentence``)."""
    tokenize = tokenize or word_tokenizer()[0]
    entropies = []
    for n in ns:
        counts = np.array(list(compute_freq(sentence, n, tokenize).values()), dtype=np.float64)
        freqs = counts / counts.sum() if counts.size else counts
        entropies.append(float(np.sum(-freqs * np.log2(freqs))))
    return float(np.mean(np.array(entropies) * np.array(weights)))


def n_gram_entropy(gen_texts: Sequence[str], tokenize: Optional[Tokenize] = None) -> float:
    """ROME's fluency: the arithmetic mean of ``compute_n_gram_entropy`` over texts."""
    tokenize = tokenize or word_tokenizer()[0]
    return float(np.mean([compute_n_gram_entropy(t, tokenize) for t in gen_texts]))


def tfidf_similarity(text_a: str, text_b: str, vectorizer: Any) -> float:
    """Cosine similarity of the tf-idf vectors of two texts (ROME's consistency)."""
    enc = vectorizer.transform([text_a, text_b]).toarray()
    norms = np.linalg.norm(enc, axis=1)
    if not norms.all():
        return 0.0
    return float(enc[0] @ enc[1] / norms[0] / norms[1])


@torch.no_grad()
def sample_tokens(
    model: nn.Module, ids: list[int], n: int, max_out_len: int, generator: torch.Generator
) -> list[list[int]]:
    """``n`` top-k continuations of ``ids`` until ``max_out_len`` tokens in all, with a KV cache."""
    device = model_device(model)
    seq = torch.tensor([ids] * n, dtype=torch.long, device=device)
    step_input, past = seq, None
    while seq.shape[1] < max_out_len:
        out = model(input_ids=step_input, attention_mask=torch.ones_like(seq), past_key_values=past, use_cache=True)
        logits = out.logits[:, -1, :].float()
        check_logits(logits, "generation")
        top = torch.topk(logits, TOP_K, dim=-1)
        probs = torch.softmax(top.values, dim=-1).cpu()
        choice = torch.multinomial(probs, 1, generator=generator).to(device)
        step_input = top.indices.gather(1, choice)
        seq = torch.cat([seq, step_input], dim=1)
        past = out.past_key_values
    return seq.tolist()


def generate_fast(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    n_gen_per_prompt: int = DEFAULT_N_GEN_PER_PROMPT,
    max_out_len: int = DEFAULT_MAX_OUT_LEN,
    generator: Optional[torch.Generator] = None,
) -> list[str]:
    """Prompt plus sampled continuation, as text, for each prompt and sample (ROME's generate_fast)."""
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    texts = []
    for prompt in prompts:
        for row in sample_tokens(model, prompt_ids(tok, prompt), n_gen_per_prompt, max_out_len, generator):
            text = tok.decode(row, skip_special_tokens=True)
            texts.append(unicodedata.normalize("NFKD", text).replace("\n\n", " "))
    return texts


def record_seed(seed: int, case_id: Any) -> int:
    """A generator seed for one record, the same on every machine (no Python hash())."""
    return (int(seed) * 1_000_003 + int(case_id)) % (2**63)


class ConsistencyReference:
    """Reference snippets and the tf-idf vectorizer of the consistency score."""

    def __init__(self, snippets: Any, vectorizer: Any):
        self.snippets, self.vectorizer = snippets, vectorizer

    def texts_for(self, record: dict) -> list[str]:
        rw = record["requested_rewrite"]
        return [s["text"] for s in self.snippets[rw["relation_id"]].get(rw["target_new"]["id"], [])]

    def score(self, gen_texts: Sequence[str], record: dict) -> Optional[float]:
        refs = self.texts_for(record)
        if not refs:
            LOG.debug("case %s: no reference snippets for its target; no reference_score", record["case_id"])
            return None
        return tfidf_similarity(" ".join(gen_texts), " ".join(refs), self.vectorizer)


def load_consistency_reference(paths: Any, allow_download: bool = True) -> tuple[Optional[ConsistencyReference], str]:
    """The reference when its files are available, else None and why (logged once, here)."""
    from dsets.attr_snippets import AttributeSnippets
    from dsets.files import DataFileMissingError
    from dsets.tfidf_stats import get_tfidf_vectorizer

    try:
        return ConsistencyReference(AttributeSnippets(paths, allow_download), get_tfidf_vectorizer(paths, allow_download)), ""
    except (DataFileMissingError, ValueError) as e:
        reason = str(e).splitlines()[0]
        LOG.warning("generation tests: consistency (reference_score) is skipped, fluency is computed: %s", reason)
        return None, reason


class GenerationTests:
    """Callable ``(model, tok, record) -> {'ngram_entropy', 'reference_score'?, 'text'}``."""

    def __init__(
        self,
        seed: int,
        max_out_len: int = DEFAULT_MAX_OUT_LEN,
        n_gen_per_prompt: int = DEFAULT_N_GEN_PER_PROMPT,
        reference: Optional[ConsistencyReference] = None,
        skipped_reason: str = "",
    ):
        self.seed, self.max_out_len, self.n_gen_per_prompt = seed, max_out_len, n_gen_per_prompt
        self.reference, self.skipped_reason = reference, skipped_reason
        self.tokenize, self.tokenizer_name = word_tokenizer()

    def settings(self) -> dict:
        """What run.json records about the generation tests."""
        return {
            "max_out_len": self.max_out_len,
            "n_gen_per_prompt": self.n_gen_per_prompt,
            "top_k": TOP_K,
            "seed": self.seed,
            "word_tokenizer": self.tokenizer_name,
            "consistency": self.reference is not None,
            "consistency_skipped_because": self.skipped_reason or None,
        }

    def __call__(self, model: nn.Module, tok: PreTrainedTokenizerBase, record: dict) -> dict:
        prompts = list(record.get("generation_prompts") or [])
        if not prompts:
            return {}
        generator = torch.Generator().manual_seed(record_seed(self.seed, record["case_id"]))
        texts = generate_fast(model, tok, prompts, self.n_gen_per_prompt, self.max_out_len, generator)
        out: dict[str, Any] = {"ngram_entropy": n_gram_entropy(texts, self.tokenize)}
        if self.reference is not None:
            score = self.reference.score(texts, record)
            if score is not None:
                out["reference_score"] = score
        out["text"] = texts
        return out
