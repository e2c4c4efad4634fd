"""The continuous-batching engine: every request gives what `model.generate` gives alone, whatever the batch."""

import asyncio
import dataclasses
import threading
import time

import numpy as np
import pytest

from gpt2onnx.errors import InvalidArgumentError
from gpt2onnx.generation import logprobs
from gpt2onnx.generation.engine import Engine, EngineClosedError, EngineOptions, QueueFullError, fresh_group
from gpt2onnx.generation.settings import GenerationSettings
from gpt2onnx.runtime.kv_cache import KVCache

PROMPTS = ["The :substitute command", "fs.readFile(path, options", "In Vim, to", "x",
           "A buffer is the in-memory text of a file. A window is a viewport on a buffer. " * 2]


def alone(model, prompt: str, settings: GenerationSettings, seed=None, logprobs=None) -> list:
    """model.generate with the same settings: a list of Generations (one per row)."""
    options = dataclasses.asdict(settings) | {"stop": list(settings.stop), "seed": seed or settings.seed}
    result = model.generate(prompt, logprobs=logprobs, **options)
    return result if isinstance(result, list) else [result]


def collect(request, timeout=60):
    """Events per row, checking the event contract on the way."""
    rows = [[] for _ in range(request.rows)]
    for event in request.events(timeout=timeout):
        assert not rows[event.row] or rows[event.row][-1].finish_reason is None  # nothing after a final event
        rows[event.row].append(event)
    assert all(r and r[-1].finish_reason for r in rows)
    return rows


def assert_same(model, prompt, request, *, logprobs=None):
    """The request's rows equal model.generate alone: tokens, text, finish reason (and events join to text)."""
    rows = collect(request)
    results = request.result()
    expected = alone(model, prompt, request.settings, request.seed, logprobs)
    differing = 0
    for events, result, generation in zip(rows, results, expected):
        assert "".join(e.text for e in events) == result.text
        assert [e.token_id for e in events if e.token_id is not None] == result.token_ids
        if (result.token_ids, result.text, result.finish_reason) != \
                (generation.token_ids, generation.text, generation.finish_reason):
            differing += 1
            continue
        if logprobs is not None:
            ours = [(e.logprob, e.top_logprobs) for e in events]
            assert len(ours) == len(generation.logprobs)
            for (a, top_a), (b, top_b) in zip(ours, generation.logprobs):
                assert abs(a - b) < 1e-4 and [t for t, _ in top_a] == [t for t, _ in top_b]
    return differing


def counted_regroups(monkeypatch) -> dict:
    """Counts of the batch's cache changes from now on: "in place" (KVCache.join) and "copied" (KVCache.gather)."""
    regroups = {"in place": 0, "copied": 0}
    join, gather = KVCache.join, KVCache.gather.__func__
    monkeypatch.setattr(KVCache, "join", lambda self, parts: regroups.__setitem__("in place", regroups["in place"] + 1)
                        or join(self, parts))
    monkeypatch.setattr(KVCache, "gather", classmethod(lambda cls, parts, **kw: regroups.__setitem__(
        "copied", regroups["copied"] + 1) or gather(cls, parts, **kw)))
    return regroups


def test_alone_equals_generate(trained):
    with Engine(trained) as engine:
        for settings in (GenerationSettings(max_new_tokens=24, do_sample=True, seed=11, top_k=0),
                         GenerationSettings(max_new_tokens=24),
                         GenerationSettings(max_new_tokens=16, do_sample=True, seed=3, num_return_sequences=3,
                                            temperature=0.8, top_p=0.9, repetition_penalty=1.2)):
            request = engine.submit(trained.encode_prompt(PROMPTS[0]), settings, logprobs=2)
            assert assert_same(trained, PROMPTS[0], request, logprobs=2) == 0
        request = engine.submit(trained.encode_prompt(PROMPTS[1]), GenerationSettings(do_sample=True, max_new_tokens=8))
        assert request.seed is not None and assert_same(trained, PROMPTS[1], request) == 0


