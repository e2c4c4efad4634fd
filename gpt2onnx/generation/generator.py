"""The generation loop: prefill the prompts once, then one token per step with the KV cache."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

from ..errors import GenerationError
from ..format.gpt2 import position_ids
from ..runtime.session import OnnxSession
from ..text.stopping import ended_by_eos, first_eos
from .sampling import choose, process
from .settings import GenerationSettings


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and attention mask [batch, longest], prompts aligned to the right."""
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad_id, np.int64)
    mask = np.zeros((len(prompts), width), np.int64)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = prompt
        mask[row, width - len(prompt):] = 1
    return ids, mask


def generate_tokens(session: OnnxSession, prompts: list[list[int]], settings: GenerationSettings, *,
                    eos_id: int | tuple[int, ...], rng=None,
                    stopped: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
                    watch: Callable[..., None] | None = None,
                    pad_id: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (next token of every row, which rows were still live) step by step.

    Rows are prompts x num_return_sequences, prompt-major. eos_id: the end-of-text token, or a tuple of them
    (each ends a row; min_new_tokens holds back all). A finished row yields `eos_id` (the first) as padding
    (as transformers does) and is not live. `stopped(next_ids, live)` may end rows for reasons of its
    own (stop strings). `watch(logits, next_ids, live, scores)` sees each step's raw logits [rows, vocab] (a
    buffer the next step overwrites) before the tokens are yielded (logprobs) and the processed
    scores they were picked from (output_scores). pad_id:
    the left padding's token id (default eos_id; the processors see it). To stop early, stop iterating.
    """
    pad = first_eos(eos_id)
    ids, mask = left_pad(prompts, pad if pad_id is None else pad_id)
    positions = position_ids(mask)
    # room for the whole generation up front: the cache never grows (one copy of it) on the way
    cache = session.empty_cache(len(prompts), capacity=min(ids.shape[1] + settings.max_new_tokens,
                                                           session.config.n_positions))
    # only the last position's logits are needed: the lm_head is not run over the whole prompt
    logits, cache = session.run(ids, mask, positions, cache, logits_for="last", reuse_logits=True)
    logits = logits[:, -1, :]
    # num_return_sequences: the prompt was run once; every copy of a row shares its cache
    if settings.num_return_sequences > 1:
        n = settings.num_return_sequences
        ids, mask, logits = np.repeat(ids, n, 0), np.repeat(mask, n, 0), np.repeat(logits, n, 0)
        positions, cache = np.repeat(positions, n, 0), cache.repeat_rows(n)
    # every row's tokens and mask for the whole generation, filled in step by step (no per-step copies)
    width = ids.shape[1]
    ids = np.concatenate([ids, np.full((len(ids), settings.max_new_tokens), pad, np.int64)], axis=1)
    mask = np.concatenate([mask, np.ones((len(mask), settings.max_new_tokens), np.int64)], axis=1)
    live, all_live = np.ones(len(ids), dtype=bool), True  # never changed in place: yielded as it is
    positions = positions[:, -1:].copy()
    for step in range(settings.max_new_tokens):
        # pick every row's next token from its processed logits; finished rows emit padding
        now = width + step  # tokens so far
        next_ids, scores = pick(logits, ids[:, :now], step, settings, rng, eos_id=eos_id)
        if not all_live:
            next_ids = np.where(live, next_ids, pad)
        if watch is not None:
            watch(logits, next_ids, live, scores)
        yield next_ids, live
        ended = ended_rows(next_ids, live, settings, eos_id=eos_id, stopped=stopped)
        if ended is not None and ended.any():  # (few numpy calls per step: each costs after a run)
            live, all_live = live & ~ended, False
            if not live.any():
                return
        if step + 1 == settings.max_new_tokens:
            return
        # feed just the new tokens, one position further on, through the cached past
        ids[:, now] = next_ids
        positions += 1
        logits, cache = session.run(ids[:, now:now + 1], mask[:, :now + 1], positions, cache, logits_for="last",
                                    reuse_logits=True)
        logits = logits[:, -1, :]


def pick(logits: np.ndarray, sequences: np.ndarray, step: int, settings: GenerationSettings, rng, *,
         eos_id: int | tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Every row's next token from its raw logits [rows, vocab] at this step, and the processed scores it was
    picked from (sampling.process, then choose); non-finite logits that could decide the pick are an error."""
    if not settings.greedy:
        check_finite(logits, step)  # sampling reads every probability
    scores = process(logits, sequences, step, settings, eos_id=eos_id)
    next_ids = choose(scores, settings, rng)
    if settings.greedy:  # a NaN or +inf anywhere is what argmax picks
        check_finite(np.take_along_axis(logits, next_ids[:, None], axis=1), step)
    return next_ids, scores


def ended_rows(next_ids: np.ndarray, live: np.ndarray, settings: GenerationSettings, *,
               eos_id: int | tuple[int, ...],
               stopped: Callable[[np.ndarray, np.ndarray], np.ndarray] | None) -> np.ndarray | None:
    """Which rows this step's tokens end: at an end token (stopping.ended_by_eos) or by `stopped(next_ids, live)`;
    None when nothing can end a row."""
    ended = ended_by_eos(next_ids, eos_id, ignore_eos=settings.ignore_eos)
    if stopped is not None:
        by_stop = stopped(next_ids, live)
        ended = by_stop if ended is None else ended | by_stop
    return ended


def check_finite(logits: np.ndarray, step: int) -> None:
    if not np.isfinite(logits).all():
        raise GenerationError(f"the model produced non-finite logits at step {step}",
                              hint="the weights may be damaged; run `gpt2onnx verify` on the model")


def generate(session: OnnxSession, prompts: list[list[int]], settings: GenerationSettings, *,
             eos_id: int | tuple[int, ...], rng=None,
             stopped: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
             watch: Callable[..., None] | None = None, pad_id: int | None = None) -> list[list[int]]:
    """The new tokens of every row (prompt-major, then its return sequences), padding left out: a row ends
    at its EOS (included), at the token that completed a stop string, or at max_new_tokens."""
    return collect(generate_tokens(session, prompts, settings, eos_id=eos_id, rng=rng, stopped=stopped, watch=watch,
                                   pad_id=pad_id),
                   len(prompts) * settings.num_return_sequences)


def collect(steps: Iterator[tuple[np.ndarray, np.ndarray]], rows: int) -> list[list[int]]:
    """Every row's tokens from a token loop's (next ids, live) steps, padding left out."""
    tokens: list[list[int]] = [[] for _ in range(rows)]
    for next_ids, live in steps:
        for row, (token, alive) in enumerate(zip(next_ids.tolist(), live.tolist())):
            if alive:
                tokens[row].append(token)
    return tokens
