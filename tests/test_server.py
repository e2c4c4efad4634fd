"""The HTTP server driven by the real `openai` client (sync and async): its answers equal the library's, its
logprobs equal PyTorch's, bad requests get OpenAI's 400 envelope, and the server survives them all."""

import asyncio
import gc
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import uvicorn

import gpt2onnx
from gpt2onnx.generation.engine import Engine, EngineOptions, Event
from gpt2onnx.serving.server import ServerOptions, create_app
from helpers import openai_client, torch_logprobs

NAME = "trained"
PROMPT = "In Vim, to delete a line,"
TOL = 1e-4


# --- servers ------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """uvicorn serving `app` on 127.0.0.1 in a thread of this process."""

    def __init__(self, app):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)


def start_cli(model_dir: Path, *args: str) -> tuple[subprocess.Popen, str]:
    """`python -m gpt2onnx.tools.cli serve MODEL_DIR ARGS` on a free port, once /health says ok."""
    port = free_port()
    root = str(Path(gpt2onnx.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen([sys.executable, "-m", "gpt2onnx", "serve", str(model_dir), "--port", str(port),
                                "--model-name", NAME, "--log-level", "warning", *args],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        assert process.poll() is None, f"the server exited: {process.stdout.read()}"
        assert time.monotonic() < deadline, "the server did not become healthy"
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        time.sleep(0.1)


def stop_cli(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def model(trained_export):
    return gpt2onnx.load(trained_export)


@pytest.fixture(scope="module")
def engine(model):
    engine = Engine(model, EngineOptions(max_batch=16, max_queue=64))
    yield engine
    engine.close(drain=False)


@pytest.fixture(scope="module")
def live(engine):
    with LiveServer(create_app(engine, ServerOptions(model_name=NAME))) as server:
        yield server


@pytest.fixture(scope="module")
def client(live):
    return openai_client(live.url, timeout=60)


@pytest.fixture(scope="module")
def reference(trained_reference):
    return trained_reference


def library(model, prompt, **options):
    """What the library gives for the mapped options (OpenAI defaults: top_k 0, temperature 1)."""
    options.setdefault("top_k", 0)
    return model.generate(prompt, allow_special_tokens=True, **options)


def metric(url: str, name: str, headers=None) -> float:
    text = httpx.get(url + "/metrics", headers=headers or {}).text
    found = re.search(rf"^{name} ([0-9.e+-]+)$", text, re.MULTILINE)
    assert found, f"{name} not in /metrics"
    return float(found.group(1))


# --- answers equal the library's ----------------------------------------------------------------------------


def test_seeded_request_equals_library(client, model):
    answer = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=24, seed=7, temperature=0.9,
                                       top_p=0.95, extra_body={"top_k": 40, "repetition_penalty": 1.1})
    expected = library(model, PROMPT, max_new_tokens=24, seed=7, do_sample=True, temperature=0.9, top_p=0.95,
                       top_k=40, repetition_penalty=1.1)
    assert answer.choices[0].text == expected.text
    openai_reason = {"eos": "stop", "stop": "stop", "length": "length"}
    assert answer.choices[0].finish_reason == openai_reason[expected.finish_reason]
    assert answer.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert answer.usage.completion_tokens == len(expected.token_ids)
    assert answer.model == NAME and answer.object == "text_completion" and answer.id.startswith("cmpl-")
    # OpenAI's defaults (temperature 1, top_p 1, no top-k, 16 tokens), not transformers' (greedy, top_k 50, 20)
    default = client.completions.create(model=NAME, prompt=PROMPT, seed=11)
    assert default.choices[0].text == library(model, PROMPT, max_new_tokens=16, seed=11, do_sample=True).text
    # temperature 0 is greedy; n > 1 greedy gives n copies
    greedy = client.completions.create(model=NAME, prompt=PROMPT, temperature=0, n=3, max_tokens=12)
    text = library(model, PROMPT, max_new_tokens=12, do_sample=False).text
    assert [c.text for c in greedy.choices] == [text] * 3 and [c.index for c in greedy.choices] == [0, 1, 2]


def test_a_drawn_seed_is_reported_and_replays(client, model, live):
    raw = httpx.post(live.url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 10})
    assert raw.status_code == 200 and raw.headers["x-gpt2onnx-replica"]
    seed = int(raw.headers["x-gpt2onnx-seed"])
    assert raw.json()["choices"][0]["text"] == library(model, PROMPT, max_new_tokens=10, seed=seed, do_sample=True).text


async def _stream_and_whole(base_url: str):
    client = openai_client(base_url, asynchronous=True, timeout=60)
    options = dict(model=NAME, prompt=["Once upon a time", "fs.readFile(path"], max_tokens=40, seed=5, n=2,
                   logprobs=2)
    whole = await client.completions.create(**options)
    chunks = [chunk async for chunk in await client.completions.create(
        stream=True, stream_options={"include_usage": True}, **options)]
    await client.close()
    return whole, chunks


def test_stream_chunks_join_to_the_whole_text(live):
    whole, chunks = asyncio.run(_stream_and_whole(live.url))
    texts, reasons, tokens = {}, {}, {}
    for chunk in chunks[:-1]:
        assert len(chunk.choices) == 1 and chunk.usage is None
        choice = chunk.choices[0]
        assert choice.index not in reasons, "nothing after a choice's finish_reason"
        texts[choice.index] = texts.get(choice.index, "") + choice.text
        tokens.setdefault(choice.index, []).extend(choice.logprobs.tokens)
        if choice.finish_reason is not None:
            reasons[choice.index] = choice.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    for choice in whole.choices:
        assert texts[choice.index] == choice.text
        assert reasons[choice.index] == choice.finish_reason
        assert tokens[choice.index] == choice.logprobs.tokens
    assert sorted(texts) == [0, 1, 2, 3]


def test_n3_times_two_prompts_gives_six_choices_in_order(client, model):
    prompts = ["The :substitute command", "A buffer is"]
    answer = client.completions.create(model=NAME, prompt=prompts, n=3, max_tokens=10, seed=3, temperature=1.2)
    assert [c.index for c in answer.choices] == list(range(6))
    for p, prompt in enumerate(prompts):
        expected = library(model, prompt, max_new_tokens=10, seed=3, do_sample=True, temperature=1.2,
                           num_return_sequences=3)
        assert [c.text for c in answer.choices[p * 3:p * 3 + 3]] == [g.text for g in expected]
    # token-id prompts are the same prompts
    ids = [model.tokenizer.encode(p) for p in prompts]
    by_ids = client.completions.create(model=NAME, prompt=ids, n=3, max_tokens=10, seed=3, temperature=1.2)
    assert [c.text for c in by_ids.choices] == [c.text for c in answer.choices]


def test_stop_string_ends_with_finish_reason_stop(client):
    options = dict(model=NAME, prompt=PROMPT, max_tokens=30, temperature=0, extra_body={"ignore_eos": True})
    free = client.completions.create(**options).choices[0].text
    stop = free[12:15]
    cut = free.find(stop)
    stopped = client.completions.create(stop=[stop, "never seen \u2603"], **options).choices[0]
    assert stopped.finish_reason == "stop" and stopped.text == free[:cut]
    streamed = list(client.completions.create(stop=stop, stream=True, **options))
    assert "".join(c.choices[0].text for c in streamed) == free[:cut]
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_logit_bias_forces_a_token(client, model):
    the = model.tokenizer.encode(" the")[0]
    answer = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=5, temperature=0,
                                       logit_bias={str(the): 100})
    assert answer.choices[0].text == " the" * 5


def test_streams_never_split_a_character(tiny_export):
    """Random weights pushed towards the byte tokens that are parts of multi-byte characters: the pieces of
    a stream still join to the whole text, pieces that end inside a character are held back (a chunk with
    text "" for that token)."""
    from gpt2onnx.serving.openai_api import TokenText

    model = gpt2onnx.load(tiny_export)
    names = TokenText(model.tokenizer)
    partial = [i for i in range(model.config.vocab_size) if names(i).startswith("bytes:")]
    assert len(partial) > 50
    options = dict(model=NAME, prompt="Hello", max_tokens=120, seed=0, logprobs=0,
                   logit_bias={str(i): 8 for i in partial}, extra_body={"ignore_eos": True})
    with Engine(model, EngineOptions(max_batch=4)) as engine, \
            LiveServer(create_app(engine, ServerOptions(model_name=NAME))) as server:
        client = openai_client(server.url)
        whole = client.completions.create(**options).choices[0]
        chunks = [c.choices[0] for c in client.completions.create(stream=True, **options)]
        plain = {k: v for k, v in options.items() if k != "logprobs"}
        bare = [c.choices[0] for c in client.completions.create(stream=True, **plain)]
    tokens = [t for c in chunks for t in c.logprobs.tokens]
    assert tokens == whole.logprobs.tokens and sum(t.startswith("bytes:") for t in tokens) > 30
    assert "".join(c.text for c in chunks) == whole.text
    held = [c for c in chunks if c.logprobs.tokens and not c.text]
    assert held, "no piece was held back: the test did not produce a split character"
    # without logprobs too, one chunk per token (every step reaches the client, as in vLLM), "" while held back
    assert len(bare) == len(tokens) == 120 and "".join(c.text for c in bare) == whole.text
    assert [bool(c.text) for c in bare] == [bool(c.text) for c in chunks]
    assert [c.finish_reason for c in bare] == [None] * 119 + ["length"]
    joined = [ch for ch in whole.text if ord(ch) > 0x7F and ch != "\ufffd"]
    print(f"{len(held)} held-back pieces; {len(joined)} multi-byte characters made of several tokens or not")


# --- logprobs equal PyTorch's -------------------------------------------------------------------------------


def test_echo_logprobs_scores_the_prompt_like_pytorch(client, reference):
    _, tokenizer = reference
    text = "The :substitute command replaces text in the buffer, and é is two bytes"
    ids = tokenizer(text).input_ids
    expected = torch_logprobs(reference, ids)
    answer = client.completions.create(model=NAME, prompt=text, echo=True, logprobs=3, max_tokens=0)
    choice = answer.choices[0]
    lp = choice.logprobs
    assert choice.text == text and choice.finish_reason == "length"
    assert answer.usage.prompt_tokens == len(ids) and answer.usage.completion_tokens == 0
    assert len(lp.tokens) == len(ids) and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    worst = 0.0
    for i in range(1, len(ids)):
        row = expected[i - 1]
        worst = max(worst, abs(lp.token_logprobs[i] - row[ids[i]]))
        top3 = sorted(row, reverse=True)[:3]
        given = sorted(lp.top_logprobs[i].values(), reverse=True)
        assert len(lp.top_logprobs[i]) in (3, 4)  # the 3 likeliest, plus the actual token when it is not one
        assert max(abs(a - b) for a, b in zip(given[:3], top3)) < TOL
        assert lp.top_logprobs[i][lp.tokens[i]] == pytest.approx(lp.token_logprobs[i])
    print(f"largest |logprob - torch| over {len(ids) - 1} prompt tokens: {worst:.2e}")
    assert worst < TOL
    assert lp.text_offset == [len(tokenizer.decode(ids[:i])) for i in range(len(ids))]
    assert lp.tokens == [tokenizer.decode([i]) for i in ids]  # every token here is whole UTF-8


def test_generated_logprobs_equal_pytorch(client, reference):
    _, tokenizer = reference
    answer = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=8, temperature=0, logprobs=2,
                                       extra_body={"ignore_eos": True})
    ids = tokenizer(PROMPT).input_ids
    lp = answer.choices[0].logprobs
    for step in range(8):
        row = torch_logprobs(reference, ids)[-1]
        token = int(row.argmax())  # greedy: PyTorch picks the same token
        assert lp.tokens[step] == tokenizer.decode([token])
        assert abs(lp.token_logprobs[step] - row[token]) < TOL
        assert lp.text_offset[step] == len(tokenizer.decode(ids[len(tokenizer(PROMPT).input_ids):]))
        ids.append(token)


