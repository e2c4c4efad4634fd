"""The HTTP shell around the engine (`gpt2onnx serve`): OpenAI's legacy Completions API, health, metrics and
a playground page. It parses, checks and streams; requests, scheduling and sampling live in engine.py.

Routes (an API key, when set, is needed everywhere but /health and the playground page's own files):
    POST /v1/completions     OpenAI legacy Completions, JSON or SSE (stream=true); see openai_api.py
    GET  /v1/models          the one served model
    GET  /health             200 {"status": "ok"}; 503 while the model loads, while draining, or if the
                             engine stopped
    GET  /metrics            Prometheus text format
    POST /tokenize           {"prompt": text} -> {"tokens": [...], "count", "max_model_len"}
    POST /detokenize         {"tokens": [...]} -> {"prompt": text}
    POST /v1/chat/completions  an OpenAI 404 error: GPT-2 has no chat template
    GET  /                   the playground page (static/playground.html)

Before a route runs, guards.py checks the Host, Origin and Content-Type headers and the key, and reads the
body within the read timeout and size limit; connections.py bounds the time to a request's headers and the
open connections of `serve()`. Every response carries `x-gpt2onnx-replica` (hostname-pid unless set), so a
client behind a load balancer can tell replicas apart. A request that does not end as answered (abandoned,
cancelled, stopped) is one log line (logs.py). SIGTERM (or Ctrl-C) drains: /health and new requests answer
503, the queued requests get 503 at once, the running ones finish (for at most drain_timeout seconds; the rest
end with an error event), the engine closes, the process exits 0. A second signal stops at once: exit 130
(SIGINT) or 143 (SIGTERM), every open stream ending with an error event.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import Gpt2OnnxError, InvalidArgumentError, ModelLoadError
from ..generation.engine import CANCELLED, ERROR, REJECTED, EngineClient
from ..generation.settings import MAX_RETURN_SEQUENCES
from ..runtime.heap import freeze_startup_heap
from ..version import __version__
from .connections import connection_cap, guarded_protocol, raise_open_files_limit
from .guards import add_guards, refusal
from .logs import log_config
from .metrics import CONTENT_TYPE, Metrics
from .openai_api import (
    ApiError,
    ChoiceText,
    Completion,
    CompletionChoice,
    DetokenizeRequest,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenText,
    Usage,
    bad_request,
    error_body,
    parse_completion_request,
    parse_model,
    prepare,
)
from .openapi import complete_schema
from .options import ServerOptions

log = logging.getLogger("gpt2onnx.serving")
STATIC = Path(__file__).parent / "static"


class _State:
    """What the routes share: the engine once loaded, the drain flag, the requests in flight."""

    def __init__(self, options: ServerOptions):
        self.options = options
        self.replica = options.replica_id or f"{socket.gethostname()}-{os.getpid()}"
        self.engine: EngineClient | None = None
        self.owns_engine = False
        self.load_error: str | None = None
        self.load_hint: str | None = None
        self.on_load_error: Callable[[], None] | None = None  # the runner stops the server
        self.draining = False
        self.in_flight = 0
        self.runs: set[_Run] = set()  # the /v1/completions requests in flight
        self.created = int(time.time())
        self.metrics = Metrics(lambda: self.engine.stats() if self.engine is not None else None)
        self.model = self.token_text = self.fingerprint = None

    def attach(self, engine, *, freeze: bool = False) -> None:
        """Serve `engine`; freeze: the process is the server's own, freeze its heap (freeze_startup_heap) once
        everything is loaded, before the first request."""
        model = engine.model
        self.token_text = TokenText(model.tokenizer)
        model.tokenizer.prepare_library()  # now: a request with non-ASCII text never waits for its build
        precision = (model.manifest or {}).get("precision", "fp32")
        self.fingerprint = f"gpt2onnx-{__version__}-{precision}"
        self.model = model
        if freeze:
            freeze_startup_heap()
        self.engine = engine  # last: the routes take a set engine to mean "ready"

    def load(self, load: Callable[[Callable[[int], None]], EngineClient]) -> None:
        try:
            self.attach(load(self.metrics.on_step), freeze=True)  # the app owns the engine it made
            log.info("model loaded: serving %s", self.options.model_name)
        except Exception as error:  # noqa: BLE001 - reported on /health and by the runner
            ours = isinstance(error, Gpt2OnnxError)
            self.load_error = error.message if ours else f"{type(error).__name__}: {error}"
            self.load_hint = error.hint if ours else None
            if self.on_load_error is not None:
                self.on_load_error()
            else:
                log.error("the model failed to load: %s", self.load_error)

    def unavailable(self) -> ApiError | None:
        """Why the engine cannot take a request now (None: it can)."""
        if self.load_error is not None:
            return ApiError(503, f"the model failed to load: {self.load_error}", type="unavailable_error",
                            code="load_failed")
        if self.engine is None:
            return ApiError(503, "the model is still loading; retry in a few seconds", type="unavailable_error",
                            code="model_loading", headers={"Retry-After": "1"})
        if self.draining:
            return ApiError(503, "the server is shutting down and takes no new requests", type="unavailable_error",
                            code="draining")
        if not self.engine.alive:
            return ApiError(503, "the engine has stopped; restart the server", type="unavailable_error",
                            code="engine_stopped")
        return None

    def require(self):
        error = self.unavailable()
        if error is not None:
            self.metrics.rejected.labels("loading" if error.code == "model_loading" else error.code).inc()
            raise error
        return self.engine

    def reject(self, reason: str, error: ApiError, *, close: bool = False):
        """Count a refusal by its reason; the response that answers it (close: the connection then closes)."""
        self.metrics.rejected.labels(reason).inc()
        return refusal(error, close=close)

    def retry_later(self, message: str, code: str) -> ApiError:
        """A 503 the client may retry (the openai client does, after Retry-After)."""
        return ApiError(503, message, type="unavailable_error", code=code,
                        headers={"Retry-After": str(self.options.retry_after)})


def create_app(engine: EngineClient | None = None, options: ServerOptions = ServerOptions(), *,
               load: Callable[[Callable[[int], None]], EngineClient] | None = None) -> FastAPI:
    """The FastAPI app serving an engine: pass one of the two.

    engine: a running gpt2onnx.Engine (the caller keeps it: the app never closes it).
    load: `load(on_step) -> Engine`, called in a background thread at startup (pass on_step on to EngineOptions
        so /metrics has the batch-size histogram); /health answers 503 until it returns, and the app closes
        that engine on shutdown.
    """
    if (engine is None) == (load is None):
        raise InvalidArgumentError("create_app takes an engine or load=, one of the two",
                                   hint="create_app(engine) serves a running Engine; create_app(load=f) builds one")
    state = _State(options)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        if state.engine is None and state.load_error is None:
            threading.Thread(target=state.load, args=(load,), name="gpt2onnx-load", daemon=True).start()
        yield
        state.draining = True
        if state.owns_engine and state.engine is not None:
            await asyncio.to_thread(state.engine.close, drain=True, timeout=options.drain_timeout)

    if engine is None:
        state.owns_engine = True
    else:
        state.attach(engine)

    app = FastAPI(title="gpt2onnx", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None)
    app.openapi = lambda: app.openapi_schema or _whole_schema(app, options.model_name)
    app.state.gpt2onnx = state
    add_guards(app, options, replica=state.replica, reject=state.reject)
    _error_handlers(app, state)

    @app.get("/health")
    async def health():
        error = state.unavailable()
        if error is not None:
            return _error_response(error)
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        state.require()
        return ModelList(data=[_card(state)]).model_dump()

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        state.require()
        if model_id != options.model_name:  # even with accept_any_model: the list and the card name the real one
            raise _model_not_found(model_id, options.model_name)
        return _card(state).model_dump()

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    @app.post("/tokenize")
    async def tokenize(request: Request):
        state.require()
        body = parse_model(TokenizeRequest, await request.body())
        _check_model(body.model, state)
        ids = state.model.tokenizer.encode(body.prompt, allow_special=True)
        answer = {"count": len(ids), "max_model_len": state.model.config.n_positions, "tokens": ids}
        if body.return_token_strs:
            answer["token_strs"] = [state.token_text(i) for i in ids]
        return answer

    @app.post("/detokenize")
    async def detokenize(request: Request):
        state.require()
        body = parse_model(DetokenizeRequest, await request.body())
        _check_model(body.model, state)
        vocab = state.model.config.vocab_size
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise bad_request(f"tokens holds token id {bad[0]}; ids go from 0 to {vocab - 1}", "tokens")
        return {"prompt": state.model.tokenizer.decode(body.tokens)}

    @app.get("/v1/chat/completions", operation_id="chat_completions_get")
    @app.post("/v1/chat/completions", operation_id="chat_completions_post")
    async def chat():
        raise ApiError(404, "GPT-2 has no chat template, so this server has no /v1/chat/completions: send your "
                            "text as `prompt` to /v1/completions (client.completions.create) instead",
                       code="unsupported_endpoint")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _completions(request, state)

    @app.get("/", include_in_schema=False)
    async def playground():
        return FileResponse(STATIC / "playground.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


# --- /v1/completions ---------------------------------------------------------------------------------------


async def _completions(request: Request, state: _State) -> Response:
    arrived = time.perf_counter()
    engine = state.require()
    model = state.model
    raw = await request.body()  # read whole already, within the size and time limits (guards.BodyReader)
    try:
        body = parse_completion_request(raw, vocab_size=model.config.vocab_size,
                                        max_n=min(MAX_RETURN_SEQUENCES, engine.options.max_batch),
                                        max_logprobs=state.options.max_logprobs)
        _check_model(body.model, state)
        # tokenizing a long prompt takes milliseconds: off the event loop, which streams everyone's tokens
        prepared = await asyncio.to_thread(prepare, body, decode=model.tokenizer.decode,
                                           encode=lambda text: model.encode_prompt(text, allow_special=True),
                                           n_positions=model.config.n_positions)
        most = engine.options.max_queue
        if len(prepared.prompt_ids) > most:  # could never be queued at once
            raise bad_request(f"prompt holds {len(prepared.prompt_ids)} prompts; this server takes at most {most} "
                              "in one request (its --max-queue): split the list", "prompt")
    except ApiError as error:
        reason = {"context_length_exceeded": "context_length", "model_not_found": "not_found"}.get(error.code,
                                                                                                    "invalid")
        state.metrics.rejected.labels(reason).inc()
        raise
    except InvalidArgumentError as error:  # a prompt the tokenizer refuses
        state.metrics.rejected.labels("invalid").inc()
        raise bad_request(error.message, "prompt") from None
    run = _Run(state, body, prepared, arrived, request)
    run.submit(engine)
    headers = {} if prepared.seed is None else {"x-gpt2onnx-seed": str(prepared.seed)}
    if body.stream:  # the response starts once the engine takes the request: until then it may still be a 503
        try:
            await run.begin()
        except BaseException:
            run.finish()
            raise
        if run.client_gone:
            run.finish()
            return Response(status_code=499)
        run.streaming = True
        return _EventStream(run.sse(), run.finish, media_type="text/event-stream",
                            headers={**headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    watcher = asyncio.create_task(_watch_disconnect(request, run))
    try:
        async for _ in run.pieces():
            pass
        if run.client_gone:
            return Response(status_code=499)  # nobody is listening (nginx's "client closed request")
        run.status = "ok"
        return Response(run.completion().model_dump_json(), media_type="application/json", headers=headers)
    finally:
        watcher.cancel()
        run.finish()


class _Run:
    """One /v1/completions request in the engine: its engine requests (one per prompt), its choices (n per
    prompt; choice index = prompt index * n + j) and its timings."""

    def __init__(self, state: _State, body, prepared, arrived: float, request: Request):
        self.state, self.body, self.prepared, self.arrived, self.request = state, body, prepared, arrived, request
        self.id = f"cmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.n = body.choices_per_prompt
        decode = state.model.tokenizer.decode
        self.choices = [ChoiceText(i, decode=decode, token_text=state.token_text, logprobs=body.logprobs)
                        for i in range(len(prepared.prompt_ids) * self.n)]
        self.requests = []
        self.echoed: set[int] = set()
        self.first_token: float | None = None
        self.last_token: dict[tuple[int, int], float] = {}
        self.events = None  # the engine requests' events, merged (begin, pieces)
        self.first = None  # the first of them, once begin() waited for it
        self.streaming = False  # its 200 went out: what happens next is for the log (and an error event)
        self.client_gone = False
        self.stopped_by: str | None = None  # why the server ended the request before the client had it all
        self.finished = False
        self.status = "cancelled"  # until the response is complete ("ok") or fails ("error")
        self.error: str | None = None  # the engine's message when it failed

    def submit(self, engine) -> None:
        from ..generation.engine import EngineClosedError, QueueFullError

        metrics = self.state.metrics
        try:
            for ids in self.prepared.prompt_ids:
                self.requests.append(engine.submit(ids, self.prepared.settings, **self.prepared.submit_options))
        except QueueFullError:
            self.cancel()
            metrics.rejected.labels("queue_full").inc()
            retry = self.state.options.retry_after
            raise ApiError(429, f"the server is busy: its queue is full; retry in {retry} s",
                           type="rate_limit_error", code="queue_full", headers={"Retry-After": str(retry)}) from None
        except EngineClosedError:
            self.cancel()
            metrics.rejected.labels("draining").inc()
            raise ApiError(503, "the server is shutting down and takes no new requests", type="unavailable_error",
                           code="draining") from None
        except InvalidArgumentError as error:  # the engine's own checks (the server's come first)
            self.cancel()
            metrics.rejected.labels("invalid").inc()
            raise bad_request(error.message, None) from None
        self.state.in_flight += 1
        self.state.runs.add(self)

    def cancel(self) -> None:
        for engine_request in self.requests:
            engine_request.cancel()

    def client_disconnected(self) -> None:
        self.client_gone = True
        self.status = "cancelled"
        self.cancel()

    def stop(self, why: str) -> None:
        """The server ends this request now (it is stopping): the client gets an error (event), not silence."""
        self.stopped_by = why
        self.cancel()

    async def begin(self) -> None:
        """Wait for the first event, i.e. until the engine takes the request (a client that hangs up meanwhile
        cancels it); one refused while it waited raises its error now, before any response has started."""
        self.events = _merge(self.requests)
        watcher = asyncio.create_task(_watch_disconnect(self.request, self))
        try:
            self.first = await anext(self.events)
            self._check(*self.first)
        except BaseException:
            await self.events.aclose()
            raise
        finally:
            watcher.cancel()

    def finish(self) -> None:
        """Once, when the response is over (however it ended): stop any work left, count the request, and log
        one line unless it ended well (uvicorn's access log has the others)."""
        if self.finished:
            return
        self.finished = True
        self.cancel()
        self.state.in_flight -= 1
        self.state.runs.discard(self)
        self.state.metrics.requests.labels(self.status).inc()
        seconds = time.perf_counter() - self.arrived
        if self.status == "ok":
            self.state.metrics.duration.observe(seconds)
        if self.status == "ok" or not (self.client_gone or self.streaming):
            return  # uvicorn's access log has its line (an error status says what happened)
        tokens = sum(choice.tokens for choice in self.choices)
        event, why = ("cancelled", "the client hung up") if self.client_gone else \
            ("failed", self.error) if self.error else ("stopped", self.stopped_by or "the server stopped")
        log.info("%s %s after %d token(s) in %.2f s: %s", self.id, event, tokens, seconds, why,
                 extra={"event": event, "id": self.id, "client": _client(self.request), "tokens": tokens,
                        "seconds": round(seconds, 3)})

    def _choices_of(self, prompt: int, row: int) -> list[ChoiceText]:
        start = prompt * self.n
        if self.prepared.copies > 1:  # greedy n > 1: the one row feeds every choice of its prompt
            return self.choices[start:start + self.n]
        return [self.choices[start + row]]

    async def pieces(self):
        """(choice, text, logprobs piece, whether it carries a generated token) as the engine produces them, the
        echoed prompts first."""
        metrics = self.state.metrics
        async with contextlib.aclosing(self._events()) as events:
            async for p, event in events:
                if self.body.echo and p not in self.echoed:
                    self.echoed.add(p)
                    for choice in self.choices[p * self.n:(p + 1) * self.n]:
                        text, piece = choice.add_echo(self.prepared.prompts[p], self.prepared.prompt_ids[p],
                                                      self.requests[p].prompt_logprobs)
                        yield choice, text, piece, False
                self._check(p, event)
                if event.token_id is not None:
                    now = time.perf_counter()
                    if self.first_token is None:
                        self.first_token = now
                        metrics.ttft.observe(now - self.arrived)
                    previous = self.last_token.get((p, event.row))
                    if previous is not None:
                        metrics.inter_token.observe(now - previous)
                    self.last_token[(p, event.row)] = now
                for choice in self._choices_of(p, event.row):
                    text, piece = choice.add_event(event)
                    yield choice, text, piece, event.token_id is not None

    async def _events(self):
        """(prompt index, event) of the engine requests: the one begin() took first, then the rest."""
        events = self.events or _merge(self.requests)
        try:
            if self.first is not None:
                yield self.first
            async for item in events:
                yield item
        finally:
            await events.aclose()

    def _check(self, p: int, event) -> None:
        """Raise the error an ending event means (an engine failure, a stop by the server)."""
        if event.finish_reason == ERROR:
            self.status = "error"
            self.error = message = self.requests[p].error or "generation failed"
            raise ApiError(500, f"generation failed: {message}", type="server_error", code="engine_error")
        if event.finish_reason == REJECTED:  # it was still queued when the server began to drain
            self.status = "error"
            self.stopped_by = "refused while queued: the server is draining"
            raise self.state.retry_later("the server is shutting down and did not start this request; retry "
                                         "(another replica may take it)", "draining")
        if event.finish_reason == CANCELLED and not self.client_gone:
            self.status = "error"
            self.stopped_by = self.stopped_by or "the server stopped"
            raise ApiError(503, f"the server stopped before this request finished ({self.stopped_by})",
                           type="unavailable_error", code="shutdown")

    def usage(self) -> Usage:
        prompt = sum(map(len, self.prepared.prompt_ids))
        completion = sum(choice.tokens for choice in self.choices)
        return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)

    def completion(self) -> Completion:
        return Completion(id=self.id, created=self.created, model=self.state.options.model_name,
                          system_fingerprint=self.state.fingerprint, choices=[c.choice() for c in self.choices],
                          usage=self.usage())

    def chunk(self, choice: ChoiceText, text: str, piece) -> str:
        last = CompletionChoice(index=choice.index, text=text, logprobs=piece,
                                finish_reason=choice.finish_reason)
        data = Completion(id=self.id, created=self.created, model=self.state.options.model_name,
                          system_fingerprint=self.state.fingerprint, choices=[last])
        return f"data: {data.model_dump_json()}\n\n"

    async def sse(self):
        """The stream: a chunk per generated token (its text "" while a character or a possible stop string is
        held back, as vLLM streams: every step reaches the client) and per echoed prompt; the usage chunk
        (choices []) when asked; then [DONE]. An error after the start is one error event, then the end."""
        try:
            async for choice, text, piece, token in self.pieces():
                if text or token or (piece is not None and piece.tokens) or choice.finish_reason is not None:
                    yield self.chunk(choice, text, piece)
            if self.body.include_usage:
                usage = Completion(id=self.id, created=self.created, model=self.state.options.model_name,
                                   system_fingerprint=self.state.fingerprint, choices=[], usage=self.usage())
                yield f"data: {usage.model_dump_json()}\n\n"
            self.status = "ok"
            yield "data: [DONE]\n\n"
        except ApiError as error:
            self.status = "error"
            yield f"data: {_json(error.body())}\n\n"
        except asyncio.CancelledError:  # the client went away: the engine drops the rows at its next step
            self.client_disconnected()
            raise
        except Exception as error:
            log.exception("stream failed")
            self.status = "error"
            yield f"data: {_json(error_body(f'internal error: {error}', type='server_error'))}\n\n"
        finally:
            self.cancel()


