"""Choosing the next token: a pure function of (logits, the sequences so far, settings, random generator).

The logits are processed exactly in transformers' order and arithmetic (float32): repetition penalty,
no-repeat n-grams, min_new_tokens, then — when sampling — temperature, top-k, top-p; softmax; one draw per
row. Temperature 0 (or do_sample=False) is greedy: argmax of the processed logits.
"""

from __future__ import annotations

import numpy as np

from .settings import GenerationSettings


def sample(logits: np.ndarray, sequences: np.ndarray, new_tokens: int, settings: GenerationSettings, rng, *,
           eos_id: int | None) -> np.ndarray:
    """Next token id of every row.

    logits: [batch, vocab] for the last position. sequences: [batch, length] every token so far, left
    padding included (transformers' processors see it too). new_tokens: tokens generated so far.
    rng: None for greedy; a numpy Generator, or a gpt2onnx.torch_random.TorchGenerator to replay
    PyTorch's stream.
    """
    scores = process(logits, sequences, new_tokens, settings, eos_id=eos_id)
    if settings.greedy:
        return scores.argmax(axis=-1)
    return draw(softmax(scores), rng)


def process(logits: np.ndarray, sequences: np.ndarray, new_tokens: int, settings: GenerationSettings, *,
            eos_id: int | None, min_tokens_to_keep: int = 1) -> np.ndarray:
    """The logits after transformers' processors and (when sampling) warpers, as float32.
    min_tokens_to_keep: top-k and top-p keep at least this many tokens (transformers' beam sampling: 2)."""
    scores = np.asarray(logits, dtype=np.float32)
    # the steps below that write in place get a copy, so the caller's logits stay untouched (greedy decoding
    # with no processor reads the logits as they are: a copy of the vocabulary per step saved)
    changes_in_place = (settings.repetition_penalty != 1.0 or settings.no_repeat_ngram_size > 0
                        or (eos_id is not None and new_tokens < settings.min_new_tokens)
                        or (not settings.greedy and settings.temperature == 1.0
                            and (0 < settings.top_k < scores.shape[-1] or settings.top_p < 1.0)))
    if changes_in_place:
        scores = scores.copy()
    if settings.repetition_penalty != 1.0:
        # tokens already in the row: negative scores are multiplied, positive ones divided
        seen = np.take_along_axis(scores, sequences, axis=1)
        penalty = np.float32(settings.repetition_penalty)
        np.put_along_axis(scores, sequences, np.where(seen < 0, seen * penalty, seen / penalty), axis=1)
    if settings.no_repeat_ngram_size > 0:
        for row, banned in enumerate(_banned_ngram_tokens(sequences, settings.no_repeat_ngram_size)):
            scores[row, banned] = -np.inf
    if eos_id is not None and new_tokens < settings.min_new_tokens:
        scores[:, eos_id] = -np.inf
    if settings.greedy:
        return scores
    if settings.temperature != 1.0:
        scores = scores / np.float32(settings.temperature)
    top_k = max(settings.top_k, min_tokens_to_keep) if settings.top_k else 0
    if top_k and top_k < scores.shape[-1]:
        kth = -np.partition(-scores, top_k - 1, axis=-1)[:, top_k - 1 : top_k]
        scores[scores < kth] = -np.inf  # ties with the k-th score stay, as with torch.topk
    if settings.top_p < 1.0:
        # sort ascending; drop tokens while the cumulative probability is <= 1 - top_p (the top one stays)
        order = np.argsort(scores, axis=-1, kind="stable")
        cumulative = np.cumsum(softmax(np.take_along_axis(scores, order, axis=-1)), axis=-1, dtype=np.float32)
        drop_sorted = cumulative <= np.float32(1 - settings.top_p)
        drop_sorted[:, -min_tokens_to_keep:] = False
        drop = np.empty_like(drop_sorted)
        np.put_along_axis(drop, order, drop_sorted, axis=-1)
        scores[drop] = -np.inf
    return scores


def softmax(scores: np.ndarray) -> np.ndarray:
    shifted = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def draw(probs: np.ndarray, rng) -> np.ndarray:
    """One token per row from `probs` [batch, vocab] (float32)."""
    if isinstance(rng, np.random.Generator):
        # inverse CDF with one uniform number per row
        cdf = np.cumsum(probs, axis=-1, dtype=np.float64)
        coins = rng.random(len(probs))[:, None] * cdf[:, -1:]
        return np.minimum((cdf <= coins).sum(axis=-1), probs.shape[-1] - 1)
    return rng.multinomial_one(probs)  # torch's algorithm on torch's stream


def _banned_ngram_tokens(sequences: np.ndarray, n: int) -> list[list[int]]:
    """Per row, the tokens that would complete an n-gram already present (transformers' rule)."""
    length = sequences.shape[1]
    if length + 1 < n:
        return [[] for _ in sequences]
    banned = []
    for row in sequences.tolist():
        prefix = tuple(row[length - n + 1:]) if n > 1 else ()
        banned.append([row[i + n - 1] for i in range(length - n + 1) if tuple(row[i:i + n - 1]) == prefix])
    return banned
