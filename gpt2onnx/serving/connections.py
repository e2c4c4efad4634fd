"""The connections of `gpt2onnx serve`: uvicorn's HTTP protocol, plus a deadline for a request's headers and a
cap on open connections, so that slow or silent clients cannot hold the server's descriptors.

uvicorn bounds an idle keep-alive connection (timeout_keep_alive) but neither the time a client takes to send
a request's headers nor their size (with httptools): a client that connects and sends half a request line holds
its socket forever, and one that sends 50 MB of headers is read whole. Here each connection must complete its
request's headers within `read_timeout` seconds of connecting (or of its previous response), else it is
closed, and within MAX_HEADER_BYTES, else 431 and closed; the body has as long again (guards.BodyReader). A
request that arrives while more than `limit` connections are open or more than `limit` requests run gets 503
with Retry-After (uvicorn's limit_concurrency, answered in OpenAI's shape), and a connection beyond
`max_connections` is closed as soon as it opens, so the sockets a server holds never pass max_connections
whatever the rate of new ones.

The protocol is a subclass of uvicorn's own (httptools, or h11 without it) that relies on a few of its
attributes: checked on uvicorn 0.55; on a version without them the server keeps uvicorn's plain protocol and
its limit_concurrency, and logs that its header timeout is off.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource

log = logging.getLogger("gpt2onnx.serving")
CHECKED_ON = ("0.55",)  # uvicorn versions whose protocol classes (httptools and h11) this subclass was read against
_ATTRIBUTES = ("app", "cycle", "connections", "tasks", "transport", "loop", "limit_concurrency", "client")
RESERVED_DESCRIPTORS = 128  # kept for the model's files, the logs, the engine's threads and the listening socket
MAX_HEADER_BYTES = 64 * 1024  # a request line and headers; ours need a few hundred bytes (nginx's default: 8-32 KiB)
_TOO_LARGE = json.dumps({"error": {"message": f"the request's headers are over {MAX_HEADER_BYTES} bytes",
                                   "type": "invalid_request_error", "param": None,
                                   "code": "request_header_fields_too_large"}}).encode()


def guarded_protocol(base: type, *, read_timeout: float, limit: int, max_connections: int, busy,
                     count=lambda reason: None) -> type:
    """A subclass of uvicorn's protocol class `base` with the header deadline and the caps of the module
    docstring; `busy` is the ASGI app that answers a request beyond `limit`, `count(reason)` counts the other
    refusals. A connection whose protocol lacks an attribute this relies on (another uvicorn) is served by
    `base` as it is, with uvicorn's own limit_concurrency, and a warning is logged once."""

    class GuardedProtocol(base):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._deadline: asyncio.TimerHandle | None = None
            self._header_bytes = 0  # received while waiting for a request's headers
            self._lingering = False  # answered 431: what still comes is dropped until the connection closes
            self._guarded = all(hasattr(self, name) for name in _ATTRIBUTES)
            if self._guarded:
                self._inner_app, self.app = self.app, self._admit
                self.limit_concurrency = None  # ours, in _admit, answered in OpenAI's shape
            else:
                self.limit_concurrency = limit
                _unguarded(base)

        def connection_made(self, transport):
            super().connection_made(transport)
            if not self._guarded:
                return
            if len(self.connections) > max_connections:
                _closed_at_accept(max_connections)
                transport.close()
                return
            self._arm()

        def connection_lost(self, exc):
            self._disarm()
            super().connection_lost(exc)

        def data_received(self, data):
            if self._lingering:
                return
            before = self.cycle
            super().data_received(data)
            if not self._guarded or self.transport.is_closing():
                return
            if self.cycle is before and (before is None or before.response_complete):  # still no whole headers
                self._header_bytes += len(data)
                if self._header_bytes > MAX_HEADER_BYTES:
                    self._too_large()
            else:
                self._header_bytes = 0

        def _too_large(self):
            """Answer 431 and close, after a second's lingering: a client still sending its headers then reads
            the answer instead of a reset."""
            count("too_large")
            self.transport.write(b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json"
                                 b"\r\nconnection: close\r\ncontent-length: %d\r\n\r\n" % len(_TOO_LARGE) + _TOO_LARGE)
            if self.transport.can_write_eof():
                self.transport.write_eof()
            self._lingering = True
            self._disarm()
            self.loop.call_later(1.0, self.transport.close)

        def on_response_complete(self):
            super().on_response_complete()
            if self._guarded and not self.transport.is_closing():
                self._arm()  # the next request's headers have as long again

        async def _admit(self, scope, receive, send):
            if len(self.connections) > limit or len(self.tasks) > limit:  # both count this one
                return await busy(scope, receive, send)
            await self._inner_app(scope, receive, send)

        def _arm(self):
            self._disarm()
            self._header_bytes = 0
            self._deadline = self.loop.call_later(read_timeout, self._headers_late, self.cycle)

        def _disarm(self):
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _headers_late(self, cycle):
            """Close the connection if it still waits for a request's headers: no request began since the
            deadline was set (a request whose headers came has a new cycle) and none is being answered."""
            self._deadline = None
            waiting = self.cycle is cycle and (cycle is None or cycle.response_complete)
            if waiting and not self.transport.is_closing():
                client = "%s:%d" % self.client if self.client else "?"
                log.info("closed the connection from %s: no complete request headers within %g s", client,
                         read_timeout, extra={"event": "header_timeout", "client": client})
                self.transport.close()

    GuardedProtocol.__name__ = GuardedProtocol.__qualname__ = f"Guarded{base.__name__}"
    return GuardedProtocol


_counts = {"closed_at_accept": 0, "unguarded": 0}


def _closed_at_accept(cap: int) -> None:
    _counts["closed_at_accept"] += 1
    closed = _counts["closed_at_accept"]
    if closed in (1, 10, 100) or closed % 1000 == 0:  # a flood is a few lines, not one per connection
        log.warning("%d connections open, the most this server holds: %d new one(s) closed at once so far", cap,
                    closed, extra={"event": "connection_cap", "closed": closed})


def _unguarded(base: type) -> None:
    _counts["unguarded"] += 1
    if _counts["unguarded"] == 1:
        import uvicorn

        log.warning("uvicorn %s's %s lacks an attribute the header timeout relies on (checked on uvicorn %s): "
                    "connections have no header deadline, only uvicorn's own limits", uvicorn.__version__,
                    base.__name__, ", ".join(CHECKED_ON))


def raise_open_files_limit() -> int:
    """Raise this process's soft limit of open descriptors to its hard limit (2**20 at most); returns the soft
    limit in force. Many systems start processes at 1,024, which a few hundred slow clients would exhaust."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 2**20 if hard == resource.RLIM_INFINITY else min(hard, 2**20)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError):
            pass
    return min(soft, 2**20) if soft != resource.RLIM_INFINITY else 2**20


def connection_cap(limit: int, open_files: int) -> int:
    """The most connections the server holds: twice `limit` (those beyond `limit` still hear a 503), within the
    descriptors the process may open."""
    cap = min(2 * limit, max(1, open_files - RESERVED_DESCRIPTORS))
    if cap < limit:
        log.warning("this process may open %d descriptors: it holds at most %d connections, fewer than "
                    "--limit-concurrency %d (raise the hard limit: ulimit -Hn, or systemd's LimitNOFILE)",
                    open_files, cap, limit)
    return cap
