"""Choosing the next token: a pure function of (logits, settings, random generator)."""

from __future__ import annotations

import numpy as np

from .settings import GenerationSettings


def sample(logits: np.ndarray, settings: GenerationSettings, rng: np.random.Generator | None) -> np.ndarray:
    """Next token id for each row of `logits` [batch, vocab]. Greedy needs no generator."""
    if settings.greedy:
        return logits.argmax(axis=-1)
    # scale the logits by the temperature, then cut the tail (top-k, then top-p)
    scores = logits.astype(np.float32) / np.float32(settings.temperature)
    if 0 < settings.top_k < scores.shape[-1]:
        kth = np.partition(scores, -settings.top_k, axis=-1)[:, -settings.top_k][:, None]
        scores = np.where(scores < kth, -np.inf, scores)
    if settings.top_p < 1.0:
        order = np.argsort(-scores, axis=-1, kind="stable")
        sorted_probs = _softmax(np.take_along_axis(scores, order, axis=-1))
        # drop a token when the tokens ranked above it already reach top_p (the top one always stays)
        drop_sorted = (np.cumsum(sorted_probs, axis=-1) - sorted_probs) >= settings.top_p
        drop = np.zeros_like(drop_sorted)
        np.put_along_axis(drop, order, drop_sorted, axis=-1)
        scores = np.where(drop, -np.inf, scores)
    # draw one token per row from the remaining distribution
    probs = _softmax(scores).astype(np.float64)
    coins = rng.random(len(probs))[:, None]
    cdf = np.cumsum(probs, axis=-1)
    return np.minimum((cdf < coins * cdf[:, -1:]).sum(axis=-1), probs.shape[-1] - 1)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)
