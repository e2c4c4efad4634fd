"""Continuous batching: one scheduler thread runs the rows of many requests as one batch, a token per step.

    engine = Engine(gpt2onnx.load("out/random-gpt2"))
    request = engine.submit(ids, GenerationSettings(do_sample=True, seed=7, max_new_tokens=64))
    for event in request.events():          # or `async for event in request.aevents()`
        print(event.text, end="")
    engine.close()

A request joins the running batch as soon as its rows fit: its prompt is prefilled alone (batch 1: the graph
takes several new positions after a past only at batch 1), the joining prompts sharing a budget of
prompt tokens per step (about one decode step's time, measured; `prefill_chunk` at most; a burst of fresh
prompts joins in one run, see `fresh_group`), shortest rest first
(a long prompt never stalls the others for long, and a short one never waits behind it); then its rows (one
per return sequence, sharing the prompt's cache) are right-aligned with the running rows in one cache (left
padding, hidden by the attention mask; every row has its own position ids). It leaves as soon as all its rows
are done or it is cancelled. Each request keeps its own settings, history and random generator and is
sampled by the same `sampling.sample` call as in `generator.generate_tokens`. At fp32 a seeded request gave the
tokens of `model.generate(prompt, seed=...)` alone in every measurement, whatever else was in the batch, but its
logits are not bit for bit generate's: left padding moves them by rounding (~2e-6), which can flip a near-tie. At
int8 and int4 they move further: int8's activation scale is taken over all the rows of a run and int4's kernel
changes with the row count, and a sixth to a half of 64-token sequences differ
(benchmarks/results/2026-12-08-batch-invariance.md). `EngineOptions(batch_invariant=True)` gives generate's
tokens at every precision: each request runs as generate runs it, its prompt whole in a run of its own and its
rows in a run of their own every step, at the cost of the batch's shared weight reads.

Logprobs are of the model's RAW distribution (before logit_bias, penalties, temperature, top-k, top-p), as
OpenAI and vLLM report them.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

from ..errors import Gpt2OnnxError, InvalidArgumentError
from ..format.gpt2 import position_ids
from ..runtime import limits
from ..runtime.kv_cache import KVCache
from ..text.stopping import (
    EOS,
    LENGTH,
    Deadline,
    ReleasedText,
    StopStringsKept,
    ends_text,
    finish_reason,
    first_eos,
)
from .generator import left_pad, pick
from .logprobs import TopLogprobs, check_top, chosen
from .seeding import random_for
from .settings import GenerationSettings, check_token_ids

if TYPE_CHECKING:
    from .model import Model

CANCELLED, ERROR = "cancelled", "error"
REJECTED = "rejected"  # still queued when reject_waiting() was called: never started
_log = logging.getLogger(__name__)
_BURST_CHUNKS = 4  # a burst of fresh prompts joins in one run of up to this many prefill_chunks (fresh_group)


class QueueFullError(Gpt2OnnxError):
    """The engine's waiting queue is full (max_queue): the request was not accepted."""


class EngineClosedError(Gpt2OnnxError):
    """The engine no longer accepts requests: it is closing, closed, or its scheduler stopped on an error."""


class EngineTimeoutError(Gpt2OnnxError, TimeoutError):
    """No event arrived within the timeout given to Request.events()."""


