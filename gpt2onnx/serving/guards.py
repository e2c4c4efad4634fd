"""What a request must show before the app reads it: ASGI middleware around the app, outermost first.

    ReplicaHeader   `x-gpt2onnx-replica` on every response, the refusals below included
    RequestGuard    the Host header names this server (DNS rebinding), an Origin header is this server's own
                    page or an allowed one (CSRF; Starlette's CORSMiddleware, inside it, answers the allowed
                    origins' preflights), a POST says `Content-Type: application/json` (which a page of another
                    origin cannot send without a preflight)
    ApiKey          `Authorization: Bearer KEY` on every route but the open ones, compared in constant time
    BodyReader      the body whole within the read timeout and the size limit, else 408 / 413; a client that
                    hangs up while sending it is one log line, and the app never runs

Each refusal is an OpenAI error body, counted in `gpt2onnx_rejected_total{reason}`. The rules:

    Host     a loopback name (localhost, 127.0.0.0/8, ::1), the address the client connected to, or a name
             in allowed_hosts ("*.example.com" for its subdomains, "*" for any). A page that rebinds its own
             name to 127.0.0.1 still sends its name, so it is refused; on a server bound to loopback only
             loopback names pass. An HTTP/1.0 request without Host passes: browsers always send one.
    Origin   absent (not a browser, or a same-origin GET), equal to scheme://Host (the playground), or in
             allowed_origins ("*" for any). Refused with 403 otherwise, preflights included.
    POST     application/json (any parameters, e.g. charset), else 415, on the routes that take a POST (elsewhere
             the router's 404 or 405 comes first).
    HTTP/1.1 without Host: 400 (RFC 9112 3.2).
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import time
from collections.abc import Awaitable, Callable

from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse

from .openai_api import ApiError
from .options import ServerOptions

log = logging.getLogger("gpt2onnx.serving")
MAX_BODY_BYTES = 8 * 2**20  # a full 1,024-token context is ~10 KB of text or ids: 8 MB is far beyond any use
OPEN_PATHS = ("/health", "/", "/favicon.ico")  # and /static/*: the playground's page asks for the key itself
EXPOSED_HEADERS = ("x-gpt2onnx-seed", "x-gpt2onnx-replica", "retry-after")  # what an allowed page may read

# reject(reason, error, close=False): counts the refusal by reason and returns the ASGI app that answers it (close:
# the connection closes after it, as when the body was not read)
Reject = Callable[..., Callable[..., Awaitable[None]]]


def add_guards(app, options: ServerOptions, *, replica: str, reject: Reject) -> None:
    """Wrap `app` (a Starlette/FastAPI app) in the guards, in the order of the module docstring."""
    app.add_middleware(BodyReader, max_bytes=MAX_BODY_BYTES, timeout=options.read_timeout, reject=reject)
    app.add_middleware(ApiKey, keys=options.api_keys, reject=reject)
    if options.allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(options.allowed_origins),
                           allow_methods=["GET", "POST", "OPTIONS"], allow_headers=["*"],
                           expose_headers=list(EXPOSED_HEADERS))
    def posted() -> frozenset[str]:  # the paths of the app's POST routes (read once they are all added)
        return frozenset(route.path for route in app.routes if "POST" in (getattr(route, "methods", None) or ()))

    app.add_middleware(RequestGuard, allowed_hosts=options.allowed_hosts, allowed_origins=options.allowed_origins,
                       posted=posted, reject=reject)
    app.add_middleware(ReplicaHeader, replica=replica)


def refusal(error: ApiError, *, close: bool = False) -> JSONResponse:
    """The response for `error`; close: the connection closes after it (its body was not read)."""
    headers = {**error.headers, **({"Connection": "close"} if close else {})}
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


# --- the rules, as pure functions ------------------------------------------------------------------------


def host_allowed(host: str | None, local_address: str | None, allowed: tuple[str, ...]) -> bool:
    """Whether a Host header names this server (see the module docstring); `local_address` is the address the
    connection came in on (the ASGI scope's "server"), `allowed` ServerOptions.allowed_hosts."""
    if host is None or "*" in allowed:
        return True
    name = host_name(host)
    if name is None:
        return False
    if name == "localhost" or name == (local_address or "").lower() or _loopback(name):
        return True
    return any(name == pattern or (pattern.startswith("*.") and name.endswith(pattern[1:])) for pattern in allowed)


def host_name(host: str) -> str | None:
    """"Example.COM.:8000" -> "example.com", "[::1]:80" -> "::1"; None when it is no host[:port]."""
    host = host.strip().lower()
    if host.startswith("["):
        name, bracket, rest = host[1:].partition("]")
        if not bracket or (rest and not (rest.startswith(":") and rest[1:].isdigit())):
            return None
    else:
        name, colon, port = host.partition(":")
        if colon and not port.isdigit():
            return None
    name = name.rstrip(".")
    return name if name and all(c.isalnum() or c in "-._:" for c in name) else None


def origin_allowed(origin: str, host: str | None, allowed: tuple[str, ...]) -> bool:
    """Whether a request with this Origin header may go on: the page is this server's own (its scheme://
    authority names the Host the request was sent to), or it is in ServerOptions.allowed_origins."""
    origin = origin.strip().lower()
    if "*" in allowed or origin in allowed:
        return True
    scheme, sep, authority = origin.partition("://")
    return bool(sep) and scheme in ("http", "https") and host is not None and authority == host.strip().lower()


def is_json(content_type: str | None) -> bool:
    return content_type is not None and content_type.split(";")[0].strip().lower() == "application/json"


def _loopback(name: str) -> bool:
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _header(scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


def _has_body(scope) -> bool:
    """Whether the request announces a body: refused unread, its connection then closes (what is left of the
    body would otherwise come where the next request should)."""
    length = _header(scope, b"content-length")
    return _header(scope, b"transfer-encoding") is not None or (length is not None and length.strip() != "0")


def _client(scope) -> str:
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else "?"


# --- the middleware ------------------------------------------------------------------------------------------


class ReplicaHeader:
    """`x-gpt2onnx-replica: REPLICA` on every HTTP response."""

    def __init__(self, app, replica: str):
        self.app = app
        self.header = (b"x-gpt2onnx-replica", replica.encode("latin-1", "replace"))

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def tagged(message):
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), self.header]
            await send(message)

        await self.app(scope, receive, tagged)