# --- batching: the same text alone and among others ---------------------------------------------------------


async def _alone_and_among(base_url: str, model):
    client = openai_client(base_url, asynchronous=True, timeout=120)
    target = dict(model=NAME, prompt="Once upon a time", max_tokens=32, seed=42, temperature=1.0)
    alone = (await client.completions.create(**target)).choices[0].text
    long_prompt = "A window is a viewport on a buffer. " * 30
    others = [dict(model=NAME, prompt=[PROMPT, "x", long_prompt][i % 3], max_tokens=8 + 3 * i, seed=i,
                   temperature=[0, 0.7, 1.3][i % 3], n=1 + i % 2 if i % 3 else 1) for i in range(15)]
    calls = [client.completions.create(**o) for o in others[:7]] + [client.completions.create(**target)] + \
            [client.completions.create(**o) for o in others[7:]]
    results = await asyncio.gather(*calls)
    await client.close()
    return alone, results[7].choices[0].text, results


def test_seeded_request_alone_and_among_15_concurrent_ones(live, model):
    alone, among, results = asyncio.run(_alone_and_among(live.url, model))
    assert among == alone == library(model, "Once upon a time", max_new_tokens=32, seed=42, do_sample=True).text
    assert len(results) == 16 and all(r.choices for r in results)


