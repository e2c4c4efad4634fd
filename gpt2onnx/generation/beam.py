"""Beam search and beam sampling (num_beams > 1), step for step as transformers 4.57's `_beam_search`.

Every prompt keeps num_beams running sequences (its beams) and the num_beams best finished ones. Each step:

  1. every beam's log-softmax (float32) goes through the logits processors of `sampling.process` (repetition
     penalty, no-repeat n-grams, min_new_tokens; when sampling also temperature, top-k and top-p, which keep
     at least 1 + eos ids tokens with beams), and the beam's running score is added;
  2. of a prompt's num_beams x vocab continuations, the (1 + eos ids) x num_beams best are the
     candidates (beam search), or as many drawn without replacement from their softmax (beam sampling:
     torch.multinomial, replayed by TorchGenerator.multinomial);
  3. candidates that end (an eos token, or the last allowed token) and rank among the first num_beams join the
     finished set with the score sum / new_tokens ** length_penalty; the num_beams best that do not end are
     the next beams, and the KV cache rows follow them (KVCache.reorder copies only the rows that change).

A prompt is done when its beams can no longer improve its finished set: early_stopping=True once it holds
num_beams sequences; False (transformers' heuristic) once the best running score, at the current length, is
below the worst finished one; "never" the same at the longest possible length when length_penalty > 0. The
search ends when every prompt is done, when every candidate ends, or at max_new_tokens. The float32 score
arithmetic and its -1e9 masks are transformers', so the same candidates win.
"""

from __future__ import annotations

import numpy as np

from ..format.gpt2 import position_ids
from ..runtime.session import OnnxSession
from ..text.stopping import ended_by_eos, eos_ids, first_eos
from .generator import check_finite, left_pad
from .sampling import log_softmax, process, softmax
from .settings import GenerationSettings

_MASK = np.float32(-1e9)  # transformers' "not this one" score offset


