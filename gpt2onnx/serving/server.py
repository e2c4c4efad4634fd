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

Every response carries `x-gpt2onnx-replica` (hostname-pid unless set), so a client behind a load
balancer can tell replicas apart. SIGTERM (or Ctrl-C) drains: /health and new requests answer 503, the
requests in flight finish (for at most drain_timeout seconds; the rest end with an error event), the engine
closes, the process exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import Gpt2OnnxError, InvalidArgumentError, ModelLoadError
from ..generation.engine import EngineClient
from ..generation.settings import MAX_RETURN_SEQUENCES
from ..runtime.heap import freeze_startup_heap
from ..version import __version__
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
from .options import ServerOptions

log = logging.getLogger("gpt2onnx.serving.server")
STATIC = Path(__file__).parent / "static"
MAX_BODY_BYTES = 8 * 2**20  # a full 1,024-token context is ~10 KB of text or ids: 8 MB is far beyond any use
_OPEN_PATHS = ("/health", "/", "/favicon.ico")  # and /static/*: the playground's page asks for the key itself


class _State:
    """What the routes share: the engine once loaded, the drain flag, the requests in flight."""

    def __init__(self, options: ServerOptions):
        self.options = options
        self.replica = options.replica_id or f"{socket.gethostname()}-{os.getpid()}"
        self.keys = [key.encode() for key in options.api_keys]
        self.engine: EngineClient | None = None
        self.owns_engine = False
        self.load_error: str | None = None
        self.load_hint: str | None = None
        self.on_load_error: Callable[[], None] | None = None  # the runner stops the server
        self.draining = False
        self.in_flight = 0
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
    app.state.gpt2onnx = state
    app.add_middleware(_Shell, state=state)
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
        if model_id != options.model_name:
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

    @app.api_route("/v1/chat/completions", methods=["GET", "POST"])
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
    declared = request.headers.get("content-length", "")
    size = int(declared) if declared.isdigit() else 0
    raw = bytearray()  # grows in place, chunk by chunk
    if size <= MAX_BODY_BYTES:  # refused from the header alone, before anything is read into memory
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > MAX_BODY_BYTES:
                break
        size = len(raw)
    if size > MAX_BODY_BYTES:
        state.metrics.rejected.labels("invalid").inc()
        raise ApiError(413, f"the request body is over {MAX_BODY_BYTES} bytes, the most accepted",
                       code="request_too_large")
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
    run = _Run(state, body, prepared, arrived)
    run.submit(engine)
    headers = {} if prepared.seed is None else {"x-gpt2onnx-seed": str(prepared.seed)}
    if body.stream:
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

    def __init__(self, state: _State, body, prepared, arrived: float):
        self.state, self.body, self.prepared, self.arrived = state, body, prepared, arrived
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
        self.client_gone = False
        self.finished = False
        self.status = "cancelled"  # until the response is complete ("ok") or fails ("error")

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

    def cancel(self) -> None:
        for engine_request in self.requests:
            engine_request.cancel()

    def client_disconnected(self) -> None:
        self.client_gone = True
        self.status = "cancelled"
        self.cancel()

    def finish(self) -> None:
        """Once, when the response is over (however it ended): stop any work left, count the request."""
        if self.finished:
            return
        self.finished = True
        self.cancel()
        self.state.in_flight -= 1
        self.state.metrics.requests.labels(self.status).inc()
        if self.status == "ok":
            self.state.metrics.duration.observe(time.perf_counter() - self.arrived)

    def _choices_of(self, prompt: int, row: int) -> list[ChoiceText]:
        start = prompt * self.n
        if self.prepared.copies > 1:  # greedy n > 1: the one row feeds every choice of its prompt
            return self.choices[start:start + self.n]
        return [self.choices[start + row]]

    async def pieces(self):
        """(choice, text, logprobs piece, whether it carries a generated token) as the engine produces them, the
        echoed prompts first."""
        metrics = self.state.metrics
        async with contextlib.aclosing(_merge(self.requests)) as events:
            async for p, event in events:
                if self.body.echo and p not in self.echoed:
                    self.echoed.add(p)
                    for choice in self.choices[p * self.n:(p + 1) * self.n]:
                        text, piece = choice.add_echo(self.prepared.prompts[p], self.prepared.prompt_ids[p],
                                                      self.requests[p].prompt_logprobs)
                        yield choice, text, piece, False
                if event.finish_reason == "error":
                    self.status = "error"
                    message = self.requests[p].error or "generation failed"
                    raise ApiError(500, f"generation failed: {message}", type="server_error", code="engine_error")
                if event.finish_reason == "cancelled" and not self.client_gone:
                    self.status = "error"
                    raise ApiError(503, "the server stopped before this request finished", type="unavailable_error",
                                   code="shutdown")
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