class RequestGuard:
    """Host, Origin and a POST's Content-Type, from the headers alone (the rules in the module docstring)."""

    def __init__(self, app, *, allowed_hosts: tuple[str, ...], allowed_origins: tuple[str, ...],
                 posted: Callable[[], frozenset[str]], reject: Reject):
        self.app, self.allowed_hosts, self.allowed_origins, self.reject = app, allowed_hosts, allowed_origins, reject
        self.posted, self.json_paths = posted, None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        error = self.check(scope)
        if error is not None:
            reason, problem = error
            return await self.reject(reason, problem, close=_has_body(scope))(scope, receive, send)
        await self.app(scope, receive, send)

    def check(self, scope) -> tuple[str, ApiError] | None:
        host = _header(scope, b"host")
        if host is None and scope.get("http_version") == "1.1":  # RFC 9112 3.2 (HTTP/1.0 may leave it out)
            return "bad_host", ApiError(400, "an HTTP/1.1 request must have a Host header", code="invalid_host")
        server = scope.get("server")
        if not host_allowed(host, server[0] if server else None, self.allowed_hosts):
            return "bad_host", ApiError(400, f"Host {host!r} does not name this server; a name it should answer to "
                                             "must be listed in its --allowed-hosts", code="invalid_host")
        origin = _header(scope, b"origin")
        if origin is not None and not origin_allowed(origin, host, self.allowed_origins):
            return "cross_origin", ApiError(403, f"requests from the web page at {origin!r} are not allowed: list "
                                                 "its origin in the server's --allowed-origins",
                                            type="permission_error", code="origin_not_allowed")
        if self.json_paths is None:
            self.json_paths = self.posted()
        given = _header(scope, b"content-type")  # checked where a POST is taken (elsewhere: the router's 404 / 405)
        if scope["method"] == "POST" and scope["path"] in self.json_paths and not is_json(given):
            return "content_type", ApiError(415, f"a POST must have Content-Type: application/json (got "
                                                 f"{given or 'none'})", code="unsupported_media_type")
        return None


class ApiKey:
    """The API key on every route but OPEN_PATHS and /static/* (no keys: nothing to check). `Bearer` is
    matched in any case, and spaces around the key are ignored; every key is compared, in constant time."""

    def __init__(self, app, *, keys: tuple[str, ...], reject: Reject):
        self.app, self.keys, self.reject = app, [key.encode() for key in keys], reject
        self.error = ApiError(401, "Incorrect API key provided: pass it as 'Authorization: Bearer KEY' (the "
                                   "openai client's api_key)", code="invalid_api_key",
                              headers={"WWW-Authenticate": "Bearer"})

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and self.keys and not _is_open(scope["path"]) and not self.authorized(scope):
            return await self.reject("unauthorized", self.error, close=_has_body(scope))(scope, receive, send)
        await self.app(scope, receive, send)

    def authorized(self, scope) -> bool:
        given = b""
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, token = value.strip().partition(b" ")
                given = token.strip() if scheme.lower() == b"bearer" else b""
        matches = [hmac.compare_digest(given, key) for key in self.keys]  # every key, no early exit
        return any(matches)


def _is_open(path: str) -> bool:
    return path in OPEN_PATHS or path.startswith("/static/")


class BodyReader:
    """Reads a POST's body before the app runs: whole within `timeout` seconds and at most `max_bytes` (a
    Content-Length over it is refused before a byte is read), else 408 / 413 and the connection closes. A
    client that hangs up meanwhile costs one log line. The app then gets the body in one message, and the
    client's later messages (its disconnect) as they come."""

    def __init__(self, app, *, max_bytes: int, timeout: float, reject: Reject):
        self.app, self.max_bytes, self.timeout, self.reject = app, max_bytes, timeout, reject

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        declared = _header(scope, b"content-length")
        if declared is not None and declared.strip().isdigit() and int(declared) > self.max_bytes:
            return await self.too_large(scope, receive, send)
        body, deadline = bytearray(), time.monotonic() + self.timeout
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:  # answered: the access log has its line
                error = ApiError(408, f"the request body did not arrive within {self.timeout:g} s ({len(body)} of "
                                      f"{declared or '?'} bytes came)", code="request_timeout")
                return await self.reject("read_timeout", error, close=True)(scope, receive, send)
            if message["type"] == "http.disconnect":
                return _abandoned(scope, f"the client hung up after {len(body)} of {declared or '?'} body bytes",
                                  len(body))
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                return await self.too_large(scope, receive, send)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)

    async def too_large(self, scope, receive, send):
        error = ApiError(413, f"the request body is over {self.max_bytes} bytes, the most accepted",
                         code="request_too_large")
        await self.reject("too_large", error, close=True)(scope, receive, send)


def _abandoned(scope, what: str, received: int) -> None:
    """The one log line of a request whose client never finished sending it."""
    log.info("abandoned %s %s from %s: %s", scope["method"], scope["path"], _client(scope), what,
             extra={"event": "abandoned", "client": _client(scope), "method": scope["method"], "path": scope["path"],
                    "received_bytes": received})