async def _merge(requests):
    """(prompt index, event) of several engine requests, as they come."""
    if len(requests) == 1:
        async with _closing(requests[0].aevents()) as events:
            async for event in events:
                yield 0, event
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(p, engine_request):
        try:
            async with _closing(engine_request.aevents()) as events:
                async for event in events:
                    queue.put_nowait((p, event))
        except Exception as error:  # noqa: BLE001 - handed to the reader
            queue.put_nowait((p, error))
            return
        queue.put_nowait((p, None))

    tasks = [asyncio.create_task(pump(p, r)) for p, r in enumerate(requests)]
    try:
        running = len(tasks)
        while running:
            p, item = await queue.get()
            if item is None:
                running -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield p, item
    finally:
        for task in tasks:
            task.cancel()


@contextlib.asynccontextmanager
async def _closing(iterator):
    try:
        yield iterator
    finally:
        close = getattr(iterator, "aclose", None)
        if close is not None:
            await close()


async def _watch_disconnect(request: Request, run: _Run) -> None:
    """Cancel a non-streamed request's work as soon as its client hangs up (the body is read already, so the
    next message the server gives is the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            run.client_disconnected()
            return


class _EventStream(StreamingResponse):
    """An SSE response that runs `finish` however it ends, even if the client left before the first byte."""

    def __init__(self, content, finish: Callable[[], None], **kwargs):
        super().__init__(content, **kwargs)
        self.finish = finish

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                await self.body_iterator.aclose()
            finally:
                self.finish()


# --- errors ---------------------------------------------------------------------------------------------


def _error_handlers(app: FastAPI, state: _State) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError):
        return _error_response(error)

    @app.exception_handler(RequestValidationError)
    async def validation(request: Request, error: RequestValidationError):  # FastAPI's 422 becomes OpenAI's 400
        first = error.errors()[0] if error.errors() else {}
        loc = [str(part) for part in first.get("loc", ()) if part != "body"]
        state.metrics.rejected.labels("invalid").inc()
        return _error_response(bad_request(f"{'.'.join(loc) or 'request'}: {first.get('msg', 'invalid')}",
                                           ".".join(loc) or None))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        message = f"{request.method} {request.url.path}: {error.detail}"
        if error.status_code == 404:
            message = f"no route {request.method} {request.url.path}; this server has /v1/completions, /v1/models, " \
                      "/health, /metrics, /tokenize and /detokenize"
        return _error_response(ApiError(error.status_code, message, code="not_found" if error.status_code == 404
                                        else None, headers=dict(error.headers or {})))

    @app.exception_handler(Gpt2OnnxError)
    async def library_error(request: Request, error: Gpt2OnnxError):
        status = 400 if isinstance(error, InvalidArgumentError) else 500
        return _error_response(ApiError(status, error.message, type="invalid_request_error" if status == 400
                                        else "server_error"))

    @app.exception_handler(Exception)
    async def internal(request: Request, error: Exception):
        log.exception("unexpected error on %s", request.url.path)
        return _error_response(ApiError(500, f"internal error: {type(error).__name__}: {error}", type="server_error"))


def _whole_schema(app: FastAPI, model_name: str) -> dict:
    """/openapi.json: FastAPI's schema of the routes, made whole (request bodies, answers, errors: openapi.py)."""
    app.openapi_schema = complete_schema(get_openapi(title=app.title, version=app.version, routes=app.routes),
                                         model_name)
    return app.openapi_schema