def beam_search(session: OnnxSession, prompts: list[list[int]], settings: GenerationSettings, *,
                eos_id: int | tuple[int, ...], rng=None, watch=None) -> list[list[tuple[list[int], float]]]:
    """Per prompt, the best num_return_sequences (new token ids, sequence score), best first.

    A sequence ends with <|endoftext|> (eos_id, or any of a tuple of them) when that finished it (unless
    settings.ignore_eos); its score is its
    summed processed log-probability divided by its new tokens ** length_penalty (transformers'
    `sequences_scores`). rng: None for beam search; a TorchGenerator (transformers' draws after set_seed) or
    a numpy Generator for beam sampling. watch(step, logits, total, picked): called every step with the raw
    logits [prompts x beams, vocab], the scores of every continuation [prompts, beams x vocab] and the
    candidates picked from them [prompts, candidates] (export/parity.py explains differences with them).
    """
    beams, batch, new_tokens = settings.num_beams, len(prompts), settings.max_new_tokens
    if new_tokens == 0:
        return [[([], 0.0)] * settings.num_return_sequences for _ in prompts]
    # candidates kept per step, as transformers: (1 + eos ids) per beam, one more than can all end
    kept = 1 + len(eos_ids(eos_id))
    keep, pad = kept * beams, first_eos(eos_id)

    # run each prompt once; its beams share that prefill's cache
    ids, mask = left_pad(prompts, pad)
    width = ids.shape[1]
    max_length = width + new_tokens
    positions = position_ids(mask)
    cache = session.empty_cache(batch, capacity=min(max_length, session.config.n_positions))
    logits, cache = session.run(ids, mask, positions, cache, logits_for="last", reuse_logits=True)
    logits, cache = np.repeat(logits[:, -1, :], beams, axis=0), cache.repeat_rows(beams)
    mask = np.concatenate([np.repeat(mask, beams, axis=0), np.ones((batch * beams, new_tokens), np.int64)], axis=1)
    positions = np.repeat(positions[:, -1:], beams, axis=0)

    # running beams: tokens [batch, beams, max_length] and scores; only beam 0 starts live (no duplicate beams)
    tokens = np.full((batch, beams, max_length), pad, np.int64)
    tokens[:, :, :width] = ids[:, None, :]
    running = np.zeros((batch, beams), np.float32)
    running[:, 1:] = _MASK
    # finished sequences: tokens, scores, whether the slot holds one, its new tokens
    done_tokens, done_scores = tokens.copy(), np.full((batch, beams), _MASK, np.float32)
    done, done_lengths = np.zeros((batch, beams), bool), np.zeros((batch, beams), np.int64)
    improvable = np.ones(batch, bool)  # the early-stopping heuristic has not yet ended this prompt
    among_best = np.arange(keep) < beams  # only the first num_beams candidates may finish
    first_beam = (np.arange(batch) * beams)[:, None]

    for step in range(new_tokens):
        now = width + step
        if not settings.greedy:
            check_finite(logits, step)
        # 1. each beam's processed log-probabilities plus its running score, flattened per prompt
        scores = process(log_softmax(logits), tokens[:, :, :now].reshape(batch * beams, now), step, settings,
                         eos_id=eos_id, min_tokens_to_keep=kept)
        vocab = scores.shape[-1]
        total = (scores.reshape(batch, beams, vocab) + running[:, :, None]).reshape(batch, beams * vocab)
        # 2. the candidates: the best continuations, or drawn without replacement
        picked = _top(total, keep) if settings.greedy else _draw(softmax(total), keep, rng)
        if watch is not None:
            watch(step, logits, total, picked)
        picked_scores = np.take_along_axis(total, picked, axis=1)
        source, token = picked // vocab, picked % vocab
        candidates = np.take_along_axis(tokens, source[:, :, None], axis=1)
        candidates[:, :, now] = token
        by_eos = ended_by_eos(token, eos_id, ignore_eos=settings.ignore_eos)
        ends = by_eos if by_eos is not None else np.zeros(token.shape, bool)
        ends |= now + 1 >= max_length
        # 3a. the next beams: the best candidates that go on
        going_on = picked_scores + ends.astype(np.float32) * _MASK
        best = _top(going_on, beams)
        tokens = np.take_along_axis(candidates, best[:, :, None], axis=1)
        running = np.take_along_axis(going_on, best, axis=1)
        # 3b. the finished set: the best num_beams of those it held and the candidates that just ended
        just_ended = ends & among_best
        finished = picked_scores / np.float32((step + 1) ** settings.length_penalty)
        finished += (done.all(axis=1, keepdims=True) & (settings.early_stopping is True)).astype(np.float32) * _MASK
        finished += (~improvable[:, None]).astype(np.float32) * _MASK
        finished += (~just_ended).astype(np.float32) * _MASK
        merged = np.concatenate([done_scores, finished], axis=1)
        order = _top(merged, beams)
        done_scores = np.take_along_axis(merged, order, axis=1)
        done_tokens = np.take_along_axis(np.concatenate([done_tokens, candidates], axis=1), order[:, :, None], axis=1)
        done = np.take_along_axis(np.concatenate([done, just_ended], axis=1), order, axis=1)
        lengths = np.concatenate([done_lengths, np.full((batch, keep), step + 1)], axis=1)
        done_lengths = np.take_along_axis(lengths, order, axis=1)
        # can a prompt's beams still beat its finished set? (transformers' _check_early_stop_heuristic)
        longest = new_tokens if settings.early_stopping == "never" and settings.length_penalty > 0 else step + 1
        best_possible = running[:, :1] / np.float32(longest ** settings.length_penalty)
        worst = np.where(done, done_scores.min(axis=1, keepdims=True), _MASK)
        improvable &= (best_possible > worst).any(axis=1)
        if not improvable.any() or (done.all() and settings.early_stopping is True) or ends.all():
            break
        # 3c. the cache rows follow their beams; feed every beam's new token one position further on
        cache.reorder((first_beam + np.take_along_axis(source, best, axis=1)).ravel())
        positions += 1
        logits, cache = session.run(tokens[:, :, now].reshape(-1, 1), mask[:, :now + 1], positions, cache,
                                    logits_for="last", reuse_logits=True)
        logits = logits[:, -1, :]

    return [[(done_tokens[p, j, width:width + done_lengths[p, j]].tolist(), float(done_scores[p, j]))
             for j in range(settings.num_return_sequences)] for p in range(batch)]


def _top(values: np.ndarray, k: int) -> np.ndarray:
    """Indices of each row's k largest values, largest first (torch.topk; equal values: lowest index first)."""
    if k * 8 < values.shape[-1]:  # a long row: partition first
        part = np.argpartition(-values, k - 1, axis=-1)[:, :k]
        return np.take_along_axis(part, np.lexsort((part, -np.take_along_axis(values, part, axis=-1)), axis=-1),
                                  axis=-1)
    return np.argsort(-values, axis=-1, kind="stable")[:, :k]


def _draw(probs: np.ndarray, k: int, rng) -> np.ndarray:
    """k indices per row drawn without replacement, in the order torch.multinomial returns them."""
    if isinstance(rng, np.random.Generator):  # the same exponential race, on numpy's stream
        return _top(probs / rng.standard_exponential(probs.shape, dtype=np.float32), k)
    return rng.multinomial(probs, k)
