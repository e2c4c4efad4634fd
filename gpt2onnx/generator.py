"""The generation loop: prefill the prompts once, then one token per step with the KV cache."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from .errors import GenerationError
from .sampling import sample
from .session import OnnxSession
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
                    eos_id: int, rng: np.random.Generator | None = None) -> Iterator[np.ndarray]:
    """Yield the next token of every row, one step at a time. Finished rows yield `eos_id` (padding).

    Stop early by simply not asking for the next step (break out of the loop, or close the iterator).
    """
    ids, mask = left_pad(prompts, eos_id)
    # positions count only real tokens, so a padded row starts at position 0 like an unpadded one
    positions = np.where(mask == 1, mask.cumsum(axis=1) - 1, 1)
    past = session.empty_cache(len(prompts))
    finished = np.zeros(len(prompts), dtype=bool)
    for step in range(settings.max_new_tokens):
        # run the new positions through the model, growing the cache, and keep the last logits
        logits, past = session.run(ids, mask, positions, past)
        last = logits[:, -1, :]
        if not np.isfinite(last).all():
            raise GenerationError(f"the model produced non-finite logits at step {step}",
                                  hint="the weights may be damaged; run `gpt2onnx verify` on the model")
        # pick the next token of each row; rows that already ended keep emitting padding
        next_ids = np.where(finished, eos_id, sample(last, settings, rng))
        yield next_ids
        if not settings.ignore_eos:
            finished |= next_ids == eos_id
            if finished.all():
                return
        # the next step feeds just the new tokens, one position further on
        ids = next_ids[:, None].astype(np.int64)
        positions = positions[:, -1:] + 1
        mask = np.concatenate([mask, np.ones((len(prompts), 1), np.int64)], axis=1)


def generate(session: OnnxSession, prompts: list[list[int]], settings: GenerationSettings, *,
             eos_id: int, rng: np.random.Generator | None = None) -> list[list[int]]:
    """The new tokens of every row, each ending at (and including) its first EOS unless ignore_eos."""
    rows: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    for next_ids in generate_tokens(session, prompts, settings, eos_id=eos_id, rng=rng):
        for row, token in enumerate(next_ids.tolist()):
            if not done[row]:
                rows[row].append(token)
                done[row] = token == eos_id and not settings.ignore_eos
    return rows