def _error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def _json(value) -> str:
    import json

    return json.dumps(value, ensure_ascii=False)


def _card(state: _State) -> ModelCard:
    return ModelCard(id=state.options.model_name, created=state.created,
                     max_model_len=state.model.config.n_positions if state.model is not None else None)


def _model_not_found(name: str, served: str) -> ApiError:
    return ApiError(404, f"The model `{name}` does not exist: this server serves `{served}`", param="model",
                    code="model_not_found")


def _check_model(name: str | None, state: _State) -> None:
    if name is not None and name != state.options.model_name and not state.options.accept_any_model:
        raise _model_not_found(name, state.options.model_name)


def _client(request: Request) -> str:
    client = request.client
    return f"{client.host}:{client.port}" if client else "?"


# --- running it: uvicorn with a drain on SIGTERM -----------------------------------------------------------


def serve(engine: EngineClient | None = None, options: ServerOptions = ServerOptions(), *,
          load: Callable[[Callable[[int], None]], EngineClient] | None = None, host: str = "127.0.0.1",
          port: int = 8000, log_level: str = "info") -> int:
    """Run the app until SIGTERM / Ctrl-C (drained). Returns 0; raises ModelLoadError when the model could not
    be loaded (the server then stops), InvalidArgumentError when host:port cannot be bound. `engine` and `load`
    as in create_app. A second signal ends the process itself at once (exit status 128 + the signal: 130 for
    SIGINT, 143 for SIGTERM) once every open stream has its error event."""
    check_address(host, port)
    app = create_app(engine, options, load=load)
    state: _State = app.state.gpt2onnx
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, log_config=log_config(
        log_level, options.log_format), lifespan="on", timeout_graceful_shutdown=5,
        timeout_keep_alive=min(5, options.read_timeout), limit_concurrency=options.limit_concurrency)
    config.load()  # sets the protocol class to wrap
    config.http_protocol_class = guarded_protocol(
        config.http_protocol_class, read_timeout=options.read_timeout, limit=options.limit_concurrency,
        max_connections=connection_cap(options.limit_concurrency, raise_open_files_limit()), busy=_busy(state),
        count=lambda reason: state.metrics.rejected.labels(reason).inc())
    server = _DrainingServer(config, state)
    state.on_load_error = server.stop
    server.run()
    if state.load_error is not None:
        raise ModelLoadError(f"the model failed to load: {state.load_error}", hint=state.load_hint)
    return 0