# --- the shell: API key, replica header, errors ---------------------------------------------------------


class _Shell:
    """ASGI middleware: the replica header on every response; the API key on every route but the open ones
    (compared in constant time)."""

    def __init__(self, app, state: _State):
        self.app = app
        self.state = state
        self.header = (b"x-gpt2onnx-replica", state.replica.encode("latin-1", "replace"))

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_tagged(message):
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), self.header]
            await send(message)

        if self.state.keys and not _is_open(scope["path"]) and not self._authorized(scope):
            self.state.metrics.rejected.labels("unauthorized").inc()
            response = JSONResponse(error_body("Incorrect API key provided: pass it as 'Authorization: Bearer "
                                               "KEY' (the openai client's api_key)", code="invalid_api_key"),
                                    status_code=401, headers={"WWW-Authenticate": "Bearer"})
            return await response(scope, receive, send_tagged)
        await self.app(scope, receive, send_tagged)

    def _authorized(self, scope) -> bool:
        given = b""
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                given = token.strip() if scheme.lower() == b"bearer" else b""
        matches = [hmac.compare_digest(given, key) for key in self.state.keys]  # every key, no early exit
        return any(matches)


def _is_open(path: str) -> bool:
    return path in _OPEN_PATHS or path.startswith("/static/")


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
    if name is not None and name != state.options.model_name:
        raise _model_not_found(name, state.options.model_name)


# --- running it: uvicorn with a drain on SIGTERM -----------------------------------------------------------


def serve(engine: EngineClient | None = None, options: ServerOptions = ServerOptions(), *,
          load: Callable[[Callable[[int], None]], EngineClient] | None = None, host: str = "127.0.0.1",
          port: int = 8000, log_level: str = "info") -> int:
    """Run the app until SIGTERM / Ctrl-C (drained). Returns 0; raises ModelLoadError when the model could not
    be loaded (the server then stops), InvalidArgumentError when host:port cannot be bound. `engine` and `load`
    as in create_app."""
    _check_address(host, port)
    app = create_app(engine, options, load=load)
    state: _State = app.state.gpt2onnx
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5,
                            lifespan="on")
    server = _DrainingServer(config, state)
    state.on_load_error = server.stop
    server.run()
    if state.load_error is not None:
        raise ModelLoadError(f"the model failed to load: {state.load_error}", hint=state.load_hint)
    return 0


def _check_address(host: str, port: int) -> None:
    """Fail with one line now rather than with uvicorn's log after the model started loading."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as error:
        raise InvalidArgumentError(f"cannot listen on {host}:{port}: {error.strerror}",
                                   hint="pick another --port, or stop the process that uses it") from None


class _DrainingServer(uvicorn.Server):
    """uvicorn's Server, except that the first SIGTERM / SIGINT drains before it stops (a second one stops at
    once): /health and new requests get 503 while the requests in flight finish, for at most drain_timeout
    seconds; those still running then end with an error event. The process then exits 0, not by the signal."""

    def __init__(self, config, state: _State):
        super().__init__(config)
        self.state = state
        self.loop: asyncio.AbstractEventLoop | None = None

    async def startup(self, sockets=None):
        self.loop = asyncio.get_running_loop()
        await super().startup(sockets)

    def handle_exit(self, sig, frame):
        if self.state.draining or self.should_exit or self.loop is None:
            self.force_exit = self.force_exit or self.should_exit or self.state.draining
            self.should_exit = True
            return
        self.state.draining = True
        log.info("draining: %d request(s) in flight (stopping in at most %.0f s; signal again to stop now)",
                 self.state.in_flight, self.state.options.drain_timeout)
        self.loop.call_soon_threadsafe(lambda: self.loop.create_task(self.drain()))

    async def drain(self):
        state = self.state
        deadline = time.monotonic() + state.options.drain_timeout
        while state.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if state.in_flight and state.engine is not None and state.owns_engine:  # out of time: end them
            log.warning("drain timeout: cancelling %d request(s)", state.in_flight)
            await asyncio.to_thread(state.engine.close, drain=False)
            stop = time.monotonic() + 2
            while state.in_flight and time.monotonic() < stop:
                await asyncio.sleep(0.05)
        self.should_exit = True

    def stop(self):
        self.should_exit = True