def test_amid_concurrent_requests_equals_alone(trained, monkeypatch):
    """Requests of different prompt lengths, settings and seeds, joining at different steps, some leaving
    early: each equals model.generate alone (sampled and greedy). Any difference (a near-tie flipped by the
    batch's float rounding) is counted and reported; at fp32 there is none here."""
    jobs = []
    for i in range(14):
        jobs.append((PROMPTS[i % len(PROMPTS)] * (1 + i % 3), GenerationSettings(
            max_new_tokens=8 + 3 * (i % 5), do_sample=i % 4 != 0, seed=100 + i, top_k=(0, 50, 5)[i % 3],
            temperature=(1.0, 0.7)[i % 2], num_return_sequences=1 if i % 4 == 0 else 1 + i % 3,
            repetition_penalty=1.3 if i % 5 == 2 else 1.0, min_new_tokens=4 if i % 6 == 1 else 0,
            stop=("\n",) if i % 7 == 3 else ())))
    target = ("In Vim, to", GenerationSettings(max_new_tokens=30, do_sample=True, seed=7, top_k=0))
    target_greedy = ("fs.readFile(path, options", GenerationSettings(max_new_tokens=30))
    rows_per_step, batched_prefills = [], []
    # the whole prefill_chunk every step, whatever the measured costs: bursts of fresh prompts fit in one step
    monkeypatch.setattr(Engine, "_prefill_budget", lambda self: self.options.prefill_chunk)
    together = Engine._prefill_together
    monkeypatch.setattr(Engine, "_prefill_together", lambda self, group: batched_prefills.append(len(group))
                        or together(self, group))
    regroups = counted_regroups(monkeypatch)
    with Engine(trained, EngineOptions(max_batch=16, prefill_chunk=32, on_step=rows_per_step.append)) as engine:
        submitted = [(p, engine.submit(trained.encode_prompt(p), s), None) for p, s in (target, target_greedy)]
        for i, (prompt, settings) in enumerate(jobs):  # join at different steps
            deadline = time.monotonic() + 1
            while engine.stats().steps < 2 * i and time.monotonic() < deadline:
                time.sleep(0.002)
            for copy in range(1 + 2 * (i % 5 == 1)):  # sometimes a burst: fresh prompts prefilled as one batch
                changed = dataclasses.replace(settings, seed=settings.seed + 1000 * copy)
                submitted.append((prompt, engine.submit(trained.encode_prompt(prompt), changed, logprobs=1), 1))
        differing = [assert_same(trained, p, r, logprobs=k) for p, r, k in submitted]
    rows = sum(r.rows for _, r, _ in submitted)
    print(f"rows differing from generate alone: {sum(differing)} of {rows}; batch sizes seen: "
          f"{min(rows_per_step)}..{max(rows_per_step)} over {len(rows_per_step)} steps; prompts prefilled together: "
          f"{batched_prefills}; batch changes {regroups}")
    assert batched_prefills and regroups["in place"] and regroups["copied"]
    assert max(rows_per_step) > 6 and max(rows_per_step) <= 16
    assert sum(differing) == 0


def test_clients_arriving_one_by_one_join_in_place(trained, monkeypatch):
    """Requests arriving a few steps apart join the running batch in place (only their own rows are copied),
    not each through a rebuild of every row's cache: the first batch's cache has room for more rows and for
    their positions. (Before, each arrival rebuilt the cache: 120 ms a join for 16 rows of GPT-2 small.)"""
    regroups = counted_regroups(monkeypatch)
    settings = GenerationSettings(max_new_tokens=40, do_sample=True, top_k=0, ignore_eos=True)
    submitted = []
    with Engine(trained, EngineOptions(max_batch=8)) as engine:
        for i in range(4):  # each arrives while the others decode, 3 steps after the one before
            deadline = time.monotonic() + 10
            while engine.stats().steps < 3 * i and time.monotonic() < deadline:
                time.sleep(0.002)
            prompt = PROMPTS[i % len(PROMPTS)]
            settings_i = dataclasses.replace(settings, seed=10 + i)
            submitted.append((prompt, engine.submit(trained.encode_prompt(prompt), settings_i)))
        differing = [assert_same(trained, p, r) for p, r in submitted]
    # one cache built for the first request; each later arrival (and departure) changes it in place
    assert regroups["copied"] == 1 and regroups["in place"] >= 3, regroups
    assert sum(differing) == 0


