"""The API port's HTTP/1.1 server: aiohttp's C request parser, answers written as bytes.

aiohttp's ``web.Server`` builds a ``BaseRequest``, a ``StreamResponse`` with
multidict headers and a ``StreamWriter`` for every request: under the relay
benchmark that machinery was about a quarter of cortex's CPU (bench/README.md).
Here aiohttp's parser (llhttp) still reads requests and its ``StreamReader``
still carries bodies, but an answer is a status line and headers formatted
into bytes, sent together with the first chunk of the body; a stream's last
chunk goes out with its terminator.

A connection is also where two limits are enforced: a request must be whole
within ``receive_timeout`` of its first byte (slowloris, stalled bodies), and
an idle keep-alive connection closes after ``keepalive_timeout``. One timer
sweeps every connection four times a second for both, and refreshes the
``Date`` header: nothing is scheduled per request.

A client that disconnects cancels the task answering it, and with it the
request to the node.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from email.utils import formatdate
from http import HTTPStatus

from aiohttp.http_exceptions import (
    BadHttpMethod,
    BadStatusLine,
    ContentLengthError,
    HttpProcessingError,
    InvalidHeader,
    InvalidURLError,
    LineTooLong,
    TransferEncodingError,
)
from aiohttp.http_parser import HttpRequestParser, RawRequestMessage
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestPayloadError
from multidict import CIMultiDictProxy

from cortex.flow import ResumeWhenPaused

log = logging.getLogger("cortex.http")

SWEEP_S = 0.25
# After an answer sent before its request's body was read, how long the rest of
# that body is read and dropped so that the client can read the answer (closing
# with unread data would reset the connection under it).
LINGER_S = 10.0
_READ_LIMIT = 1 << 16
_MAX_QUEUED = 32  # parsed pipelined requests; reading pauses beyond this
_MAX_HEADERS = 128
_MAX_LINE = 8190
# All of a request's head: the per-line and per-count limits alone let ~1 MB through.
# (nginx refuses past 32 KB; SDKs and Claude Code send a few KB.)
MAX_HEAD = 64 * 1024
_STATUS_LINES = {s.value: f"HTTP/1.1 {s.value} {s.phrase}\r\n" for s in HTTPStatus}
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_LAST_CHUNK = b"0\r\n\r\n"
_CHUNKED = "Transfer-Encoding: chunked\r\n"
_EMPTY_LINES = (b"\r\n", b"\n")


class HeadTooLarge(HttpProcessingError):
    code = 431
    message = "request header fields too large"


class TooLarge(Exception):
    """A request body over the limit given to :meth:`Request.read`."""


class BadBody(Exception):
    """A request body that is not valid HTTP framing (a bad chunk size, cut short)."""


class Request:
    """What a handler sees of one request."""

    __slots__ = ("_conn", "_continued", "content", "headers", "method", "path", "target", "version")

    def __init__(self, conn: Connection, message: RawRequestMessage, payload: StreamReader) -> None:
        self._conn = conn
        self.method: str = message.method
        self.target: str = message.path  # as sent: maybe %-encoded, with a query
        path = self.target
        if "?" in path or "%" in path or "#" in path or path[:1] != "/":
            path = message.url.path
        self.path = path
        self.headers: CIMultiDictProxy[str] = message.headers
        self.version: tuple[int, int] = message.version
        self.content = payload
        self._continued = False  # "100 Continue" sent

    @property
    def remote(self) -> str:
        return self._conn.peer

    @property
    def transport(self) -> asyncio.Transport | None:
        return self._conn.transport

    @property
    def content_length(self) -> int | None:
        length = self.headers.get("Content-Length")
        return int(length) if length is not None else None  # the parser checked it is a number

    async def read(self, limit: int) -> bytes:
        """The whole body; :class:`TooLarge` as soon as more than ``limit`` bytes came."""
        payload = self.content
        try:
            if payload.is_eof():
                body = payload.read_nowait()
            else:
                if self._expects_continue():
                    self._continued = True
                    self._conn.send(_CONTINUE)
                body = await _read_all(payload, limit)
        except RequestPayloadError as exc:
            raise BadBody(str(exc)) from None
        if len(body) > limit:
            raise TooLarge(len(body))
        return body

    def _expects_continue(self) -> bool:
        """The client waits for "100 Continue" before it sends the body (HTTP/1.1 only)."""
        if self._continued or self.version < (1, 1):
            return False
        return self.headers.get("Expect", "").lower() == "100-continue"


async def _read_all(payload: StreamReader, limit: int) -> bytes:
    parts: list[bytes] = []
    size = 0
    while chunk := await payload.readany():
        size += len(chunk)
        if size > limit:
            raise TooLarge(size)
        parts.append(chunk)
    return b"".join(parts)


class Response:
    """A whole answer."""

    __slots__ = ("body", "content_type", "headers", "status")

    def __init__(
        self,
        status: int = 200,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
        content_type: str = "application/json",
    ) -> None:
        self.status = status
        self.body = body
        self.headers = headers if headers is not None else {}
        self.content_type = content_type


class Stream:
    """A streamed answer: chunked (HTTP/1.1) or until the connection closes (HTTP/1.0).

    :meth:`start` sends the head, with the first bytes of the body when they
    are at hand; :meth:`write` sends a chunk and waits while the client's
    socket buffer is full; :meth:`write_eof` ends the answer. Writing to a
    client that went away raises :class:`ConnectionResetError`.
    """

    __slots__ = ("_chunked", "_conn", "content_type", "ended", "headers", "prepared", "status")

    def __init__(
        self,
        request: Request,
        status: int = 200,
        headers: dict[str, str] | None = None,
        content_type: str = "text/event-stream",
    ) -> None:
        self._conn = request._conn
        self._chunked = request.version >= (1, 1)
        self.status = status
        self.headers = headers if headers is not None else {}
        self.content_type = content_type
        self.prepared = False
        self.ended = False

    def start(self, first: bytes = b"") -> None:
        """Send the head (and ``first``, the body's first bytes, in the same write)."""
        self._send(first, b"")

    async def write(self, data: bytes) -> None:
        if not data:  # an empty chunk would end a chunked body
            return
        self._send(data, b"")
        if self._conn.writing_paused:
            await self._conn.drain()

    async def write_eof(self, data: bytes = b"") -> None:
        """End the answer, with ``data`` as its last bytes."""
        if not self.ended:
            self.ended = True
            self._send(data, _LAST_CHUNK if self._chunked else b"")

    def _send(self, data: bytes, end: bytes) -> None:
        """One write: the head if not sent yet, ``data`` framed, then ``end``."""
        parts = []
        if not self.prepared:
            self.prepared = True
            parts.append(self._head())
        if data and self._chunked:
            parts += (b"%x\r\n" % len(data), data, b"\r\n")
        elif data:
            parts.append(data)
        parts.append(end)
        out = b"".join(parts)
        if out:
            self._conn.send(out)

    def _head(self) -> bytes:
        conn = self._conn
        if not self._chunked:
            conn.keep_alive = False  # the body ends when the connection does
            return conn.head(self.status, self.headers, self.content_type, "")
        return conn.head(self.status, self.headers, self.content_type, _CHUNKED)


Answer = Response | Stream
Handler = Callable[[Request], Awaitable[Answer]]


class Server:
    """The connections of one listener, their limits, and how to stop them."""

    def __init__(
        self, handler: Handler, *, receive_timeout: float, keepalive_timeout: float = 75.0
    ) -> None:
        self.handler = handler
        self.receive_timeout = receive_timeout
        self.keepalive_timeout = keepalive_timeout
        self.connections: set[Connection] = set()
        self.closing = False
        self.date = ""
        self._sweeper: asyncio.TimerHandle | None = None

    def __call__(self) -> Connection:
        """A protocol for a new connection (the ``protocol_factory`` of ``create_server``)."""
        loop = asyncio.get_running_loop()
        if self._sweeper is None:
            self._sweep()
        return Connection(self, loop)

    def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        self.date = formatdate(usegmt=True)
        for conn in list(self.connections):
            conn.check(now)
        self._sweeper = loop.call_at(now + SWEEP_S, self._sweep)

    def pre_shutdown(self) -> None:
        """Take no new requests: idle connections close now, busy ones after their answer."""
        self.closing = True
        for conn in list(self.connections):
            conn.close_when_idle()

    async def shutdown(self, grace: float) -> None:
        """Give running answers ``grace`` s to finish, then cut every connection."""
        tasks = [c.task for c in self.connections if c.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=grace)
        for conn in list(self.connections):
            if conn.task is None or conn.task.done():
                conn.close()  # what is written still goes out
            else:
                conn.force_close()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        if tasks:  # the cancelled ones unwind (their upstream requests close)
            await asyncio.wait(tasks, timeout=grace)


_Queued = tuple[RawRequestMessage, StreamReader] | HttpProcessingError


class Connection(ResumeWhenPaused):
    """One client connection: parses its requests and answers them in order."""

    __slots__ = (
        "_answering",
        "_failed",
        "_head_bytes",
        "_head_sent",
        "_http",
        "_http10",
        "_idle_since",
        "_payload",
        "_queue",
        "_receiving",
        "_server",
        "keep_alive",
        "peer",
        "task",
    )

    def __init__(self, server: Server, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self._http = self._parser = HttpRequestParser(
            self,
            loop,
            _READ_LIMIT,
            max_line_size=_MAX_LINE,
            max_field_size=_MAX_LINE,
            max_headers=_MAX_HEADERS,
            payload_exception=RequestPayloadError,
        )
        self._server = server
        self._queue: deque[_Queued] = deque()
        self._receiving = 0.0  # when the first byte of a request not yet whole came
        self._idle_since = loop.time()
        self._failed = False  # the parser rejected what came: nothing after it is read
        self._http10 = False  # the request being answered is HTTP/1.0
        self._head_sent = False  # the answer being written has sent its head
        self._head_bytes = 0  # received of a request head not yet whole
        self._payload: StreamReader | None = None  # the body the parser fills last
        self._answering: StreamReader | None = None  # the body of the request being answered
        self.task: asyncio.Task[None] | None = None
        self.keep_alive = True
        self.peer = ""

    # --- asyncio.Protocol -------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        peer = transport.get_extra_info("peername")
        self.peer = str(peer[0]) if peer else ""
        self._server.connections.add(self)

    def connection_lost(self, exc: BaseException | None) -> None:
        super().connection_lost(exc)
        self._server.connections.discard(self)
        self.keep_alive = False
        self._queue.clear()
        if self.task is not None:  # also what wakes a handler waiting for the body
            self.task.cancel()

    def data_received(self, data: bytes) -> None:
        if self._failed or self.transport is None:
            return
        # (b"" comes from resume_reading; an empty line between requests is allowed)
        if data and not self._receiving and data not in _EMPTY_LINES:
            self._receiving = self._loop.time()
        payload = self._payload
        in_head = payload is None or payload.is_eof()  # (else `data` starts with body bytes)
        try:
            messages, _, _ = self._http.feed_data(data)
            if in_head or messages:
                self._head_bytes += len(data)
                # (Body bytes may be in the count: over the cap, measure the heads.)
                if self._head_bytes > MAX_HEAD and (
                    not messages or any(_head_size(m) > MAX_HEAD for m, _ in messages)
                ):
                    raise HeadTooLarge()
        except HttpProcessingError as exc:
            self._failed = True
            self._queue.append(exc)
            if payload is not None and not payload.is_eof():  # its handler must hear of it
                payload.set_exception(RequestPayloadError(_refusal(exc)))
        else:
            if not messages:
                return
            self._head_bytes = 0
            for _, payload in messages:  # a whole request (its body too) stops the clock
                payload.on_eof(self._received)
            self._payload = messages[-1][1]
            self._queue.extend(messages)
            if len(self._queue) >= _MAX_QUEUED:
                self._pause_reading_for_buffer()
        if self.task is None:
            self._next()

    # --- answering ----------------------------------------------------------------

    def _next(self) -> None:
        item = self._queue.popleft()
        if isinstance(item, HttpProcessingError):
            self._refuse(item)
            return
        message, payload = item
        self._answering = payload
        self.task = self._loop.create_task(self._answer(message, payload))

    def _received(self) -> None:
        self._receiving = 0.0

    async def _answer(self, message: RawRequestMessage, payload: StreamReader) -> None:
        if message.should_close or message.upgrade or self._server.closing:
            self.keep_alive = False
        self._http10 = message.version < (1, 1)
        self._head_sent = False
        request = Request(self, message, payload)
        try:
            answer = await self._server.handler(request)
        except Exception:
            log.exception("unexpected error answering %s %s", request.method, request.path)
            answer = Response(500, b"500: Internal Server Error", content_type="text/plain")
        if self._head_sent and not isinstance(answer, Stream):
            self.keep_alive = False  # a stream broke off: the client must see it cut
            self.task = None
            self._done()
            return
        if self.transport is None or self.transport.is_closing():
            self.task = None
            return
        if not payload.is_eof():  # answered without reading the whole body
            self.keep_alive = False
        try:
            if isinstance(answer, Stream):
                await answer.write_eof()
            else:
                self._send_whole(answer, head_only=request.method == "HEAD")
        except ConnectionResetError:
            self.task = None
            return
        if not payload.is_eof():
            await _linger(payload)
        self.task = None
        self._done()

    def _done(self) -> None:
        """An answer is out: the next request, or wait for one, or close."""
        if not self.keep_alive:
            if self.transport is not None:
                self.transport.close()
            return
        self._idle_since = self._loop.time()
        if self._buffer_paused and len(self._queue) < _MAX_QUEUED // 2:
            self._resume_reading_for_buffer()
            self.data_received(b"")  # requests held back while paused (may start the next)
        if self._queue and self.task is None:
            self._next()

    def _send_whole(self, answer: Response, *, head_only: bool) -> None:
        body = answer.body
        framing = f"Content-Length: {len(body)}\r\n"
        head = self.head(answer.status, answer.headers, answer.content_type, framing)
        self.send(head if head_only or not body else head + body)

    def _refuse(self, exc: HttpProcessingError) -> None:
        """A request the parser rejected: 400, then close (the stream cannot be resynced)."""
        text = _refusal(exc)
        status = 431 if isinstance(exc, HeadTooLarge) else 400
        log.info("bad request from %s: %s (HTTP %d)", self.peer or "?", text, status)
        self.keep_alive = False
        self._send_whole(
            Response(status, text.encode(), content_type="text/plain; charset=utf-8"),
            head_only=False,
        )
        self._done()

    def head(self, status: int, headers: dict[str, str], content_type: str, framing: str) -> bytes:
        """The status line and headers (header values come from cortex, never raw CR/LF)."""
        self._head_sent = True
        lines = [
            _STATUS_LINES.get(status) or f"HTTP/1.1 {status} Unknown\r\n",
            f"Content-Type: {content_type}\r\n",
            framing,
        ]
        lines += [f"{name}: {value}\r\n" for name, value in headers.items()]
        if not self.keep_alive:
            lines.append("Connection: close\r\n")
        elif self._http10:
            lines.append("Connection: keep-alive\r\n")
        lines.append(f"Date: {self._server.date}\r\n\r\n")
        return "".join(lines).encode("utf-8", "surrogateescape")

    # --- writing --------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("the client closed the connection")
        transport.write(data)

    @property
    def writing_paused(self) -> bool:
        return self._paused

    async def drain(self) -> None:
        try:
            await self._drain_helper()
        except ConnectionError:
            raise ConnectionResetError("the client closed the connection") from None

    # --- limits and shutdown -----------------------------------------------------------

    def check(self, now: float) -> None:
        """Called by the server's sweep: enforce the receive and keep-alive limits."""
        server = self._server
        if self._receiving and now - self._receiving > server.receive_timeout:
            answering = self._answering
            if self.task is not None and answering is not None and answering.is_eof():
                # The bytes waiting belong to a later (pipelined) request: it is
                # read once this answer is out, and its clock starts over.
                self._receiving = now
                return
            log.info(
                "closing a connection from %s: no whole request within %g s",
                self.peer or "?",
                server.receive_timeout,
            )
            self.force_close()
        elif (
            self.task is None
            and not self._queue
            and not self._receiving
            and now - self._idle_since > server.keepalive_timeout
        ):
            self.close()

    def close_when_idle(self) -> None:
        self.keep_alive = False
        if self.task is None and not self._queue:
            self.close()

    def close(self) -> None:
        """Close once what is written has gone out."""
        self.keep_alive = False
        if self.transport is not None:
            self.transport.close()

    def force_close(self) -> None:
        """Close now, pending writes dropped; a running handler is cancelled."""
        self.keep_alive = False
        if self.transport is not None:
            self.transport.abort()


# What a 400 says: fixed texts, as aiohttp's messages quote the offending bytes
# (an oversized Authorization header would come back in the body, and in logs).
_REFUSALS: tuple[tuple[type[HttpProcessingError], str], ...] = (
    (HeadTooLarge, f"request header fields over {MAX_HEAD // 1024} KiB in all"),
    (LineTooLong, "a request line or header field is too long"),
    (InvalidHeader, "invalid header field"),
    (BadHttpMethod, "invalid method"),
    (BadStatusLine, "invalid request line"),
    (InvalidURLError, "invalid request target"),
    (TransferEncodingError, "invalid chunked body"),
    (ContentLengthError, "invalid Content-Length"),
)


def _head_size(message: RawRequestMessage) -> int:
    return len(message.path) + sum(len(k) + len(v) + 4 for k, v in message.raw_headers)


def _refusal(exc: HttpProcessingError) -> str:
    for kind, text in _REFUSALS:
        if isinstance(exc, kind):
            return text
    if exc.message.startswith("Too many headers"):
        return "too many header fields"
    return "malformed HTTP request"


async def _linger(payload: StreamReader) -> None:
    """Read and drop the rest of a body that was not needed, for at most LINGER_S."""
    with contextlib.suppress(Exception):
        async with asyncio.timeout(LINGER_S):
            while await payload.readany():
                pass
