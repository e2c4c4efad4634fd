"""Schemathesis fuzzes the server from its own OpenAPI schema (/openapi.json, fetched with the API key) on every
route: no 5xx, every response's status, content type, headers and body as the schema declares, a request the
schema calls invalid refused with a 4xx, and a missing or wrong key refused with a 401.

Bounded for CI: a fixed number of generated examples per operation (MAX_EXAMPLES) plus the coverage phase's
boundary cases, derandomized and without Hypothesis' example database, so every run sends the same requests.
The totals are printed at the end (`pytest -s`).

The server serves its schema made whole by gpt2onnx/serving/openapi.py (request bodies, answers, error statuses,
the bearer key); a test checks that /openapi.json is that schema, and the fuzzer starts from it.
"""

import collections
import json
import time
import warnings

import httpx
import hypothesis
import pytest
import schemathesis
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ignored_auth,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
    unsupported_method,
)
from test_server import LiveServer  # uvicorn in a thread of this process

from gpt2onnx.generation.engine import Engine, EngineOptions
from gpt2onnx.serving.openai_api import Completion
from gpt2onnx.serving.server import ServerOptions, create_app

NAME = "trained"
KEY = "k"
MAX_EXAMPLES = 50  # per operation (9 operations), besides the coverage phase's boundary cases
MAX_NEW_TOKENS = 4  # a generated body's max_tokens / min_tokens are cut to this: the fuzzer tests the HTTP shell
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance, negative_data_rejection, ignored_auth, unsupported_method]


# --- the server -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def live(trained):
    engine = Engine(trained, EngineOptions(max_batch=4, max_queue=16))
    with LiveServer(create_app(engine, ServerOptions(model_name=NAME, api_keys=(KEY,)))) as server:
        yield server
    engine.close(drain=False)


@pytest.fixture(scope="module")
def tally():
    counts = collections.Counter()
    started = time.perf_counter()
    yield counts
    seconds = time.perf_counter() - started
    print(f"\nfuzzed: {sum(counts.values())} requests in {seconds:.1f} s; by operation, method sent and status:")
    for (label, method, status), count in sorted(counts.items()):
        print(f"  {label:30} {method:7} {status}  {count}")


def served_schema() -> dict:
    """The OpenAPI schema of the app as create_app builds it (the same code serves /openapi.json; no model needed)."""
    return create_app(load=lambda on_step: None, options=ServerOptions(model_name=NAME, api_keys=(KEY,))).openapi()


# Loaded at import, from the app object: schemathesis.pytest.from_fixture fails on pytest 9.2 (it sets
# Function._nodeid, which pytest 9.2 no longer has); the live server's /openapi.json is checked equal below.
schema = schemathesis.openapi.from_dict(served_schema(), config=schemathesis.Config.from_dict({
    "seed": 20261208,
    "headers": {"Authorization": f"Bearer {KEY}"},
    "request-timeout": 30,  # seconds; a hang fails the example rather than the CI job's clock
    "generation": {"deterministic": True, "database": "none", "max-examples": MAX_EXAMPLES},
    "phases": {"stateful": {"enabled": False}},
}))


@pytest.mark.filterwarnings("ignore:Duplicate Operation ID")  # test_operation_ids_are_unique holds it
def test_the_server_serves_its_schema(live):
    answer = httpx.get(live.url + "/openapi.json", headers={"Authorization": f"Bearer {KEY}"})
    assert answer.status_code == 200, answer.text
    assert answer.json() == served_schema()
    completions = answer.json()["paths"]["/v1/completions"]["post"]  # whole: the body, the answer, the errors
    assert "requestBody" in completions and {"200", "400", "401", "429"} <= set(completions["responses"])
    assert httpx.get(live.url + "/openapi.json").status_code == 401  # the key guards the schema too


def test_operation_ids_are_unique():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        create_app(load=lambda on_step: None).openapi()


def shorten(body) -> None:
    """A generated body's token counts cut to MAX_NEW_TOKENS (a valid count stays valid; min <= max kept): the
    fuzzer is here for the HTTP shell, not for 1,000-token generations."""
    if not isinstance(body, dict):
        return
    if body.get("max_tokens") is None:  # the default, 16
        body["max_tokens"] = MAX_NEW_TOKENS
    for name in ("max_tokens", "min_tokens"):
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and 0 < value <= 1024:
            body[name] = min(value, MAX_NEW_TOKENS)


@schema.parametrize()
@hypothesis.settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
                     suppress_health_check=list(hypothesis.HealthCheck))
def test_fuzz(case, live, tally):
    # deadline None: one slow example on a loaded CI machine would be re-run and reported as flaky; request-timeout
    # bounds each request instead
    if case.operation.path == "/v1/completions":
        shorten(case.body)
    response = case.call_and_validate(base_url=live.url, checks=CHECKS)
    tally[(case.operation.label, case.method.upper(), response.status_code)] += 1
    if response.status_code == 200 and "text/event-stream" in response.headers.get("content-type", [""])[0]:
        check_stream(response.content.decode())


def check_stream(text: str) -> None:
    """An SSE answer: each event a Completion chunk (the usage chunk too), ending in [DONE] or one error event."""
    events = [event for event in text.split("\n\n") if event]
    assert events and all(event.startswith("data: ") for event in events), text[:300]
    *chunks, last = [event.removeprefix("data: ") for event in events]
    for chunk in chunks:
        Completion.model_validate_json(chunk)
    if last != "[DONE]":
        assert set(json.loads(last)) == {"error"}, last


def test_every_operation_was_answered_both_ways(tally):
    """The fuzzer reached each operation's success path and its error path (ran after test_fuzz)."""
    if not tally:
        pytest.skip("test_fuzz did not run")
    statuses = collections.defaultdict(set)
    for (label, method, status), _ in tally.items():
        statuses[label].add(status)
    assert all(status < 500 for found in statuses.values() for status in found), statuses
    assert len(statuses) == 9, sorted(statuses)  # every operation
    for label, found in statuses.items():
        if "chat" in label:
            assert 200 not in found, (label, found)
        elif label.startswith("POST"):
            assert {200, 400} <= found, (label, found)
        else:
            assert 200 in found, (label, found)
        assert 401 in found or label == "GET /health", (label, found)  # ignored_auth tried without the key