# --- cancellation -------------------------------------------------------------------------------------------


def test_closing_a_stream_frees_its_rows_within_one_step(client, live, engine):
    stream = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=800, stream=True, seed=1,
                                       extra_body={"ignore_eos": True})
    for _, chunk in zip(range(3), stream):
        pass
    assert metric(live.url, "gpt2onnx_rows_running") == 1
    stream.close()
    closed = time.perf_counter()
    steps_at_close = engine.stats().steps
    while metric(live.url, "gpt2onnx_rows_running") != 0:
        assert time.perf_counter() - closed < 5, "the rows of a closed stream are still running"
        time.sleep(0.002)
    steps = engine.stats().steps - steps_at_close
    print(f"rows freed {1000 * (time.perf_counter() - closed):.0f} ms after close, {steps} decode step(s) later")
    assert steps <= 2  # the step running when the disconnect arrived, then the next sweep drops the rows
    assert metric(live.url, 'gpt2onnx_requests_total{status="cancelled"}') >= 1


def test_a_non_streamed_client_that_hangs_up_cancels_its_work(live, engine):
    with socket.create_connection(("127.0.0.1", live.port)) as sock:
        body = json.dumps({"prompt": PROMPT, "max_tokens": 800, "ignore_eos": True, "seed": 2}).encode()
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        deadline = time.monotonic() + 10
        while engine.stats().running_rows == 0:
            assert time.monotonic() < deadline
            time.sleep(0.005)
    hung_up = time.perf_counter()
    while engine.stats().running_rows:
        assert time.perf_counter() - hung_up < 2, "the work of a client that left is still running"
        time.sleep(0.005)
    assert engine.stats().tokens < 10_000