def test_leading_padding_is_dropped_in_place(trained, monkeypatch):
    """When a long prompt's request ends, the columns only it used are padding in every other row: they are
    dropped by moving the rows to the front of their own buffers (KVCache.trim), not by building a new cache;
    the rows that stay go on as if alone."""
    regroups = counted_regroups(monkeypatch)
    trims = []
    trim = KVCache.trim
    monkeypatch.setattr(KVCache, "trim", lambda self, columns: trims.append(columns) or trim(self, columns))
    long_prompt, short_prompt = PROMPTS[4], PROMPTS[3]  # 45 tokens and 1
    submitted = [(long_prompt, GenerationSettings(max_new_tokens=3)),
                 (short_prompt, GenerationSettings(max_new_tokens=12, do_sample=True, top_k=0, seed=3)),
                 (PROMPTS[2], GenerationSettings(max_new_tokens=12))]
    with Engine(trained, EngineOptions(max_batch=4)) as engine:
        requests = [(p, engine.submit(trained.encode_prompt(p), s)) for p, s in submitted]
        differing = [assert_same(trained, p, r) for p, r in requests]
    assert len(trained.encode_prompt(long_prompt)) >= 32 and trims and min(trims) >= 16
    assert regroups["copied"] == 1, regroups  # the one cache the batch started with
    assert sum(differing) == 0


def test_stop_strings_and_max_tokens(trained):
    full = alone(trained, PROMPTS[1], GenerationSettings(max_new_tokens=60))[0]
    stop = full.text[len(full.text) // 2:][:5]
    with Engine(trained) as engine:
        request = engine.submit(trained.encode_prompt(PROMPTS[1]),
                                GenerationSettings(max_new_tokens=60, stop=("never here", stop)))
        assert assert_same(trained, PROMPTS[1], request) == 0
        (result,) = request.result()
        assert result.finish_reason == "stop" and result.text == full.text[:full.text.find(stop)]
        request = engine.submit(trained.encode_prompt(PROMPTS[2]),
                                GenerationSettings(max_new_tokens=5, ignore_eos=True))
        assert assert_same(trained, PROMPTS[2], request) == 0
        assert request.result()[0].finish_reason == "length" and len(request.result()[0].token_ids) == 5


def test_text_pieces_never_split_a_character(trained, monkeypatch):
    from gpt2onnx.generation import generator

    text = " naïve 😀 日本語 ok"
    forced = trained.tokenizer.encode(text)
    assert any("\ufffd" in trained.tokenizer.decode([t]) for t in forced)  # some tokens are partial bytes
    # the same scripted tokens for the engine, then Model.stream: both pick through generator.choose
    steps = iter(forced + forced)
    monkeypatch.setattr(generator, "choose", lambda *a, **k: np.array([next(steps)]))
    with Engine(trained) as engine:
        request = engine.submit(trained.encode_prompt("x"), GenerationSettings(max_new_tokens=len(forced)))
        pieces = [e.text for e in collect(request)[0] if e.text]
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)
    assert pieces == list(trained.stream("x", max_new_tokens=len(forced)))


def test_cancel_frees_rows_within_one_step(trained):
    steps = []
    with Engine(trained, EngineOptions(on_step=steps.append, max_queue=4, max_batch=3)) as engine:
        settings = GenerationSettings(max_new_tokens=500, do_sample=True, seed=1, num_return_sequences=3,
                                      ignore_eos=True)
        request = engine.submit(trained.encode_prompt("x"), settings)
        queued = engine.submit(trained.encode_prompt("y"), GenerationSettings(max_new_tokens=5))
        events = request.events(timeout=30)
        next(events)
        assert engine.stats().waiting == 1
        queued.cancel()
        request.cancel()
        before = len(steps)
        rest = list(events)
        assert {e.finish_reason for e in rest if e.finish_reason} == {"cancelled"}
        assert [e.finish_reason for e in queued.events(timeout=5)] == ["cancelled"]
        deadline = time.monotonic() + 5
        while engine.stats().running_rows and time.monotonic() < deadline:
            time.sleep(0.001)
        stats = engine.stats()
        assert stats.running_rows == 0 and stats.running_requests == 0 and stats.waiting == 0
        assert len(steps) - before <= 1  # at most the step already under way ran its rows
        assert len(request.result()[0].token_ids) < 500


