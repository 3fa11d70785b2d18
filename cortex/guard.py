"""A deadline for receiving a request, against slowloris and slow-body clients.

aiohttp's server has no header or body read timeout: a client that trickles a
request's headers is only cut by the keep-alive timer (75 s after it connected
or after its last response), and one that trickles a body is never cut. So each
API connection's protocol is wrapped in a :class:`Guard`: the first byte of a
request starts a timer, the request's body reaching its end stops it, and a
request not whole within ``gateway.client_timeout_s`` closes the connection
(which cancels its handler). Idle keep-alive connections are not timed here.

A pipelined request is parsed only when the one before it has been answered:
its timer waits for that. One corner is left to the keep-alive timer: a
request whose first bytes arrive in the same read as the end of the body before
it starts no timer.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

log = logging.getLogger("cortex")


class _NoEcho(logging.Filter):
    """aiohttp logs each malformed request at ERROR with a traceback, and the error's
    text quotes up to 100 bytes of the bad line: an oversized ``Authorization`` header
    would put a credential in the log. Such records keep the error's type and status."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            record.args = (record.getMessage(), type(exc).__name__, exc.code)
            record.msg = "%s: %s (HTTP %s)"
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.exc_info = record.exc_text = None
        return True


# The logger of the API port's aiohttp protocol (it would be aiohttp.server).
HTTP_LOG = logging.getLogger("cortex.http")
HTTP_LOG.addFilter(_NoEcho())


class Guards:
    """The live guards of one listener, by aiohttp protocol, and their limit."""

    def __init__(self, limit: float) -> None:
        self.limit = limit
        self.by_protocol: dict[Any, Guard] = {}

    def wrap(self, protocol: asyncio.Protocol) -> Guard:
        return Guard(protocol, self)

    def started(self, request: web.BaseRequest) -> None:
        """A request's headers are in (called by the request factory)."""
        guard = self.by_protocol.get(request.protocol)
        if guard is not None:
            guard.request = request
            guard.handling = True
            request.content.on_eof(guard.received)

    def answered(self, request: web.BaseRequest) -> None:
        """A handler is done with ``request`` (called by the gateway's dispatcher)."""
        guard = self.by_protocol.get(request.protocol)
        if guard is not None:
            guard.handling = False


class Guard(asyncio.Protocol):
    """One connection: forwards everything to aiohttp's protocol, and times requests."""

    __slots__ = ("_guards", "_inner", "_timer", "handling", "request")

    def __init__(self, inner: Any, guards: Guards) -> None:
        self._inner = inner
        self._guards = guards
        self._timer: asyncio.TimerHandle | None = None
        self.request: web.BaseRequest | None = None  # the last one whose headers came in
        self.handling = False  # a handler is answering `request`

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._guards.by_protocol[self._inner] = self
        self._inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.received()
        self.request = None
        self._guards.by_protocol.pop(self._inner, None)
        self._inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._timer is None:
            self._arm()
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        result: bool | None = self._inner.eof_received()
        return result

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def received(self) -> None:
        """The request is whole: stop its timer."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _arm(self) -> None:
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self._guards.limit, self._expired)

    def _expired(self) -> None:
        self._timer = None
        request = self.request
        if request is not None and request.content.is_eof() and self.handling:
            self._arm()  # a pipelined request: it is read once this one is answered
            return
        log.info(
            "closing a connection from %s: no whole request within %g s",
            request.remote if request is not None else _peer(self._inner),
            self._guards.limit,
        )
        self._inner.force_close()


def _peer(protocol: Any) -> str:
    transport = getattr(protocol, "transport", None)
    peer = transport.get_extra_info("peername") if transport is not None else None
    return str(peer[0]) if peer else "?"
