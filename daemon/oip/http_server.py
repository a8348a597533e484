"""The OIP front's HTTP/1.1 server: an asyncio protocol on httptools (the C parser uvicorn uses),
with one handler for every request and nothing else per request.

aiohttp's server, even its low-level one, builds a request object, a payload stream, a response
object with its own header multidict and writer, and runs a task per request through several
layers: about half the front's CPU for a small binary inference (docs/oip.md, "Measured"). The
front needs none of it: its requests are small and whole (a JSON header and a frame or a few),
read into memory before the handler runs, and its replies are one bytes object.

    bytes in  -> httptools.HttpRequestParser -> Request (method, path, lower-case headers, body)
              -> handler(request) -> Response -> one transport.write

A connection handles one request at a time, in order (HTTP/1.1 pipelining: requests that arrive
meanwhile wait, reading pauses once ``MAX_PIPELINED`` do). A body over ``max_body`` is answered
413 and the connection closes; a malformed request 400, a request line and headers over
``MAX_HEAD_BYTES`` 431, then close. ``Expect: 100-continue`` is
answered "100 Continue" (what curl sends before a large body) unless the body would be too
large. A connection that has no request under way and has sent nothing for ``idle_timeout_s``
is closed (idle keep-alive, or a request that stopped half way). TLS is the loop's own (the
``ssl`` context given to ``start``).

``close(grace)`` stops accepting, closes idle connections, lets requests under way finish and
answer (their connections then close) for up to ``grace`` seconds, and aborts what is left.
"""
from __future__ import annotations

import asyncio
import collections
import email.utils
import json
import logging
import time
from urllib.parse import unquote

import httptools

log = logging.getLogger("inferd.oip.http")
#: requests parsed and waiting behind the one being handled, before the connection stops reading
MAX_PIPELINED = 8
#: bytes a request's line and headers may take (counted by the reads they arrive in, so a read
#: that also carries the start of the body counts whole); over it: 431, then close
MAX_HEAD_BYTES = 1 << 20
_REASONS = {100: "Continue", 200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden",
            404: "Not Found", 405: "Method Not Allowed", 413: "Content Too Large", 431: "Request Header Fields Too Large", 429: "Too Many Requests",
            500: "Internal Server Error", 503: "Service Unavailable", 504: "Gateway Timeout"}
_STATUS_LINES: dict = {}


def _status_line(status: int) -> bytes:
    line = _STATUS_LINES.get(status)
    if line is None:
        line = _STATUS_LINES[status] = f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}\r\n".encode()
    return line


class Response:
    """A whole reply: ``status``, ``body`` (bytes), ``content_type`` and any further ``headers``."""
    __slots__ = ("status", "body", "content_type", "headers")

    def __init__(self, status: int = 200, body: bytes = b"", content_type: str = "application/octet-stream",
                 headers: dict | None = None):
        self.status = status
        self.body = body
        self.content_type = content_type
        self.headers = headers


class Request:
    """One whole request. ``headers`` maps lower-case names to values (the last of a repeated
    name); ``path`` is percent-decoded, without the query; ``connection`` is the Connection it
    came on (its ``transport``, and ``memo`` for what a handler keeps per connection)."""
    __slots__ = ("method", "path", "headers", "body", "connection", "keep_alive", "received", "waited")

    def __init__(self, method: str, path: str, headers: dict, body: bytes, connection: "Connection",
                 keep_alive: bool, received: float):
        # perf_counter() when its last bytes were parsed (a client may send the head and the body
        # in two writes: the time between them is the client's, not the server's)
        self.received = received
        self.waited = 0.0                       # seconds its handler waited for the daemon (timings.py)
        self.method = method
        self.path = path
        self.headers = headers
        self.body = body
        self.connection = connection
        self.keep_alive = keep_alive

    @property
    def transport(self):
        return self.connection.transport


class _Clock:
    """The Date header, formatted once a second."""

    def __init__(self):
        self._second = 0
        self._header = b""

    def date(self) -> bytes:
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._header = b"Date: " + email.utils.formatdate(now, usegmt=True).encode() + b"\r\n"
        return self._header