def test_queue_full_and_bad_requests(trained):
    with Engine(trained, EngineOptions(max_batch=2, max_queue=2)) as engine:
        long = GenerationSettings(max_new_tokens=300, ignore_eos=True)
        running = engine.submit(trained.encode_prompt("x"), dataclasses.replace(long, do_sample=True,
                                                                              num_return_sequences=2))
        next(running.events(timeout=30))  # it holds both rows: the next ones wait
        waiting = [engine.submit(trained.encode_prompt("y"), long) for _ in range(2)]
        with pytest.raises(QueueFullError) as error:
            engine.submit(trained.encode_prompt("z"), long)
        assert error.value.hint and engine.stats().rejected == 1 and engine.stats().waiting == 2
        for bad, match in (([], "prompt_ids"), ([trained.config.vocab_size], "prompt_ids"),
                           ([1] * 1000, "n_positions")):
            with pytest.raises(InvalidArgumentError, match=match):
                engine.submit(bad, GenerationSettings(max_new_tokens=100))
        with pytest.raises(InvalidArgumentError, match="max_batch"):
            engine.submit([1], GenerationSettings(do_sample=True, num_return_sequences=3))
        with pytest.raises(InvalidArgumentError, match="logit_bias"):
            engine.submit([1], GenerationSettings(logit_bias={5: 101}))
        with pytest.raises(InvalidArgumentError, match="presence_penalty"):
            engine.submit([1], GenerationSettings(presence_penalty=3))
        with pytest.raises(InvalidArgumentError, match="not tokens of this model"):
            engine.submit([1], GenerationSettings(logit_bias={trained.config.vocab_size: 1}))
        for request in [running, *waiting]:
            request.cancel()
    with pytest.raises(InvalidArgumentError, match="max_batch"):
        EngineOptions(max_batch=0)


def test_long_prompt_is_prefilled_in_chunks_while_others_decode(trained):
    seen = []  # per decode step: (rows in the batch, a prefill under way, tokens so far)
    long_prompt = " ".join(PROMPTS * 12)
    assert len(trained.encode_prompt(long_prompt)) > 250
    engines = []

    def on_step(rows):
        stats = engines[0].stats()
        seen.append((rows, stats.prefilling, stats.tokens))

    with Engine(trained, EngineOptions(prefill_chunk=16, on_step=on_step)) as engine:
        engines.append(engine)
        short = engine.submit(trained.encode_prompt(PROMPTS[0]), GenerationSettings(max_new_tokens=60,
                                                                                   ignore_eos=True))
        while not engine.stats().tokens:  # the short request is decoding
            time.sleep(0.001)
        long = engine.submit(trained.encode_prompt(long_prompt), GenerationSettings(max_new_tokens=10, do_sample=True,
                                                                                   seed=2))
        while not engine.stats().prefilling:
            time.sleep(0.001)
        late = engine.submit(trained.encode_prompt(PROMPTS[3]), GenerationSettings(max_new_tokens=3))
        next(late.events(timeout=30))  # a short prompt does not wait behind the long one
        assert engine.stats().prefilling == 1 and not long.done
        assert assert_same(trained, long_prompt, long) == 0  # chunked prefill gives generate's tokens
        assert assert_same(trained, PROMPTS[0], short) == 0
    during = [tokens for rows, prefilling, tokens in seen if prefilling]
    # the short request got a token at every step of the long prompt's prefill (>= 15 chunks of 16)
    assert len(during) >= 15 and during[-1] - during[0] >= len(during) - 1


def test_close_drains_or_cancels(trained):
    engine = Engine(trained, EngineOptions(max_batch=4))
    settings = GenerationSettings(max_new_tokens=12, do_sample=True, seed=5)
    requests = [engine.submit(trained.encode_prompt(p), settings) for p in PROMPTS[:4] * 2]  # half wait
    engine.close(drain=True)
    assert all(r.done and r.result()[0].finish_reason in ("eos", "length") for r in requests)
    assert assert_same(trained, PROMPTS[3], requests[-1]) == 0
    with pytest.raises(EngineClosedError):
        engine.submit([1], settings)
    engine = Engine(trained, EngineOptions(max_batch=4))
    requests = [engine.submit(trained.encode_prompt(p), GenerationSettings(max_new_tokens=400, ignore_eos=True))
                for p in PROMPTS * 2]
    next(requests[0].events(timeout=30))
    engine.close(drain=False)
    assert all(r.done and r.result()[0].finish_reason == "cancelled" for r in requests)
    assert [e.finish_reason for e in requests[-1].events()] == ["cancelled"]
    assert not engine._thread.is_alive() and engine.alive


