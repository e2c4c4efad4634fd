"""Speculative decoding at batch 1: guess several tokens cheaply, check them all in one run of the model.

Batch-1 decoding reads every weight once per token. Here a drafter guesses the next few tokens, and one run
of the graph over [last token, draft...] gives the model's logits at every one of those positions, for about
the weight reads of one token. The drafter is either

- prompt lookup (transformers' `prompt_lookup_num_tokens`): the last n-gram of the text so far (up to
  `max_matching_ngram_size` tokens, the longest first) is searched for earlier in the prompt and the new
  text; the tokens that followed its first occurrence are the draft. When nothing matches, the step is the
  plain one-token step (no run is wasted on an empty draft); or
- an assistant model (transformers' `assistant_model`): a smaller export with the same vocabulary drafts
  `num_assistant_tokens` tokens greedily, keeping its own KV cache in step with the text.

The tokens are then picked position after position by the same `generator.pick` call as the plain loop
makes, with the same sequences, step counts and random generator, and a draft token is kept
while it equals the picked token. The first picked token that differs is the model's own next token; the
positions computed after it are dropped by setting the cache's length back (the cache is preallocated, so
nothing is copied). Each picked token takes the random draws the plain loop would take for it (one block of
exponentials per token with the torch sampler, one uniform with numpy's), and drafts only change how many
positions a run computes, never which tokens come out: greedy gives plain greedy's tokens, and seeded sampling
gives plain seeded sampling's (so transformers' plain sampling's). That is stronger than transformers' own
assisted sampling, whose verification draws differ from plain sampling's (its tokens keep only the
distribution). The one caveat is rounding: a run over several positions computes the same logits with other
matrix shapes. fp32 exports: within 6e-6 of one-position runs (an exact near-tie could go the other way, as
in transformers' assisted generation); int8 exports: up to 0.11 apart on the trained test model (10 runs of
10 positions, no top-1 changed), as DynamicQuantizeMatMul quantizes all rows of a call with one scale; int4
exports: ONNX Runtime's 4-bit MatMulNBits takes another path for several rows (as for a batch), 1e-2 apart,
so a near-tie within that margin can differ from plain decoding (one of 20 128-token runs did, at a
log-probability margin of 0.002).

One row only: the graph takes several new positions after a past only at batch 1 (ONNX Runtime's
GroupQueryAttention), and a batch already shares each weight read among its rows, so Model runs batches and
num_return_sequences > 1 through the plain loop (same tokens, no speculation).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

import numpy as np

from ..runtime.session import OnnxSession
from ..text.stopping import ended_by_eos, first_eos
from .generator import ended_rows, pick
from .sampling import sample
from .settings import GenerationSettings

DEFAULT_NGRAM = 2  # transformers' max_matching_ngram_size when unset


@dataclasses.dataclass
class SpeculationStats:
    """How the drafts fared in one generation (Generation.speculation)."""

    runs: int = 0  # runs of the model after the prefill (a check of a draft, or a plain one-token step)
    drafted: int = 0  # draft tokens checked
    accepted: int = 0  # draft tokens that were the model's own choice (kept)

    @property
    def acceptance_rate(self) -> float:
        """Kept draft tokens over checked ones (0 when nothing was drafted)."""
        return self.accepted / self.drafted if self.drafted else 0.0


class PromptLookup:
    """Drafts copied from the text so far: what followed the first earlier occurrence of its last n-gram.

    Where transformers always drafts prompt_lookup_num_tokens tokens, this drafts as many as recent drafts
    earned, so that text that does not repeat costs little: checking k drafts is not free (a run over
    k + 1 positions costs more than a one-position step: fp32, 1 thread, trained test model: 1.27x for 2
    positions, 1.7x for 11; int4: 1.1x and 3.8x, whose one-position path is a fast matrix-vector product).
    The draft length grows by 2 after a draft kept whole (up to prompt_lookup_num_tokens) and drops to the
    kept tokens + 1 otherwise; after a draft rejected at its first token, the next 1, 3, 7 (up to 15)
    lookups are skipped (plain one-token steps), until a draft is kept again.
    """

    def __init__(self, settings: GenerationSettings):
        self.num_tokens = settings.prompt_lookup_num_tokens
        self.max_ngram = settings.max_matching_ngram_size or DEFAULT_NGRAM
        self.size = self.num_tokens  # tokens the next draft may have
        self.misses = 0  # drafts in a row rejected at their first token
        self.wait = 0  # lookups still to skip

    def propose(self, ids: np.ndarray, limit: int, new_tokens: int = 0) -> list[int]:
        """Up to min(num_tokens, limit) draft tokens after `ids` (every token so far), [] when nothing matches.
        (`new_tokens` is Assistant.propose's; the lookup does not need it.)

        transformers' PromptLookupCandidateGenerator: n-gram sizes from the longest down, the first
        (leftmost) occurrence that has a continuation."""
        if self.wait:
            self.wait -= 1
            return []
        limit = min(limit, self.size)
        length = len(ids)
        for n in range(min(self.max_ngram, length - 1), 0, -1):
            hits = ids[:length - n] == ids[length - n]  # starts i < length - n: the n-gram itself is excluded
            for j in range(1, n):
                hits &= ids[j:length - n + j] == ids[length - n + j]
            starts = np.flatnonzero(hits)
            if starts.size:
                start = int(starts[0]) + n
                return ids[start:start + limit].tolist()
        return []

    def update(self, kept: int, drafted: int) -> None:
        """Draft longer after a draft kept whole, shorter after one that was not (see the class)."""
        if not drafted:
            return
        self.size = min(self.num_tokens, self.size + 2) if kept == drafted else kept + 1
        self.misses = self.misses + 1 if kept == 0 else 0
        self.wait = min(2 ** self.misses - 1, 15)


class Assistant:
    """Drafts by a smaller model with the same vocabulary, greedily, after the same logits processors."""

    def __init__(self, session: OnnxSession, settings: GenerationSettings, *, eos_id: int | tuple[int, ...],
                 capacity: int):
        self.session = session
        self.settings = dataclasses.replace(settings, do_sample=False)  # greedy, same processors
        self.eos_id = eos_id
        self.num_tokens = settings.num_assistant_tokens
        self.schedule = settings.num_assistant_tokens_schedule
        self.cache = session.empty_cache(1, capacity=min(capacity, session.config.n_positions))
        self.fed = 0  # tokens of the text in the assistant's cache
        self.pending = 0  # of the last draft, tokens fed to the assistant (their keys are in its cache)
        # allocated once, sliced at every draft token: the text and drafts so far, the mask and the positions
        positions = session.config.n_positions
        self.tokens = np.empty((1, positions + 1), np.int64)
        self.mask = np.ones((1, positions), np.int64)
        self.positions = np.arange(positions, dtype=np.int64)[None]

    def propose(self, ids: np.ndarray, limit: int, new_tokens: int) -> list[int]:
        """Up to min(num_tokens, limit) tokens the assistant would pick after `ids`, fed through its cache."""
        count = min(self.num_tokens, limit, self.session.config.n_positions + 1 - len(ids))
        now = len(ids)  # tokens of the text and the draft so far
        if count > 0:  # (the text can be longer than the assistant's n_positions: then no draft)
            self.tokens[0, :now] = ids
        start = self.fed  # the first token not yet in the assistant's cache
        drafts: list[int] = []
        for i in range(max(count, 0)):
            past = self.cache.length
            total = past + now - start
            logits, self.cache = self.session.run(self.tokens[:, start:now], self.mask[:, :total],
                                                  self.positions[:, past:total], self.cache, logits_for="last",
                                                  reuse_logits=True)
            token = int(sample(logits[:, -1], self.tokens[:, :now], new_tokens + i, self.settings, None,
                               eos_id=self.eos_id)[0])
            drafts.append(token)
            self.tokens[0, now] = token
            start, now = now, now + 1
        self.fed = min(len(ids), self.cache.length)
        self.pending = self.cache.length - self.fed
        return drafts

    def update(self, kept: int, drafted: int) -> None:
        """Keep the cache positions of the kept draft tokens; transformers' heuristic schedule."""
        kept_in_cache = min(kept, self.pending)
        self.fed += kept_in_cache
        self.cache.length = self.fed
        if self.schedule != "constant" and drafted:
            self.num_tokens = self.num_tokens + 2 if kept == drafted else max(1, self.num_tokens - 1)


def generate_tokens(session: OnnxSession, prompt: list[int], settings: GenerationSettings, *,
                    eos_id: int | tuple[int, ...], drafter: PromptLookup | Assistant, rng=None,
                    stopped: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
                    watch: Callable[..., None] | None = None,
                    stats: SpeculationStats | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """generator.generate_tokens for one row (one prompt, num_return_sequences 1), with drafts checked in one run.

    Yields (next token [1], live [1]) token by token, exactly as the plain loop does, with the same `stopped`
    and `watch` calls (watch sees the raw logits of the position the token was picked at). `stats` (optional)
    counts the runs, drafted and kept tokens. To stop early, stop iterating.
    """
    stats = SpeculationStats() if stats is None else stats
    if settings.max_new_tokens == 0:
        return
    width = len(prompt)
    ids = np.full(width + settings.max_new_tokens, first_eos(eos_id), np.int64)  # every token, filled in as they come
    ids[:width] = prompt
    mask = np.ones((1, len(ids)), np.int64)  # one row: no padding
    cache = session.empty_cache(1, capacity=min(len(ids), session.config.n_positions))
    logits, cache = session.run(ids[None, :width], mask[:, :width], np.arange(width)[None], cache, logits_for="last",
                                reuse_logits=True)
    live = np.ones(1, dtype=bool)  # never changed: the row ends by returning
    drafts: list[int] = []
    now = width  # tokens so far
    while True:
        # pick the tokens position by position, as the plain loop does, while they agree with the draft
        for i in range(len(drafts) + 1):
            step = now - width
            raw = logits[:, i, :]
            next_ids, scores = pick(raw, ids[None, :now], step, settings, rng, eos_id=eos_id)
            if watch is not None:
                watch(raw, next_ids, live, scores)
            yield next_ids, live
            token = int(next_ids[0])
            ids[now] = token
            now += 1
            ended = ended_rows(next_ids, live, settings, eos_id=eos_id, stopped=stopped)
            if ended is not None and ended[0]:
                return
            if now - width == settings.max_new_tokens:
                return
            if i == len(drafts) or token != drafts[i]:
                break
        # i drafts kept: the cache holds the positions up to the last kept one (the new token is fed next)
        cache.length = now - 1
        stats.drafted += len(drafts)
        stats.accepted += i
        drafter.update(i, len(drafts))
        # the next draft: a run of k + 1 positions gives at most k + 1 new tokens
        limit = settings.max_new_tokens - (now - width) - 1
        drafts = _draft(drafter, ids[:now], limit, now - width, eos_id, settings.ignore_eos)
        feed = np.array([[ids[now - 1], *drafts]], np.int64)
        total = now + len(drafts)
        logits, cache = session.run(feed, mask[:, :total], np.arange(now - 1, total)[None], cache,
                                    logits_for=len(drafts) + 1, reuse_logits=True)
        stats.runs += 1


def _draft(drafter: PromptLookup | Assistant, ids: np.ndarray, limit: int, new_tokens: int,
           eos_id: int | tuple[int, ...], ignore_eos: bool) -> list[int]:
    """The drafter's guess, cut before an end token (which would end the row: nothing to gain after it)."""
    if limit <= 0:
        return []
    drafts = drafter.propose(ids, limit, new_tokens)
    ended = ended_by_eos(np.array(drafts, np.int64), eos_id, ignore_eos=ignore_eos)
    at = np.flatnonzero(ended) if ended is not None else ()
    return drafts[:at[0]] if len(at) else drafts