def _busy(state: _State):
    """The ASGI app that answers a request beyond --limit-concurrency."""
    error = state.retry_later(f"the server holds {state.options.limit_concurrency} connections or requests already "
                              "(its --limit-concurrency); retry", "busy")

    async def busy(scope, receive, send):
        await state.reject("busy", error, close=True)(scope, receive, send)

    return busy


def check_address(host: str, port: int) -> None:
    """Fail with one line now rather than with uvicorn's log after the model started loading."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except (OSError, OverflowError) as error:
        reason = getattr(error, "strerror", None) or str(error)
        raise InvalidArgumentError(f"cannot listen on {host}:{port}: {reason}",
                                   hint="pick another --port, or stop the process that uses it") from None


class _DrainingServer(uvicorn.Server):
    """uvicorn's Server, except for what signals do. The first SIGTERM / SIGINT drains: /health and new requests
    get 503, the requests still queued in the engine get a 503 with Retry-After at once (they never started),
    and the running ones finish, for at most drain_timeout seconds (those still running then end with an error
    event); the process then exits 0. A second signal stops at once: every open request ends with an error
    (event), then the process exits with 128 + the signal without the interpreter's teardown."""

    def __init__(self, config, state: _State):
        super().__init__(config)
        self.state = state
        self.loop: asyncio.AbstractEventLoop | None = None
        self.signals = 0

    async def startup(self, sockets=None):
        self.loop = asyncio.get_running_loop()
        await super().startup(sockets)

    def handle_exit(self, sig, frame):
        self.signals += 1
        if self.loop is None:  # before the loop runs: nothing is open yet
            _exit_now(128 + sig)
        if self.signals == 1 and not self.should_exit:
            self.state.draining = True
            self.loop.call_soon_threadsafe(lambda: self.loop.create_task(self.drain()))
        elif self.signals <= 2:
            self.loop.call_soon_threadsafe(lambda: self.loop.create_task(self.stop_now(sig)))
        else:  # a third: whatever is left
            _exit_now(128 + sig)

    async def drain(self):
        state = self.state
        queued = state.engine.reject_waiting() if state.engine is not None and state.owns_engine else 0
        running = max(0, state.in_flight - queued)
        log.info("draining: %d request(s) running, %d queued one(s) refused (stopping in at most %.0f s; signal "
                 "again to stop now)", running, queued, state.options.drain_timeout,
                 extra={"event": "draining", "running": running, "refused": queued})
        deadline = time.monotonic() + state.options.drain_timeout
        while state.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if state.in_flight:  # out of time: end them
            log.warning("drain timeout: ending %d request(s)", state.in_flight)
            await self.end_requests("the drain timeout passed")
        self.should_exit = True

    async def end_requests(self, why: str, wait: float = 2.0) -> None:
        """End every request in flight with its error (event), and wait up to `wait` s for their responses."""
        for run in list(self.state.runs):
            run.stop(why)
        stop = time.monotonic() + wait
        while self.state.in_flight and time.monotonic() < stop:
            await asyncio.sleep(0.02)

    async def stop_now(self, sig: int):
        """The second signal: end every request, stop the engine, flush the log, exit with 128 + sig."""
        state = self.state
        name = signal.Signals(sig).name
        log.warning("%s again: stopping now (%d request(s) end with an error)", name, state.in_flight,
                    extra={"event": "stopping", "running": state.in_flight})
        state.draining = True
        await self.end_requests(f"{name} stopped the server")
        if state.engine is not None and state.owns_engine:
            closing = threading.Thread(target=state.engine.close, kwargs={"drain": False}, daemon=True)
            closing.start()
            await asyncio.to_thread(closing.join, 2.0)
        _exit_now(128 + sig)

    def stop(self):
        self.should_exit = True


def _exit_now(code: int) -> None:
    """End the process without the interpreter's teardown (ONNX Runtime's threads may still run; tearing the
    interpreter down under them aborts): the log and the output are flushed first."""
    for handler in logging.getLogger("gpt2onnx").handlers + logging.getLogger("uvicorn").handlers + \
            logging.getLogger("uvicorn.access").handlers:
        handler.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