def test_submits_from_many_threads(tiny):
    jobs = [(PROMPTS[i % 5], GenerationSettings(max_new_tokens=6 + i % 7, do_sample=i % 2 == 0, seed=i, top_k=0))
            for i in range(24)]
    results, errors = {}, []

    def client(k):
        try:
            for i in range(k, len(jobs), 8):
                prompt, settings = jobs[i]
                request = engine.submit(tiny.encode_prompt(prompt), settings)
                results[i] = (prompt, request, collect(request))
        except Exception as error:  # reported below
            errors.append(error)

    with Engine(tiny, EngineOptions(max_batch=8)) as engine:
        threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors and len(results) == len(jobs)
    for prompt, request, rows in results.values():
        assert [e.token_id for e in rows[0]] == alone(tiny, prompt, request.settings, request.seed)[0].token_ids


def test_asyncio_consumers(tiny):
    async def consume(engine, prompt, seed):
        request = engine.submit(tiny.encode_prompt(prompt), GenerationSettings(max_new_tokens=10, do_sample=True,
                                                                               seed=seed, num_return_sequences=2))
        rows = [[], []]
        async for event in request.aevents():
            rows[event.row].append(event)
        return request, rows

    async def main(engine):
        return await asyncio.gather(*(consume(engine, p, i) for i, p in enumerate(PROMPTS)))

    with Engine(tiny) as engine:
        outcomes = asyncio.run(main(engine))
    for prompt, (request, rows) in zip(PROMPTS, outcomes):
        expected = alone(tiny, prompt, request.settings, request.seed)
        assert ["".join(e.text for e in row) for row in rows] == [g.text for g in expected]
        assert [r.token_ids for r in request.result()] == [g.token_ids for g in expected]


def test_scheduler_failure_ends_every_request_with_error(tiny, monkeypatch):
    engine = Engine(tiny, EngineOptions(max_batch=2))
    armed = threading.Event()  # set once every request is queued: the scheduler fails at its next run after that
    real_run = tiny.session.run

    def failing(*args, **kwargs):
        if armed.is_set():
            raise RuntimeError("injected failure")
        return real_run(*args, **kwargs)

    monkeypatch.setattr(tiny.session, "run", failing)
    ids = [tiny.encode_prompt(p) for p in PROMPTS]
    requests = [engine.submit(i, GenerationSettings(max_new_tokens=50, ignore_eos=True)) for i in ids]
    armed.set()
    for request in requests:  # never hangs: every row gets a final "error" event
        assert [e.finish_reason for e in request.events(timeout=30)][-1] == "error"
        assert "injected failure" in request.error
    assert not engine.alive and not engine.stats().alive
    with pytest.raises(EngineClosedError, match="injected failure"):
        engine.submit([1], GenerationSettings())
    engine.close()


def test_logprobs_echo_and_scoring_only(trained):
    with Engine(trained, EngineOptions(prefill_chunk=4)) as engine:
        for prompt in (PROMPTS[0], PROMPTS[4]):
            ids = trained.encode_prompt(prompt)
            request = engine.submit(ids, GenerationSettings(max_new_tokens=0), echo_logprobs=True, logprobs=2)
            events = list(request.events(timeout=30))
            assert [(e.token_id, e.text, e.finish_reason) for e in events] == [(None, "", "length")]
            score = trained.score(prompt, top_logprobs=2)
            assert request.prompt_logprobs[0] == (None, None) and len(request.prompt_logprobs) == len(ids)
            for (ours, top), expected, expected_top in zip(request.prompt_logprobs[1:], score.token_logprobs[1:],
                                                           score.top_logprobs[1:]):
                assert abs(ours - expected) < 1e-5 and [t for t, _ in top] == [t for t, _ in expected_top]
        request = engine.submit(trained.encode_prompt(PROMPTS[2]), GenerationSettings(max_new_tokens=6),
                                echo_logprobs=True)
        assert assert_same(trained, PROMPTS[2], request) == 0
        assert request.prompt_logprobs[1][1] is None  # no top lists unless logprobs=k