# --- errors -------------------------------------------------------------------------------------------------


LONG = [464] * 1030
BAD_REQUESTS = [  # (body, param); every one must get a 400 in OpenAI's envelope naming `param`
    ({}, "prompt"),
    ({"prompt": None}, "prompt"),
    ({"prompt": 42}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [1, "a"]}, "prompt"),
    ({"prompt": [[1], []]}, "prompt"),
    ({"prompt": [50257]}, "prompt"),
    ({"prompt": [-1]}, "prompt"),
    ({"prompt": ["a"] * 65}, "prompt"),
    ({"prompt": LONG}, "prompt"),
    ({"prompt": "hi", "max_tokens": 1024}, "max_tokens"),
    ({"prompt": "hi", "max_tokens": -1}, "max_tokens"),
    ({"prompt": "hi", "max_tokens": 1.5}, "max_tokens"),
    ({"prompt": "hi", "max_tokens": "5"}, "max_tokens"),
    ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "hi", "temperature": 2.5}, "temperature"),
    ({"prompt": "hi", "temperature": -0.1}, "temperature"),
    ({"prompt": "hi", "temperature": "hot"}, "temperature"),
    ({"prompt": "hi", "top_p": 0}, "top_p"),
    ({"prompt": "hi", "top_p": 1.5}, "top_p"),
    ({"prompt": "hi", "n": 0}, "n"),
    ({"prompt": "hi", "n": 17}, "n"),
    ({"prompt": "hi", "best_of": 3}, "best_of"),
    ({"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"prompt": "hi", "stop": ""}, "stop"),
    ({"prompt": "hi", "stop": 5}, "stop"),
    ({"prompt": "hi", "seed": -1}, "seed"),
    ({"prompt": "hi", "seed": 2**40}, "seed"),
    ({"prompt": "hi", "logprobs": 6}, "logprobs"),
    ({"prompt": "hi", "logprobs": -1}, "logprobs"),
    ({"prompt": "hi", "echo": "yes"}, "echo"),
    ({"prompt": "hi", "stream": "true"}, "stream"),
    ({"prompt": "hi", "stream_options": {"include_usage": True}}, "stream_options"),
    ({"prompt": "hi", "stream": True, "stream_options": {"include_usage": "x"}}, "stream_options.include_usage"),
    ({"prompt": "hi", "logit_bias": {"abc": 1}}, "logit_bias"),
    ({"prompt": "hi", "logit_bias": {"50": 101}}, "logit_bias"),
    ({"prompt": "hi", "logit_bias": {"60000": 1}}, "logit_bias"),
    ({"prompt": "hi", "frequency_penalty": 3}, "frequency_penalty"),
    ({"prompt": "hi", "presence_penalty": -2.5}, "presence_penalty"),
    ({"prompt": "hi", "suffix": "the end"}, "suffix"),
    ({"prompt": "hi", "temprature": 1}, "temprature"),
    ({"prompt": "hi", "top_k": -1}, "top_k"),
    ({"prompt": "hi", "repetition_penalty": 0}, "repetition_penalty"),
    ({"prompt": "hi", "max_tokens": 10, "min_tokens": 50}, "min_tokens"),
    ({"prompt": "hi", "no_repeat_ngram_size": -2}, "no_repeat_ngram_size"),
    ({"prompt": "hi", "ignore_eos": "no"}, "ignore_eos"),
    ({"prompt": "hi", "user": 5}, "user"),
    (b'{"prompt": "hi", ', None),
    (b"[1, 2]", None),
    (b'{"prompt": "hi", "temperature": NaN}', "temperature"),
    (b"", None),
]


def bad_request_table(url: str) -> list[tuple[str, int, str | None, str]]:
    rows = []
    for body, _ in BAD_REQUESTS:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        response = httpx.post(url + "/v1/completions", content=raw, headers={"Content-Type": "application/json"})
        error = response.json()["error"]
        rows.append((raw.decode()[:70], response.status_code, error["param"], error["message"]))
    return rows


def test_bad_requests_each_get_400_with_their_param_and_the_server_stays_up(live, client):
    rows = bad_request_table(live.url)
    assert len(rows) >= 30
    for (body, param), (shown, status, given, message) in zip(BAD_REQUESTS, rows):
        assert (status, given) == (400, param), f"{shown}: {status} {given} {message}"
        assert message and "\n" not in message
    too_long = httpx.post(live.url + "/v1/completions", json={"prompt": LONG}).json()["error"]
    assert too_long["code"] == "context_length_exceeded" and "1024" in too_long["message"]
    with pytest.raises(openai.BadRequestError) as caught:  # the openai client sees the same
        client.completions.create(model=NAME, prompt="hi", temperature=3)
    assert caught.value.param == "temperature" and caught.value.code == "invalid_value"
    with pytest.raises(openai.NotFoundError) as caught:
        client.completions.create(model="gpt-3.5-turbo-instruct", prompt="hi")
    assert caught.value.code == "model_not_found" and caught.value.param == "model"
    assert httpx.get(live.url + "/health").json() == {"status": "ok"}
    assert client.completions.create(model=NAME, prompt="hi", max_tokens=3).choices[0].text
    assert metric(live.url, 'gpt2onnx_rejected_total{reason="invalid"}') >= len(rows) - 2


def test_chat_route_says_to_use_completions(client):
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}])
    assert "chat template" in caught.value.message and "/v1/completions" in caught.value.message