class Connection(asyncio.Protocol):
    """One client connection: the parser's callbacks build Requests; one handler task at a time."""

    def __init__(self, server: "HttpServer"):
        self.server = server
        self.transport = None
        self.memo = None                        # a handler's per-connection value (the peer's principal)
        self.last_data = time.monotonic()
        self._parser = httptools.HttpRequestParser(self)
        self._url = b""
        self._headers: dict = {}
        self._body: list = []
        self._size = 0
        self._head = 0                          # bytes read since the last head completed, outside bodies
        self._in_body = False
        self._refused = False                   # a 413 was answered: discard the body, then close
        self._queue: collections.deque = collections.deque()
        self._task: asyncio.Task | None = None
        self._closing = False
        self._paused = False

    # asyncio.Protocol -----------------------------------------------------------------------------
    def connection_made(self, transport) -> None:
        self.transport = transport
        self.server.connections.add(self)

    def connection_lost(self, exc) -> None:
        self.server.connections.discard(self)
        self._queue.clear()
        self.transport = None
        self.server.gone()

    def data_received(self, data: bytes) -> None:
        self.last_data = time.monotonic()
        if not self._in_body:                       # a head under way, or the next one may begin here
            self._head += len(data)
            if self._head > MAX_HEAD_BYTES:
                self._fail(431, f"the request's line and headers are over {MAX_HEAD_BYTES} bytes")
                return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(400, "protocol upgrades are not served here")
        except httptools.HttpParserError as exc:
            self._fail(400, f"malformed HTTP request: {exc}")

    def pause_writing(self) -> None:            # a caller that does not read its replies
        self._set_reading(False)

    def resume_writing(self) -> None:
        self._set_reading(True)

    # httptools' callbacks ---------------------------------------------------------------------------
    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = {}
        self._body = []
        self._size = 0
        self._refused = False

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self._in_body = True
        self._head = 0
        length = self._headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.server.max_body:
            self._too_large(int(length))
        elif (self._headers.get("expect", "").lower() == "100-continue" and self._task is None
              and not self._queue):
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        if self._refused:
            return
        self._size += len(body)
        if self._size > self.server.max_body:
            self._too_large(self._size)
            return
        self._body.append(body)

    def on_message_complete(self) -> None:
        self._in_body = False
        if self._refused:
            self._closing = True
            if self._task is None and not self._queue:
                self.transport.close()
            return
        url = self._url
        if b"?" in url or b"#" in url:
            url = httptools.parse_url(url).path
        path = url.decode("latin-1")
        if "%" in path:
            path = unquote(path)
        body = self._body[0] if len(self._body) == 1 else b"".join(self._body)
        parser = self._parser
        request = Request(parser.get_method().decode("latin-1"), path, self._headers, body, self,
                          parser.should_keep_alive(), time.perf_counter())
        self._body = []
        if self._task is None:
            self._start(request)
        else:
            self._queue.append(request)
            if len(self._queue) >= MAX_PIPELINED:
                self._set_reading(False)

    # requests -------------------------------------------------------------------------------------
    def _start(self, request: Request) -> None:
        self._task = self.server.loop.create_task(self._handle(request))

    async def _handle(self, request: Request) -> None:
        try:
            response = await self.server.handler(request)
        except Exception:                           # the handler's own guard missed it: this request only
            log.exception("%s %s failed", request.method, request.path)
            response = Response(500, b'{"error":"internal error in the OIP front; its log says more"}',
                                "application/json")
        self._task = None
        if self.transport is None:
            return
        close = self._closing or not request.keep_alive or self.server.closing
        self._write(response, request.method == "HEAD", close)
        if self.server.timings is not None:
            self.server.timings.add(request.received, request.waited)
        if close:
            self.transport.close()
            return
        if self._queue:
            self._start(self._queue.popleft())
            if len(self._queue) < MAX_PIPELINED:
                self._set_reading(True)
        else:
            self.last_data = time.monotonic()       # idle from now: the idle timeout counts from the reply

    def _write(self, response: Response, head_only: bool, close: bool) -> None:
        body = response.body
        parts = [_status_line(response.status), self.server.clock.date(),
                 b"Server: inferd\r\nContent-Type: ", response.content_type.encode(),
                 b"\r\nContent-Length: ", str(len(body)).encode(), b"\r\n"]
        if response.headers:
            for name, value in response.headers.items():
                parts.append(f"{name}: {value}\r\n".encode("latin-1"))
        if close:
            parts.append(b"Connection: close\r\n")
        parts.append(b"\r\n")
        if head_only or not body:
            self.transport.write(b"".join(parts))
        elif len(body) <= 65536:
            parts.append(body)
            self.transport.write(b"".join(parts))
        else:                                       # a large body is not copied into the head's buffer
            self.transport.writelines([b"".join(parts), body])

    def _too_large(self, size: int) -> None:
        self._refused = True
        self._body = []
        self._reply_now(413, f"the request body of {size} bytes is over the {self.server.max_body} this door "
                             "takes; raise oip.max_request_bytes or send fewer images per request")

    def _fail(self, status: int, message: str) -> None:
        self._reply_now(status, message)
        self._set_reading(False)                    # nothing more is read from this connection
        self._closing = True
        self._queue.clear()
        if self._task is None and self.transport is not None:
            self.transport.close()

    def _reply_now(self, status: int, message: str) -> None:
        """An error the server answers itself (413, 400), ahead of nothing else on the connection."""
        if self.transport is None or self._task is not None or self._queue:
            self._closing = True                    # a reply is owed first: close once it is written
            return
        self._write(Response(status, json.dumps({"error": message}).encode(), "application/json"), False, True)

    def _set_reading(self, on: bool) -> None:
        if self.transport is None or on != self._paused:
            return
        self._paused = not on
        (self.transport.resume_reading if on else self.transport.pause_reading)()

    # the server's view ----------------------------------------------------------------------------
    def busy(self) -> bool:
        return self._task is not None or bool(self._queue)

    def abort(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self.transport is not None:
            self.transport.abort()


class HttpServer:
    """``handler`` (an async function of a Request, returning a Response) served on one listening
    socket (``start``), until ``close``."""

    def __init__(self, handler, *, max_body: int, idle_timeout_s: float):
        self.handler = handler
        self.max_body = max_body
        self.idle_timeout_s = idle_timeout_s
        self.connections: set[Connection] = set()
        self.clock = _Clock()
        self.timings = None                     # a Timings (daemon/oip/timings.py) when measured
        self.closing = False
        self.loop = None
        self._server = None
        self._sweeper = None
        self._emptied = None

    async def start(self, *, sock=None, host: str | None = None, port: int = 0, ssl=None) -> int | None:
        """Listen on ``sock`` (a bound socket, such as a Unix one) or on ``host``:``port`` (with
        ``ssl``, a server-side SSLContext, for HTTPS); the TCP port bound (port 0: the kernel's
        choice), None for ``sock``."""
        self.loop = asyncio.get_running_loop()
        if sock is not None:
            self._server = await self.loop.create_server(lambda: Connection(self), sock=sock, ssl=ssl)
        else:
            self._server = await self.loop.create_server(lambda: Connection(self), host, port, ssl=ssl,
                                                         reuse_address=True)
        self._sweeper = self.loop.call_later(self._sweep_every(), self._sweep)
        return None if sock is not None else self._server.sockets[0].getsockname()[1]

    def _sweep_every(self) -> float:
        return min(max(self.idle_timeout_s / 4, 0.05), 1.0)

    def _sweep(self) -> None:
        """Close the connections with no request under way that sent nothing for idle_timeout_s
        (one timer for the server, not one per request)."""
        old = time.monotonic() - self.idle_timeout_s
        for conn in [c for c in self.connections if not c.busy() and c.last_data < old]:
            conn.transport.close()
        self._sweeper = self.loop.call_later(self._sweep_every(), self._sweep)

    def gone(self) -> None:
        if self._emptied is not None and not self.connections:
            self._emptied.set()

    async def close(self, grace: float) -> None:
        """Stop accepting; requests under way answer within ``grace`` seconds, then the rest is cut."""
        if self._server is None:
            return
        self.closing = True
        self._server.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
        for conn in list(self.connections):
            if not conn.busy() and conn.transport is not None:
                conn.transport.close()
        self._emptied = asyncio.Event()
        if self.connections:
            try:
                await asyncio.wait_for(self._emptied.wait(), grace)
            except TimeoutError:
                for conn in list(self.connections):
                    conn.abort()
        await self._server.wait_closed()
        self._server = None