def test_logit_bias_and_penalties_follow_openai(trained):
    """Greedy with OpenAI's logit_bias / frequency / presence penalties equals a plain reference loop."""
    ids = trained.encode_prompt(PROMPTS[1])

    def reference(bias, frequency, presence, steps=10):
        sequence, counts = list(ids), np.zeros(trained.config.vocab_size)
        for _ in range(steps):
            cache = trained.session.empty_cache(1)
            logits, _ = trained.session.run(np.array([sequence]), np.ones((1, len(sequence)), np.int64),
                                            np.arange(len(sequence))[None], cache, logits_for="last")
            scores = logits[0, -1].astype(np.float64) - frequency * counts - presence * (counts > 0)
            for token, value in bias.items():
                scores[token] += value
            token = int(scores.argmax())
            counts[token] += 1
            sequence.append(token)
        return sequence[len(ids):]

    plain = reference({}, 0, 0)
    cases = [({plain[0]: -100}, 0, 0), ({}, 2.0, 0), ({}, 0, 1.5), ({13: 5.0, plain[1]: -3}, 0.5, 0.5)]
    with Engine(trained) as engine:
        for bias, frequency, presence in cases:
            settings = GenerationSettings(max_new_tokens=10, ignore_eos=True, logit_bias=bias,
                                          frequency_penalty=frequency, presence_penalty=presence)
            events = collect(engine.submit(ids, settings, logprobs=0))[0]
            expected = reference(bias, frequency, presence)
            assert [e.token_id for e in events] == expected
            # the library's generate runs the same logits pipeline
            assert trained.generate(PROMPTS[1], max_new_tokens=10, ignore_eos=True, logit_bias=bias,
                                    frequency_penalty=frequency, presence_penalty=presence).token_ids == expected
        # logprobs stay those of the raw distribution, whatever bias picked the token
        (score,) = logprobs.score(trained.session, [ids + [e.token_id for e in events]], pad_id=0,
                                  decode=trained.tokenizer.decode)
        raw = score.token_logprobs[len(ids):]
        assert np.allclose([e.logprob for e in events], raw, atol=1e-4)


def test_kv_cache_row_surgery():
    """gather right-aligns rows of several caches (zeros in front), drop fills holes with the last rows,
    join writes new rows into free rows in place, trim drops leading columns in place; every row keeps its own
    past."""
    rng = np.random.default_rng(0)

    def cache(batch, length):
        return KVCache([rng.normal(size=(batch, 2, length + 3, 4)).astype(np.float32) for _ in range(4)], length)

    def past(c, row):  # a row's past without its leading zeros, per buffer
        return [b[row, :, :c.length] for b in c.buffers]

    a, b = cache(3, 5), cache(1, 2)
    merged = KVCache.gather([(a, np.array([2, 0])), (b, np.array([0, 0]))], width=5, capacity=9, rows=6)
    assert (merged.batch, merged.length, merged.capacity, merged.free_rows) == (4, 5, 9, 2)
    for layer in range(4):
        assert np.array_equal(merged.buffers[layer][0, :, :5], a.buffers[layer][2, :, :5])
        assert np.array_equal(merged.buffers[layer][3, :, 3:5], b.buffers[layer][0, :, :2])
        assert not merged.buffers[layer][2:, :, :3].any()
    expected = {0: past(merged, 0), 3: past(merged, 3)}
    dropped, where = merged.drop([0, 1])
    assert dropped.batch == 2 and where.tolist() == [-1, -1, 0, 1] and dropped.free_rows == 4
    assert all(np.array_equal(x, y) for x, y in zip(past(dropped, 1), expected[3]))
    joined = dropped.join([(a, np.array([1]))])
    assert joined.batch == 3 and joined.buffers[0].base is merged.buffers[0].base  # the same memory
    assert all(np.array_equal(x, y[1, :, :5]) for x, y in zip(past(joined, 2), a.buffers))
    trimmed = KVCache.gather([(joined, np.array([2, 0]))], width=3)  # drops two leading columns
    assert np.array_equal(trimmed.buffers[1][0, :, :3], a.buffers[1][1, :, 2:5])
    # trim drops leading columns in place: every row's last positions move to the front of the same memory
    before = [[b[row, :, 2:5].copy() for b in joined.buffers] for row in range(joined.batch)]
    shorter = joined.trim(2)
    assert (shorter.batch, shorter.length, shorter.free_rows) == (3, 3, 3)
    assert shorter.buffers[0].base is merged.buffers[0].base
    for row in range(3):
        assert all(np.array_equal(x, y) for x, y in zip(past(shorter, row), before[row]))