def test_unknown_route_and_models(client, live):
    assert [m.id for m in client.models.list()] == [NAME]
    assert client.models.retrieve(NAME).id == NAME
    missing = httpx.get(live.url + "/v2/nothing")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    huge = httpx.post(live.url + "/v1/completions", json={"prompt": "x" * (9 * 2**20)})
    assert huge.status_code == 413 and huge.json()["error"]["code"] == "request_too_large"


def test_tokenize_detokenize_round_trip(live, reference):
    _, tokenizer = reference
    text = "fs.readFile(path, options) — naïve café\n\tdone <|endoftext|>"
    tokens = httpx.post(live.url + "/tokenize", json={"prompt": text}).json()
    assert tokens["tokens"] == tokenizer(text).input_ids and tokens["count"] == len(tokens["tokens"])
    assert tokens["max_model_len"] == 1024
    back = httpx.post(live.url + "/detokenize", json={"tokens": tokens["tokens"]}).json()
    assert back == {"prompt": text}
    bad = httpx.post(live.url + "/detokenize", json={"tokens": [1, 99999]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"


def test_an_error_after_the_stream_began_is_an_error_event(model):
    """HTTP shape only: an engine whose request fails after one token (a stand-in for a crashed step)."""

    class FailingRequest:
        prompt_logprobs = None
        error = "the model produced NaN logits"

        async def aevents(self):
            yield Event(row=0, token_id=262, text=" the", logprob=None, top_logprobs=None, finish_reason=None)
            yield Event(row=0, token_id=None, text="", logprob=None, top_logprobs=None, finish_reason="error")

        def cancel(self):
            pass

    class FailingEngine:
        options = EngineOptions()
        alive = True

        def __init__(self):
            self.model = model

        def submit(self, *args, **kwargs):
            return FailingRequest()

        def stats(self):
            return None

    with LiveServer(create_app(FailingEngine(), ServerOptions(model_name=NAME))) as server:
        client = openai_client(server.url)
        pieces = []
        with pytest.raises(openai.APIError, match="NaN logits"):
            for chunk in client.completions.create(model=NAME, prompt="hi", stream=True):
                pieces.append(chunk.choices[0].text)
        assert pieces == [" the"]
        with pytest.raises(openai.InternalServerError, match="NaN logits"):
            client.completions.create(model=NAME, prompt="hi")


def test_health_is_503_while_the_model_loads(model):
    release = threading.Event()

    def factory(on_step):
        release.wait(60)
        return Engine(model, EngineOptions(max_batch=4, on_step=on_step))

    def collected(thing) -> bool:  # in a generation the collector walks (frozen objects are in none)
        return any(o is thing for o in gc.get_objects())

    app = create_app(options=ServerOptions(model_name=NAME), load=factory)
    with LiveServer(app) as server:
        health = httpx.get(server.url + "/health")
        assert health.status_code == 503 and health.json()["error"]["code"] == "model_loading"
        loading = httpx.post(server.url + "/v1/completions", json={"prompt": "hi"})
        assert loading.status_code == 503 and loading.headers["retry-after"] == "1"
        assert collected(model) and collected(app)
        release.set()
        deadline = time.monotonic() + 30
        try:
            while httpx.get(server.url + "/health").status_code != 200:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            # the startup heap (model, engine, app) is frozen once loaded: no collection pauses walking it
            assert not collected(model) and not collected(app) and gc.get_freeze_count() > 0
            client = openai_client(server.url)
            assert client.completions.create(model=NAME, prompt="hi", max_tokens=4, seed=1).choices[0].text
            assert metric(server.url, "gpt2onnx_batch_size_rows_count") >= 1  # the engine's steps reach /metrics
        finally:
            gc.unfreeze()  # this test process is not a server's: give its heap back to the collector


# --- the real CLI: API key, queue limit, SIGTERM drain ------------------------------------------------------


@pytest.fixture(scope="module")
def guarded(trained_export, tmp_path_factory):
    """`gpt2onnx serve` with an API key file, one row in the batch and one waiting request at most."""
    key_file = tmp_path_factory.mktemp("key") / "key.txt"
    key_file.write_text("s3cret-key\n")
    process, url = start_cli(trained_export, "--api-key-file", str(key_file), "--max-batch", "1", "--max-queue", "1")
    yield url
    stop_cli(process)


def test_bad_key_is_an_authentication_error(guarded):
    for key in ("wrong-key", "s3cret-ke", "s3cret-key2"):
        with pytest.raises(openai.AuthenticationError) as caught:
            openai_client(guarded, api_key=key).completions.create(
                model=NAME, prompt="hi", max_tokens=2)
        assert caught.value.code == "invalid_api_key"
    assert httpx.get(guarded + "/metrics").status_code == 401
    assert httpx.post(guarded + "/tokenize", json={"prompt": "a"}).status_code == 401
    assert httpx.get(guarded + "/health").status_code == 200  # no key needed
    assert httpx.get(guarded + "/").status_code == 200  # the playground page asks for the key itself
    good = openai_client(guarded, api_key="s3cret-key")
    assert good.completions.create(model=NAME, prompt="hi", max_tokens=2, seed=0).choices[0].finish_reason


def test_queue_overflow_is_a_rate_limit_error_with_retry_after(guarded):
    headers = {"Authorization": "Bearer s3cret-key"}
    client = openai_client(guarded, api_key="s3cret-key", timeout=60)
    running = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=900, stream=True, seed=1,
                                        extra_body={"ignore_eos": True})
    next(iter(running))  # in the batch (its one row)
    queued = {}
    waiter = threading.Thread(target=lambda: queued.setdefault("answer", client.completions.create(
        model=NAME, prompt="hi", max_tokens=3, seed=1)))
    waiter.start()
    deadline = time.monotonic() + 10
    while metric(guarded, "gpt2onnx_requests_waiting", headers) != 1:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    with pytest.raises(openai.RateLimitError) as caught:
        client.completions.create(model=NAME, prompt="hi", max_tokens=3)
    assert caught.value.response.headers["retry-after"] == "1" and caught.value.code == "queue_full"
    running.close()  # frees the row: the queued request runs
    waiter.join(30)
    assert queued["answer"].choices[0].text
    assert metric(guarded, 'gpt2onnx_rejected_total{reason="queue_full"}', headers) >= 1


def test_sigterm_drains_an_in_flight_stream_then_exits(trained_export):
    process, url = start_cli(trained_export, "--drain-timeout", "60")
    try:
        client = openai_client(url, timeout=60)
        stream = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=200, stream=True, seed=4,
                                           logprobs=0, extra_body={"ignore_eos": True})
        chunks = iter(stream)
        got = [next(chunks), next(chunks)]
        process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5
        while httpx.get(url + "/health").status_code != 503:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with pytest.raises(openai.InternalServerError) as caught:  # 503: no new requests while draining
            client.completions.create(model=NAME, prompt="hi", max_tokens=2)
        assert caught.value.status_code == 503 and caught.value.code == "draining"
        got += list(chunks)
        tokens = sum(len(c.choices[0].logprobs.tokens) for c in got)
        assert tokens == 200 and got[-1].choices[0].finish_reason == "length"
        assert process.wait(30) == 0
    finally:
        stop_cli(process)