@dataclass(frozen=True)
class EngineOptions:
    """How much the engine runs at once."""

    max_batch: int = 16  # rows (sequences) in the running batch at once
    max_queue: int = 64  # requests waiting to join; submit() beyond raises QueueFullError
    # the most prompt tokens prefilled per scheduler step (a long prompt never freezes the batch; why 64:
    # benchmarks/results/2026-12-01-serving.md). Each step prefills fewer when the measured cost says so: about
    # one decode step's time of prompt while rows decode, two batch-1 steps' time while none does. A burst of fresh
    # prompts (more than the running rows) may take _BURST_CHUNKS times this in one run (fresh_group)
    prefill_chunk: int = 64
    # every request's tokens equal model.generate(prompt, same settings and seed) alone, at every precision: its
    # prompt prefilled whole in a run of its own, its rows decoded in a run of their own (one run per request per
    # step: the batch no longer shares a weight read; the cost: benchmarks/results/2026-12-08-batch-invariance.md)
    batch_invariant: bool = False
    on_step: Callable[[int], None] | None = None  # called after each decode step with the batch's rows (metrics)

    def __post_init__(self):
        for name in ("max_batch", "max_queue", "prefill_chunk"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidArgumentError(f"{name} must be an integer >= 1, got {value!r}",
                                           hint=f"e.g. {name}={getattr(EngineOptions, name)} (the default)")
        if not isinstance(self.batch_invariant, bool):
            raise InvalidArgumentError(f"batch_invariant must be True or False, got {self.batch_invariant!r}",
                                       hint="batch_invariant=True gives every request generate()'s tokens alone")


@dataclass(frozen=True)
class Event:
    """One new token of one row (a request of n rows yields up to n events per step)."""

    row: int  # 0 .. n-1
    token_id: int | None  # None only on a final event that carries no token (cancelled, error, max_new_tokens=0)
    text: str  # text this token releases ("" while a partial character or possible stop string is held back)
    logprob: float | None  # raw-distribution log-probability of the token (when logprobs was asked)
    top_logprobs: TopLogprobs | None  # the k likeliest (token id, logprob) of the raw distribution (logprobs=k)
    finish_reason: str | None  # on a row's last event: "eos", "stop", "length", "cancelled", "error" or "rejected"


@dataclass(frozen=True)
class RowResult:
    """The whole of one row, once its request is done (the texts of its events joined)."""

    row: int
    text: str  # new text, cut before any stop string
    token_ids: list[int]  # as Generation.token_ids (ending with the end token when finish_reason is "eos")
    finish_reason: str
    logprobs: list[tuple[float, TopLogprobs | None]] | None  # per token, when logprobs was asked


@dataclass(frozen=True)
class EngineStats:
    running_requests: int  # requests with rows in the batch
    running_rows: int
    prefilling: int  # requests whose prompt is being prefilled
    waiting: int  # requests in the queue
    steps: int  # decode steps run so far
    tokens: int  # tokens generated so far (all rows)
    prompt_tokens: int  # prompt tokens prefilled so far
    rejected: int  # submits refused because the queue was full
    alive: bool  # False once the scheduler thread has stopped on an error


class EngineRequest(Protocol):
    """What a client of the engine reads of a submitted request (Request is the engine's own)."""

    seed: int | None  # the seed that reproduces it (None for greedy)
    error: str | None  # the message when it ended with finish_reason "error"
    prompt_logprobs: list | None  # with echo_logprobs: (logprob, top list) per prompt token

    def aevents(self) -> AsyncIterator[Event]: ...

    def cancel(self) -> None: ...


class EngineClient(Protocol):
    """What the HTTP server (serving/server.py) and the Ray replica need of an engine: Engine is the one, a test
    may stand in another."""

    model: Model
    options: EngineOptions

    @property
    def alive(self) -> bool: ...

    def submit(self, prompt_ids: list[int], settings: GenerationSettings, *, logprobs: int | None = None,
               echo_logprobs: bool = False) -> EngineRequest: ...

    def stats(self) -> EngineStats | None: ...

    def close(self, *, drain: bool = True, timeout: float | None = None) -> None: ...

    def reject_waiting(self) -> int: ...


class Request:
    """A submitted request: read its events (or wait for its result) and cancel it, from any thread.

    Read the events once, with one consumer: events() in a thread or aevents() in an event loop.
    """

    def __init__(self, engine: Engine, prompt_ids: list[int], settings: GenerationSettings, seed: int | None, rng,
                 logprobs: int | None, echo_logprobs: bool):
        self.id = uuid.uuid4().hex
        self.prompt_ids = prompt_ids
        self.settings = settings
        self.seed = seed  # the seed that reproduces this request (None for greedy)
        # max_time counts from the submission, as transformers' counts from the generate call
        self.deadline = Deadline(settings.max_time) if settings.max_time is not None else None
        self.rows = settings.num_return_sequences
        self.logprobs, self.echo_logprobs = logprobs, echo_logprobs
        # prompt logprobs (echo_logprobs=True): (logprob, top list) per prompt token, (None, None) for the first
        self.prompt_logprobs: list[tuple[float | None, TopLogprobs | None]] | None = None
        self.error: str | None = None  # the message when the request ended with finish_reason "error"
        self._engine, self._rng = engine, rng
        self._cancelled = threading.Event()
        self._done = threading.Event()
        self._cond = threading.Condition()
        self._events: collections.deque[Event] = collections.deque()
        self._open_rows = self.rows  # rows whose final event the consumer has not taken yet
        self._wakers: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self._results: list[RowResult] | None = None

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    @property
    def done(self) -> bool:
        """Every row has its final event (the consumer may not have read them yet)."""
        return self._done.is_set()

    def cancel(self) -> None:
        """Stop the request: its rows leave the batch at the next step, each with a "cancelled" final event."""
        self._cancelled.set()
        self._engine._wake()

    def events(self, timeout: float | None = None) -> Iterator[Event]:
        """The events as they come, until every row's final event (blocking; for threads).
        timeout: seconds to wait for each event; EngineTimeoutError beyond."""
        while self._open_rows:
            with self._cond:
                if not self._cond.wait_for(lambda: self._events, timeout):
                    raise EngineTimeoutError(f"no event from request {self.id} within {timeout} s",
                                             hint="the engine may be overloaded; see Engine.stats()")
                event = self._events.popleft()
            if event.finish_reason is not None:
                self._open_rows -= 1
            yield event

    async def aevents(self) -> AsyncIterator[Event]:
        """The events as they come, for asyncio (the scheduler wakes this loop with call_soon_threadsafe)."""
        loop, wake = asyncio.get_running_loop(), asyncio.Event()
        with self._cond:
            self._wakers.append((loop, wake))
        try:
            while self._open_rows:
                with self._cond:
                    batch = list(self._events)
                    self._events.clear()
                    if not batch:
                        wake.clear()  # a later _emit sets it again
                if not batch:
                    await wake.wait()
                for event in batch:
                    if event.finish_reason is not None:
                        self._open_rows -= 1
                    yield event
        finally:
            with self._cond:
                self._wakers.remove((loop, wake))

    def result(self, timeout: float | None = None) -> list[RowResult]:
        """Wait until the request is done; one RowResult per row (independent of reading the events)."""
        if not self._done.wait(timeout):
            raise EngineTimeoutError(f"request {self.id} did not finish within {timeout} s",
                                     hint="the engine may be overloaded; see Engine.stats()")
        return self._results

    def _emit(self, events: list[Event], results: list[RowResult] | None = None) -> None:
        """Scheduler side: hand over new events (and the results when the request is done)."""
        with self._cond:
            self._events.extend(events)
            if results is not None:
                self._results = results
                self._done.set()
            self._cond.notify_all()
            wakers = list(self._wakers)
        for loop, wake in wakers:
            try:
                loop.call_soon_threadsafe(wake.set)
            except RuntimeError:  # the consumer's loop is closed: nobody is listening
                pass


class _Active:
    """Scheduler side of a request: its rows' history, random generator and text, one step at a time."""

    def __init__(self, request: Request, eos_id: int | tuple[int, ...], decode, token_text):
        s = request.settings
        self.request, self.settings, self.eos_id, self.pad = request, s, eos_id, first_eos(eos_id)
        n, p = request.rows, len(request.prompt_ids)
        # every row's tokens so far, no padding: the sequences transformers' processors see in generate()
        self.history = np.full((n, p + s.max_new_tokens), self.pad, np.int64)
        self.history[:, :p] = request.prompt_ids
        self.now, self.step = p, 0  # tokens in the history, new tokens so far
        self.live = np.ones(n, dtype=bool)
        self.texts = [ReleasedText(s.stop, decode) for _ in range(n)]
        # transformers' stop_strings: the row ends with (and keeps) the token that completes one
        self.kept = StopStringsKept(s.stop_strings, token_text, [request.prompt_ids] * n) if s.stop_strings else None
        self.reasons: list[str | None] = [None] * n
        self.values: list[list] | None = [[] for _ in range(n)] if request.logprobs is not None else None
        self.rows = np.zeros(0, np.int64)  # its rows' indices in the running batch
        self.cache: tuple[KVCache, int] | None = None  # its prompt's past (cache, row) until it joins the batch
        self.past: KVCache | None = None  # batch_invariant: its rows' own cache once running, laid out as generate's

    @property
    def done(self) -> bool:
        return all(r is not None for r in self.reasons)

    def remaining(self) -> int:
        return self.settings.max_new_tokens - self.step

    def pick(self, logits: np.ndarray) -> int:
        """One step of generator.generate_tokens for this request's rows: sample from `logits` [n, vocab],
        emit the live rows' events, end rows at EOS, a stop string or max_new_tokens."""
        s = self.settings  # the same pick as generate's
        next_ids, _ = pick(logits, self.history[:, :self.now], self.step, s, self.request._rng, eos_id=self.eos_id)
        next_ids = np.where(self.live, next_ids, self.pad)  # finished rows are padded with (the first) EOS
        live = np.flatnonzero(self.live).tolist()
        # transformers' stop_strings and max_time end rows too (reasons: stop and length)
        completed = self.kept.update(next_ids, self.live) if self.kept is not None else None
        timed_out = self.request.deadline.update(next_ids, self.live) if self.request.deadline is not None else None
        last = self.step + 1 == s.max_new_tokens
        values = chosen(logits[live], next_ids[live], self.request.logprobs) if self.values is not None else None
        events = []
        for i, row in enumerate(live):
            token = int(next_ids[row])
            logprob, alternatives = values[i] if values is not None else (None, None)
            if values is not None:
                self.values[row].append(values[i])
            # the row ends at an end token (not part of the text), a stop string, or max_new_tokens
            text, reason = self.texts[row], None
            by_eos = ends_text(token, self.eos_id, ignore_eos=s.ignore_eos)
            piece = "" if by_eos else text.add(token)
            kept = completed is not None and bool(completed[row])
            if by_eos or text.hit or kept or last or (timed_out is not None and timed_out[row]):
                piece += text.finish()
                reason = self.reasons[row] = finish_reason(by_eos=by_eos, stop_cut=text.hit, stop_kept=kept)
                self.live[row] = False
            events.append(Event(row, token, piece, logprob, alternatives, reason))
        self.history[:, self.now] = next_ids
        self.now, self.step = self.now + 1, self.step + 1
        if last:
            self.live[:] = False
        self._emit(events)
        return len(events)

    def end(self, reason: str, message: str | None = None) -> None:
        """Every unfinished row ends now (cancelled, error, or max_new_tokens=0) with a final event."""
        if message is not None:
            self.request.error = message
        events = []
        for row in range(len(self.reasons)):
            if self.reasons[row] is None:
                rest = self.texts[row].finish()
                self.reasons[row] = reason
                events.append(Event(row, None, rest, None, None, reason))
        self.live[:] = False
        self._emit(events)

    def _emit(self, events: list[Event]) -> None:
        results = None
        if self.done:
            values = self.values or [None] * len(self.reasons)
            results = [RowResult(row, text.text, self._row_ids(row), reason, values[row])
                       for row, (text, reason) in enumerate(zip(self.texts, self.reasons))]
        self.request._emit(events, results)

    def _row_ids(self, row: int) -> list[int]:
        ids = self.texts[row].tokens  # every new token but an ending EOS, which the history holds after them
        return ids + [int(self.history[row, len(self.request.prompt_ids) + len(ids)])] \
            if self.reasons[row] == EOS else list(ids)


class _Joining:
    """A request whose prompt is being prefilled: chunk by chunk in a batch-1 cache of its own, or whole, as
    one row of a batch of fresh short prompts, or (batch_invariant) whole in a batch-1 run of its own."""

    def __init__(self, active: _Active, cache: KVCache):
        self.active, self.cache, self.row = active, cache, 0  # its prompt's past: self.cache's row self.row
        self.done = 0  # prompt tokens prefilled
        self.last_logits: np.ndarray | None = None  # [1, vocab] at the last prefilled position
        self.prompt_logprobs: list = [(None, None)]


class Engine:
    """Runs submitted requests with continuous batching on one scheduler thread (see the module docstring).

    Use it as a context manager, or call close(): the thread stops when the engine is closed.
    """

    def __init__(self, model, options: EngineOptions | None = None):
        self.model = model
        self.options = options or EngineOptions()
        self._session, self._eos = model.session, model.eos_token_id  # the (first) end token pads prompts
        self._lock = threading.Condition()
        self._waiting: collections.deque[Request] = collections.deque()  # guarded by _lock
        self._closing = self._cancel_all = False
        self._failure: str | None = None
        self._stats = dict(steps=0, tokens=0, prompt_tokens=0, rejected=0)
        # owned by the scheduler thread
        self._running: list[_Active] = []
        self._joining: list[_Joining] = []  # admitted, prompt being prefilled (their rows are reserved)
        # between the steps that own them: popped from the queue but not yet joining, and prefilled but not yet
        # running (a failure in between must still end them: _die)
        self._admitting: list[Request] = []
        self._landing: list[_Active] = []
        self._cache: KVCache | None = None  # the running rows' past, right-aligned
        self._pad = np.zeros(0, np.int64)  # per running row: leading padding positions in the cache
        self._logits: np.ndarray | None = None  # [rows, vocab] of the last decode step
        # measured costs, for the prefill budget: seconds of a decode step by rows, seconds per prefilled token
        self._decode_seconds: dict[int, float] = {}
        self._token_seconds: float | None = None
        cores = limits.usable_cpus()
        self._pickers = ThreadPoolExecutor(min(cores, 4), thread_name_prefix="gpt2onnx-pick") if cores > 1 else None
        self._thread = threading.Thread(target=self._loop, name="gpt2onnx-engine", daemon=True)
        self._thread.start()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def alive(self) -> bool:
        """False once the scheduler thread has stopped on an error (every pending request then ended "error")."""
        return self._failure is None and (self._thread.is_alive() or self._closing)

    def submit(self, prompt_ids: list[int], settings: GenerationSettings, *, logprobs: int | None = None,
               echo_logprobs: bool = False) -> Request:
        """Queue a request; it joins the running batch as soon as its rows fit. Thread-safe.

        prompt_ids: the prompt's token ids (at least one; prompt + max_new_tokens within n_positions).
        settings: as for Model.generate (OpenAI's logit_bias and penalties among them); seed None draws a
            fresh seed, reported as Request.seed.
        logprobs: k >= 0 puts each token's logprob and its k likeliest alternatives on the events (raw
            distribution: before logit_bias, penalties, temperature, top-k, top-p); None: no logprobs.
        echo_logprobs: compute Request.prompt_logprobs (set before the first event).
        Raises QueueFullError when max_queue requests wait, EngineClosedError once closing or stopped,
        InvalidArgumentError for a bad prompt or option.
        """
        self._check(prompt_ids, settings, logprobs)
        seed, rng = random_for(settings)
        request = Request(self, list(prompt_ids), settings, seed, rng, logprobs, bool(echo_logprobs))
        with self._lock:
            if self._failure is not None:
                raise EngineClosedError(f"the engine stopped on an error: {self._failure}",
                                        hint="load the model into a new Engine")
            if self._closing:
                raise EngineClosedError("the engine is closing and accepts no new requests",
                                        hint="submit to a new Engine")
            if len(self._waiting) >= self.options.max_queue:
                self._stats["rejected"] += 1
                raise QueueFullError(f"{len(self._waiting)} requests are already waiting (max_queue="
                                     f"{self.options.max_queue})", hint="retry after a moment, or raise max_queue")
            self._waiting.append(request)
            self._lock.notify_all()
        return request

    def reject_waiting(self) -> int:
        """Accept no more requests and end those still waiting in the queue at once, each row with a final
        "rejected" event (they never started: a server's drain answers them 503, to be retried elsewhere);
        the running ones go on. Returns how many were ended; close() then finishes the rest."""
        with self._lock:
            self._closing = True
            waiting = list(self._waiting)
            self._waiting.clear()
            self._lock.notify_all()
        for request in waiting:  # out of the queue: the scheduler no longer sees them
            self._active(request).end(REJECTED)
        return len(waiting)

    def stats(self) -> EngineStats:
        with self._lock:
            return EngineStats(running_requests=len(self._running), running_rows=len(self._pad),
                               prefilling=len(self._joining), waiting=len(self._waiting),
                               alive=self.alive, **self._stats)

    def close(self, *, drain: bool = True, timeout: float | None = None) -> None:
        """Accept no more requests; finish the accepted ones (drain) or cancel them; stop the thread.
        timeout: with drain, seconds to wait before the rest is cancelled."""
        with self._lock:
            self._closing = True
            self._cancel_all |= not drain
            self._lock.notify_all()
        self._thread.join(timeout)
        if self._thread.is_alive():
            with self._lock:
                self._cancel_all = True
                self._lock.notify_all()
            self._thread.join()

    # --- the scheduler thread -------------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            while True:
                with self._lock:
                    self._lock.wait_for(lambda: self._running or self._joining or self._waiting or self._closing)
                    if not (self._running or self._joining or self._waiting):
                        return  # closing, and nothing left to do
                self._step()
        except BaseException as error:  # never leave a consumer waiting: every request ends with "error"
            _log.exception("the engine's scheduler stopped")
            self._die(f"{type(error).__name__}: {error}")
        finally:
            if self._pickers is not None:
                self._pickers.shutdown(wait=False)

    def _step(self) -> None:
        """One step of the running batch."""
        # 1. cancelled requests (all of them when closing without drain) end now; waiting ones leave the queue
        self._sweep_cancelled()
        # 2. every running request picks its rows' next tokens from the last decode step's logits, with its
        #    own settings, history and random generator (a failure ends that request only). Requests are
        #    independent, and most of a sampled pick is numpy work that releases the GIL (drawing 100,000
        #    random words per row, the softmax), so they pick on as many threads as there are cores: the
        #    cores ONNX Runtime used for the decode step are free meanwhile
        picking = [a for a in self._running if not a.done]
        if len(picking) > 1 and self._pickers is not None:
            picks = [self._pickers.submit(self._pick, a, self._logits[a.rows]) for a in picking]
            wait(picks)  # all of them, before a failure (re-raised here) stops the scheduler
            for pick in picks:
                pick.result()
        else:
            for active in picking:
                self._pick(active, self._logits[active.rows])
        # 3. admit waiting requests while their rows fit; prefill joining prompts, shortest rest first, up to
        #    the step's budget in all (_prefill_budget); a complete prompt picks its first tokens and joins the batch
        self._admit()
        newcomers = self._prefill()
        # 4. on any change of membership: one new cache with the rows that stay and the newcomers',
        #    right-aligned, without the leading columns that are padding in every row
        if newcomers or any(a.done for a in self._running):
            self._regroup(newcomers)
        # 5. one decode step for every row: feed the tokens just picked, each row at its own position
        if self._running:
            self._decode()

    def _sweep_cancelled(self) -> None:
        everyone = self._cancel_all
        with self._lock:
            gone = [r for r in self._waiting if everyone or r.cancelled]
            for request in gone:
                self._waiting.remove(request)
        for request in gone:
            self._active(request).end(CANCELLED)
        for joining in [j for j in self._joining if everyone or j.active.request.cancelled]:
            joining.active.end(CANCELLED)
            self._joining.remove(joining)
        for active in self._running:
            if not active.done and (everyone or active.request.cancelled):
                active.end(CANCELLED)

    def _admit(self) -> None:
        """Waiting requests start their prefill, first come first served, while their rows fit in max_batch."""
        with self._lock:
            rows = (sum(a.request.rows for a in self._running if not a.done)
                    + sum(j.active.request.rows for j in self._joining))
            admitted = []
            while self._waiting and rows + self._waiting[0].rows <= self.options.max_batch:
                admitted.append(self._waiting.popleft())
                rows += admitted[-1].rows
            self._admitting = admitted
        while self._admitting:
            request = self._admitting[0]
            active = self._active(request)
            if request.settings.max_new_tokens == 0 and not request.echo_logprobs:
                active.end(LENGTH)  # nothing to compute
            else:
                # batch_invariant: room for the whole generation up front, as generate makes it
                room = request.settings.max_new_tokens if self.options.batch_invariant else 0
                self._joining.append(_Joining(active, self._session.empty_cache(
                    1, capacity=len(request.prompt_ids) + room)))
            self._admitting.pop(0)

    def _prefill(self) -> list[_Active]:
        """One chunk of each joining prompt, the shortest rest first, the step's budget in all (a short
        prompt never waits behind a long one). Returns the requests whose prompt is complete, first tokens
        picked and rows still live."""
        if self.options.batch_invariant:
            return self._prefill_alone()
        budget, newcomers = self._prefill_budget(), self._landing
        order = sorted(self._joining, key=lambda j: len(j.active.request.prompt_ids) - j.done)
        # fresh prompts that fit whole go together, as one left-padded batch from an empty past (a burst of
        # clients costs one run, not one run each)
        fresh = [j for j in order if j.done == 0 and not j.active.request.echo_logprobs]
        together = fresh_group([len(j.active.request.prompt_ids) for j in fresh], budget, running=len(self._pad),
                               burst=_BURST_CHUNKS * self.options.prefill_chunk)
        group = fresh[:together]
        if group:
            budget -= self._prefill_together(group)
        for joining in order:
            if joining not in group:
                if budget <= 0:
                    continue
                budget -= self._prefill_chunk(joining, budget)
            if joining.done < len(joining.active.request.prompt_ids):
                continue
            self._prompt_in(joining, newcomers)
        return newcomers

    def _prompt_in(self, joining: _Joining, newcomers: list[_Active]) -> None:
        """The prompt is in: its rows share its cache and pick their first tokens from its last logits; those still
        live are added to `newcomers`."""
        self._joining.remove(joining)
        active, request = joining.active, joining.active.request
        if request.echo_logprobs:
            request.prompt_logprobs = joining.prompt_logprobs
        if request.settings.max_new_tokens == 0:
            active.end(LENGTH)
            return
        active.cache = (joining.cache, joining.row)
        self._pick(active, np.repeat(joining.last_logits, request.rows, axis=0))
        if not active.done:
            newcomers.append(active)

    def _prefill_alone(self) -> list[_Active]:
        """batch_invariant: whole prompts, the shortest first, each in a run of its own as generate runs it (batch
        1 from an empty past, no chunks, no other prompt beside it: int8's activation scale is taken over a run's
        rows, int4's kernels change with them, a chunk attends to an int8 past where a whole prompt attends in
        float32, and left padding moves even fp32 logits by ~2e-6); at least one a step, more while they fit the
        step's budget. Returns the newcomers, as _prefill."""
        budget, newcomers, spent = self._prefill_budget(), self._landing, 0
        for joining in sorted(self._joining, key=lambda j: len(j.active.request.prompt_ids)):
            length = len(joining.active.request.prompt_ids)
            if spent and spent + length > budget:
                break
            spent += self._prefill_whole(joining)
            self._prompt_in(joining, newcomers)
        return newcomers

    def _prefill_whole(self, joining: _Joining) -> int:
        """Run a joining request's whole prompt in its batch-1 cache, as generate does (only the last position's
        logits); with echo_logprobs, every position's logits first, in a run and a cache of their own (at int8 the
        head's activation scale spans the positions kept, so the last logits of that run are not generate's)."""
        request = joining.active.request
        ids = np.array([request.prompt_ids], np.int64)
        mask, positions = np.ones_like(ids), np.arange(ids.shape[1])[None]
        if request.echo_logprobs:
            logits, _ = self._session.run(ids, mask, positions, self._session.empty_cache(1, capacity=ids.shape[1]),
                                          logits_for="all")
            joining.prompt_logprobs += chosen(logits[0, :-1], request.prompt_ids[1:], request.logprobs)
        if request.settings.max_new_tokens:
            began = time.perf_counter()
            logits, joining.cache = self._session.run(ids, mask, positions, joining.cache, logits_for="last")
            self._measured("prefill", time.perf_counter() - began, ids.shape[1])
            joining.last_logits = logits[:, -1, :].copy()
        joining.done = ids.shape[1]
        with self._lock:
            self._stats["prompt_tokens"] += ids.shape[1]
        return ids.shape[1]

    def _prefill_budget(self) -> int:
        """Prompt tokens to prefill this step: about one decode step's time of the running batch (two batch-1
        steps' time when no row decodes), from the measured costs; prefill_chunk at most, 16 at least (two short
        prompts: a burst of clients joins in a few steps; an int4 step of 16 tokens costs about 4 batch-1 decode
        steps, so a short prompt arriving still waits little)."""
        most = self.options.prefill_chunk
        rows, steps = len(self._pad), self._decode_seconds
        if self._token_seconds is None or not steps:
            return most
        if rows:
            seconds = steps[min(steps, key=lambda r: abs(r - rows))]  # a batch of (about) this many rows
        else:
            seconds = 2 * steps[min(steps)]  # the smallest batch measured: about one row
        return min(most, max(16, int(seconds / self._token_seconds)))

    def _measured(self, kind: str, seconds: float, count: int) -> None:
        """Fold one run's time into the costs (moving averages: the machine's load changes)."""
        if kind == "decode":
            self._decode_seconds[count] = _moving_average(self._decode_seconds.get(count), seconds)
        else:
            self._token_seconds = _moving_average(self._token_seconds, seconds / count)

    def _prefill_together(self, group: list[_Joining]) -> int:
        """Prefill whole fresh prompts as one left-padded batch; each request gets its row of the cache."""
        ids, mask = left_pad([j.active.request.prompt_ids for j in group], self._eos)
        positions = position_ids(mask)
        cache = self._session.empty_cache(len(group), capacity=ids.shape[1])
        start = time.perf_counter()
        logits, cache = self._session.run(ids, mask, positions, cache, logits_for="last")
        self._measured("prefill", time.perf_counter() - start, ids.size)
        for row, joining in enumerate(group):
            joining.cache, joining.row, joining.done = cache, row, len(joining.active.request.prompt_ids)
            joining.last_logits = logits[row:row + 1, -1, :].copy()
        with self._lock:
            self._stats["prompt_tokens"] += int(mask.sum())
        return ids.size

    def _prefill_chunk(self, joining: _Joining, budget: int) -> int:
        """Run the next <= budget prompt tokens of a joining request in its own batch-1 cache."""
        request = joining.active.request
        prompt, start = request.prompt_ids, joining.done
        chunk = prompt[start:start + budget]
        end = start + len(chunk)
        began = time.perf_counter()
        logits, joining.cache = self._session.run(
            np.array([chunk], np.int64), np.ones((1, end), np.int64), np.arange(start, end)[None],
            joining.cache, logits_for="all" if request.echo_logprobs else "last")
        self._measured("prefill", time.perf_counter() - began, len(chunk))
        if request.echo_logprobs:  # the logits at position i predict prompt token i + 1
            predicted = logits[0, :-1] if joining.last_logits is None else \
                np.concatenate([joining.last_logits, logits[0, :-1]])
            joining.prompt_logprobs += chosen(predicted, prompt[max(start, 1):end], request.logprobs)
        joining.last_logits = logits[:, -1, :].copy()
        joining.done = end
        with self._lock:
            self._stats["prompt_tokens"] += len(chunk)
        return len(chunk)

    def _regroup(self, newcomers: list[_Active]) -> None:
        """The batch after rows left and/or newcomers joined. In place when it can be (the rows that leave are
        filled by the last rows, newcomers written into free rows: only those rows are copied; leading padding
        is dropped by moving the rows to the front of their buffers); otherwise one new right-aligned cache
        without the leading columns that are padding in every row."""
        if self.options.batch_invariant:
            self._regroup_alone(newcomers)
            return
        stay = [a for a in self._running if not a.done]
        gone = [a for a in self._running if a.done]
        self._running, self._landing = stay + newcomers, []
        if not self._running:
            self._cache, self._pad = None, np.zeros(0, np.int64)
            return
        cache, width = self._cache, self._cache.length if self._cache is not None else 0
        joining = [(*n.cache, n.request.rows, len(n.request.prompt_ids)) for n in newcomers]  # cache, row, n, length
        leaving = sum(a.request.rows for a in gone)
        room = max(a.remaining() for a in self._running)  # every row gains one position per step, until its end
        lengths = np.concatenate([width - self._pad[a.rows] for a in stay] + [np.full(n, length)
                                                                            for _, _, n, length in joining])
        # leading columns that would be padding in every row (negative: a newcomer's prompt is longer than the
        # batch's past): attention reads them every step, so once they are an eighth of the width, moving every
        # row's past to the front of its buffer is cheaper than keeping them
        trim = width - int(lengths.max())
        shrink = trim if trim >= max(16, width // 8) else 0
        in_place = (stay and trim >= 0 and cache.free_rows + leaving >= sum(n for _, _, n, _ in joining)
                    and width - shrink + room <= cache.capacity)
        if in_place:
            cache, where = cache.drop(np.concatenate([a.rows for a in gone]) if gone else [])
            if shrink:
                cache, width = cache.trim(shrink), width - shrink
            pad = np.empty(cache.batch, np.int64)
            for active in stay:
                pad[where[active.rows]] = self._pad[active.rows] - shrink
                active.rows = where[active.rows]
            self._cache = cache.join([(c, np.full(n, row)) for c, row, n, _ in joining])
            self._pad = np.concatenate([pad] + [np.full(n, width - length) for *_, n, length in joining])
        else:
            parts = ([(cache, np.concatenate([a.rows for a in stay]))] if stay else []) + \
                [(c, np.full(n, row)) for c, row, n, _ in joining]
            width = int(lengths.max())
            # room for every row to the end of its request, twice over: requests arriving in the next steps (a
            # burst of clients comes as a few requests, then the rest) then join in place, their rows copied
            # alone, not all rows rebuilt. Positions never written are never touched (kv_cache._allocate): the
            # room costs address space, not memory
            capacity = min(2 * (width + room), self.model.config.n_positions)
            self._cache = KVCache.gather(parts, width=width, capacity=capacity, rows=self.options.max_batch)
            self._pad = width - lengths
            start = 0
            for active in stay:
                active.rows, start = np.arange(start, start + active.request.rows), start + active.request.rows
        start = self._cache.batch - sum(n.request.rows for n in newcomers)
        for newcomer in newcomers:
            newcomer.rows, start = np.arange(start, start + newcomer.request.rows), start + newcomer.request.rows
            newcomer.cache = None

    def _regroup_alone(self, newcomers: list[_Active]) -> None:
        """batch_invariant: the requests that stay and the newcomers, each with a cache of its own rows alone, as
        generate lays it out (the prompt's batch-1 cache, its row repeated for the return sequences; no padding).
        Rows are numbered in order: they index the step's logits (_decode_alone)."""
        self._running, self._landing = [a for a in self._running if not a.done] + newcomers, []
        for newcomer in newcomers:
            cache, n = newcomer.cache[0], newcomer.request.rows
            newcomer.past, newcomer.cache = cache.repeat_rows(n) if n > 1 else cache, None
        start = 0
        for active in self._running:
            active.rows, start = np.arange(start, start + active.request.rows), start + active.request.rows
        self._pad = np.zeros(start, np.int64)  # no row of a cache of its own is padded

    def _decode(self) -> None:
        if self.options.batch_invariant:
            self._decode_alone()
            return
        ids = np.empty((self._cache.batch, 1), np.int64)
        for active in self._running:
            ids[active.rows, 0] = active.history[:, active.now - 1]
        width = self._cache.length
        mask = (np.arange(width + 1)[None, :] >= self._pad[:, None]).astype(np.int64)
        positions = (width - self._pad)[:, None]
        start = time.perf_counter()
        logits, self._cache = self._session.run(ids, mask, positions, self._cache, logits_for="last",
                                                reuse_logits=True)
        self._measured("decode", time.perf_counter() - start, len(ids))
        self._logits = logits[:, -1, :]
        self._stepped(len(ids))

    def _decode_alone(self) -> None:
        """batch_invariant: one run per request, its rows alone in their own cache and fed as generate feeds them
        (every row at the next position, no padding): generate's logits, bit for bit. Not one shared run even at
        fp32: left padding moves a row's attention sums by a rounding unless it is a multiple of 4 columns."""
        start, logits = time.perf_counter(), []
        for active in self._running:
            n, now = active.request.rows, active.now
            step, active.past = self._session.run(active.history[:, now - 1:now], np.ones((n, now), np.int64),
                                                  np.full((n, 1), now - 1, np.int64), active.past,
                                                  logits_for="last", reuse_logits=True)
            logits.append(step[:, -1, :])
        self._logits = np.concatenate(logits)
        self._measured("decode", time.perf_counter() - start, len(self._logits))
        self._stepped(len(self._logits))

    def _stepped(self, rows: int) -> None:
        """A decode step of `rows` rows is done: count it, tell on_step."""
        with self._lock:
            self._stats["steps"] += 1
        if self.options.on_step is not None:
            try:
                self.options.on_step(rows)
            except Exception:  # a metrics hook must not stop the engine
                _log.exception("EngineOptions.on_step failed")

    def _pick(self, active: _Active, logits: np.ndarray) -> None:
        try:
            tokens = active.pick(logits)
        except Gpt2OnnxError as error:  # this request's own failure (non-finite logits, no token left...)
            active.end(ERROR, str(error))
            return
        with self._lock:
            self._stats["tokens"] += tokens

    def _active(self, request: Request) -> _Active:
        return _Active(request, self.model.eos_id, self.model.tokenizer.decode, self.model.token_text)

    def _die(self, message: str) -> None:
        with self._lock:
            self._failure = message
            waiting = list(self._waiting)
            self._waiting.clear()
        pending = [a for a in self._running if not a.done]
        pending += [j.active for j in self._joining]
        pending += [a for a in self._landing if not a.done]
        pending += [self._active(r) for r in self._admitting + waiting]
        for active in pending:
            try:
                active.end(ERROR, f"the engine stopped: {message}")
            except Exception:  # keep ending the others
                _log.exception("could not end request %s", active.request.id)
        self._running, self._joining, self._cache = [], [], None
        self._admitting, self._landing = [], []

    def _wake(self) -> None:
        with self._lock:
            self._lock.notify_all()

    def _check(self, prompt_ids, settings, logprobs) -> None:
        config = self.model.config
        if not isinstance(settings, GenerationSettings):
            raise InvalidArgumentError(f"settings must be a GenerationSettings, got {type(settings).__name__}")
        if (not isinstance(prompt_ids, (list, tuple)) or not prompt_ids
                or not all(isinstance(t, (int, np.integer)) and 0 <= t < config.vocab_size for t in prompt_ids)):
            raise InvalidArgumentError(f"prompt_ids must be a non-empty list of token ids from 0 to "
                                       f"{config.vocab_size - 1}", hint="encode the text with model.encode_prompt")
        if len(prompt_ids) + settings.max_new_tokens > config.n_positions:
            raise InvalidArgumentError(
                f"the prompt ({len(prompt_ids)} tokens) plus max_new_tokens ({settings.max_new_tokens}) exceeds "
                f"n_positions={config.n_positions}", hint="shorten the prompt or ask for fewer new tokens")
        if settings.num_beams != 1:  # beams reorder a request's rows every step: not a continuous batch's rows
            raise InvalidArgumentError(f"the engine does not run beam search (num_beams={settings.num_beams})",
                                       hint="use Model.generate(..., num_beams=N) for beam search, or num_beams=1")
        if settings.num_return_sequences > self.options.max_batch:
            raise InvalidArgumentError(f"num_return_sequences={settings.num_return_sequences} exceeds the engine's "
                                       f"max_batch={self.options.max_batch}", hint="ask for fewer sequences")
        check_top("logprobs", logprobs, config.vocab_size)
        check_token_ids(settings, config.vocab_size)


def fresh_group(lengths: list[int], budget: int, *, running: int, burst: int) -> int:
    """How many of the fresh prompts (token counts, shortest first) are prefilled together as one left-padded
    batch this step (0: none, each goes alone): as many as fit in `budget` tokens, padding included (rows x the
    longest), when at least two do. A burst -- more fresh prompts than `running` rows, as when clients arrive
    together -- may take up to `burst` tokens: each prefill run costs at least a whole weight read, so joining
    a burst a few prompts per step would stall every running row once per run, and the burst's own first
    tokens wait for all those runs; one run stalls the fewer running rows once."""
    limit = max(budget, burst) if len(lengths) > running else budget
    count = 0
    for length in lengths:  # shortest first: the padded batch costs rows x the longest prompt
        if (count + 1) * length > limit:
            break
        count += 1
    return count if count > 1 else 0


def _moving_average(old: float | None, new: float) -> float:
    """An exponential moving average of measured seconds (the machine's load changes): the new value at first."""
    return new if old is None else 0.7 * old + 0.3 * new