def _huge_page_kb(array: np.ndarray) -> int | None:
    """AnonHugePages of the memory maps holding `array` (Linux /proc/self/smaps), None where unknown."""
    try:
        lines = open("/proc/self/smaps").read().splitlines()
    except OSError:
        return None
    start, end = array.ctypes.data, array.ctypes.data + array.nbytes
    total, inside = 0, False
    for line in lines:
        head = line.split()[0]
        if "-" in head and ":" not in head:  # a mapping's first line: its address range
            low, high = (int(x, 16) for x in head.split("-"))
            inside = low < end and start < high
        elif inside and head == "AnonHugePages:":
            total += int(line.split()[1])
    return total


def test_cache_buffers_take_small_pages_as_they_are_touched():
    """A cache the server gathers for 16 rows is 160 MB at fp32 (GPT-2 small, 136 positions). numpy asks for
    transparent huge pages for arrays of 4 MiB and more, and then the first write to each 2 MiB region zeroes
    all of it (and may compact memory first): writing the rows' first positions touched every region at once,
    60-240 ms while every running row waited. The cache's buffers are private memory maps instead: zeroed,
    writable, in 4 KiB pages. (Where numpy's own array gets no huge page either, nothing is shown: skipped.)"""
    shape = (16, 12, 136, 64)
    first = KVCache([np.ones((2, 12, 8, 64), np.float32) for _ in range(2)], 8)
    cache = KVCache.gather([(first, np.array([0, 1]))], width=8, capacity=136, rows=16)
    base = cache.buffers[0].base
    assert base.shape == shape and cache.free_rows == 14 and base.flags.writeable
    assert not base[2:].any() and not base[:2, :, 8:].any()  # zeros but the two rows' past
    theirs = np.empty(shape, np.float32)
    for buffer in (base, theirs):
        buffer[:, :, :8] = 1  # every row and head: a write into every 2 MiB region
    ours = _huge_page_kb(base)
    if not _huge_page_kb(theirs):
        pytest.skip("numpy's arrays get no transparent huge pages here: no difference to show")
    assert ours == 0


def test_fresh_prompts_join_together_within_the_budget_or_as_a_burst():
    """Fresh whole prompts (shortest first) are prefilled as one padded batch while rows x the longest fit the
    budget, and only when two or more do; a burst (more fresh prompts than running rows) may use `burst`."""
    assert fresh_group([8, 8, 8], 16, running=4, burst=256) == 2  # 2 x 8 fit; 3 prompts, 4 rows: no burst
    assert fresh_group([8, 8, 8], 16, running=2, burst=256) == 3  # a burst: all three
    assert fresh_group([8] * 16, 16, running=1, burst=64) == 8  # the burst's own limit: 8 x 8
    assert fresh_group([4, 8, 30], 64, running=0, burst=32) == 2  # 3 x 30 > 64: the budget (larger) decides
    assert fresh_group([8, 30], 32, running=0, burst=0) == 0  # one alone is no group
    assert fresh_group([], 64, running=0, burst=256) == 0


def test_prefill_budget_follows_the_measured_costs(tiny):
    """Per step, about one decode step's time of prompt tokens while rows decode, two batch-1 steps' time while
    none does; prefill_chunk before anything is measured, and never more than it nor fewer than 16."""
    with Engine(tiny, EngineOptions(prefill_chunk=64)) as engine:
        assert engine._prefill_budget() == 64  # nothing measured yet
        engine._measured("decode", 0.020, 1)
        engine._measured("decode", 0.045, 16)
        engine._measured("prefill", 0.032, 32)  # 1 ms a token
        assert engine._prefill_budget() == 40  # idle: two batch-1 steps
        engine._pad = np.zeros(16, np.int64)  # 16 rows decode
        assert engine._prefill_budget() == 45
        engine._pad = np.zeros(3, np.int64)  # the nearest batch measured: 1 row
        assert engine._prefill_budget() == 20
        engine._measured("prefill", 0.32, 8)  # much dearer now: the average moves, the floor holds
        assert engine._prefill_budget() == 16
        engine._pad = np.zeros(0, np.int64)
