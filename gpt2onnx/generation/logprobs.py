"""Log-probabilities from the model's raw logits: of a chosen token, of its top alternatives, of a whole text.

Every value here is the log-softmax of the model's RAW logits: before repetition penalty, temperature,
top-k, top-p or any bias. That is what OpenAI's `logprobs` and vLLM's default report, and what transformers'
`compute_transition_scores` gives with `output_logits=True`: the model's own belief about the token, the
same whatever sampling settings picked it. The sum runs in float64; the values equal torch's float32
`log_softmax` of PyTorch's logits within 1e-4 (tests/test_logprobs.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..errors import InvalidArgumentError
from ..format.gpt2 import position_ids
from ..runtime.session import OnnxSession
from .generator import left_pad

TopLogprobs = list[tuple[int, float]]  # (token id, logprob), most likely first
_SCORE_LOGITS_BYTES = 256 * 2**20  # logits one scoring run may hold (batch x length x vocab float32)


@dataclass(frozen=True)
class Score:
    """How likely the model finds a text, token by token."""

    tokens: list[str]  # each token's own text (a part of a multi-byte character decodes to "\ufffd")
    token_ids: list[int]
    token_logprobs: list[float | None]  # log P(token | the tokens before it); None for the first token
    top_logprobs: list[TopLogprobs | None] | None  # per token, the k likeliest alternatives (None: not asked)
    perplexity: float | None  # exp(mean negative logprob over tokens 2..n); None for a one-token text


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log-softmax over the last axis, summed in float64 (returns float64)."""
    x = np.asarray(logits, dtype=np.float64)
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def top(logprobs: np.ndarray, k: int) -> TopLogprobs:
    """The k largest entries of one row of logprobs as (token id, logprob), largest first (ties: lower id)."""
    if k <= 0:
        return []
    k = min(k, logprobs.shape[-1])
    candidates = np.argpartition(-logprobs, k - 1)[:k]
    order = sorted(candidates.tolist(), key=lambda t: (-logprobs[t], t))
    return [(t, float(logprobs[t])) for t in order]


def chosen(logits: np.ndarray, tokens, k: int | None) -> list[tuple[float, TopLogprobs | None]]:
    """Per row of raw `logits` [rows, vocab]: (logprob of the row's token, its top-k list or None if k is None)."""
    rows = log_softmax(logits)
    return [(float(row[t]), None if k is None else top(row, k)) for row, t in zip(rows, np.asarray(tokens).tolist())]


def score(session: OnnxSession, texts: list[list[int]], *, pad_id: int, decode: Callable[[list[int]], str],
          top_logprobs: int | None = None) -> list[Score]:
    """Every token's logprob given the tokens before it, for each text (token ids), in left-padded batches.

    One prefill per batch with the logits of every position; texts are grouped so that a batch's logits stay
    under 256 MB. top_logprobs: also list the k likeliest tokens at every position (None: no lists).
    """
    vocab = session.config.vocab_size
    scores, start = [], 0
    while start < len(texts):
        # the longest text of a group sets its width: add texts while the logits fit the budget
        end, width = start + 1, len(texts[start])
        while end < len(texts) and (end + 1 - start) * max(width, len(texts[end])) * vocab * 4 <= _SCORE_LOGITS_BYTES:
            width = max(width, len(texts[end]))
            end += 1
        scores += _score_batch(session, texts[start:end], pad_id, decode, top_logprobs)
        start = end
    return scores


def _score_batch(session: OnnxSession, texts: list[list[int]], pad_id: int, decode, k: int | None) -> list[Score]:
    ids, mask = left_pad(texts, pad_id)
    positions = position_ids(mask)
    cache = session.empty_cache(len(texts), capacity=ids.shape[1])
    logits, _ = session.run(ids, mask, positions, cache, logits_for="all")
    results = []
    for row, text in enumerate(texts):
        # the logits at position i predict token i + 1: a text of n tokens has n - 1 predictions
        predicted = logits[row, ids.shape[1] - len(text):-1]
        values = chosen(predicted, text[1:], k) if len(text) > 1 else []
        logprobs = [None] + [v for v, _ in values]
        tops = None if k is None else [None] + [t for _, t in values]
        perplexity = math.exp(-sum(logprobs[1:]) / (len(text) - 1)) if len(text) > 1 else None
        results.append(Score(tokens=[decode([t]) for t in text], token_ids=list(text), token_logprobs=logprobs,
                             top_logprobs=tops, perplexity=perplexity))
    return results


def check_top(name: str, k, vocab_size: int) -> None:
    """k is None (not asked) or a number of alternatives from 0 to the vocabulary size."""
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= vocab_size):
        raise InvalidArgumentError(f"{name} must be None or an integer from 0 to {vocab_size}, got {k!r}",
                                   hint="ask for a few alternatives (OpenAI allows up to 5)")
