"""HTTP/1.1 to the nodes over pooled keep-alive connections, lean enough for the hot path.

For every request aiohttp's ``ClientSession`` builds a ``ClientRequest`` and a
``ClientResponse`` and walks cookies, proxies, auth, redirects, timeouts and
trace hooks: under the relay benchmark that was the largest single block of
cortex's CPU (see bench/README.md). cortex sends one kind of request to a
handful of known nodes, so the hot path writes the request bytes itself onto a
pooled connection and lets aiohttp's own client protocol (``ResponseHandler``,
with its C HTTP parser) read the answer. The control plane (polls, lifecycle
calls) keeps using ``ClientSession``.

Time limits are not set here: connecting is bounded by ``connect_timeout``,
everything after it by the proxy's watchdog, which cancels the waiting task.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from urllib.parse import urlsplit

import aiohttp
from aiohttp.client_proto import ResponseHandler
from aiohttp.streams import StreamReader
from multidict import CIMultiDictProxy

from cortex.fleet import NodeHandle
from cortex.flow import ResumeWhenPaused

_READ_BUFSIZE = 1 << 16
_MAX_IDLE = 512
_MAX_CONNECTING = 128


class _NodeConnection(ResumeWhenPaused, ResponseHandler):
    pass


class ConnectFailed(ConnectionError):
    """The node could not be reached (refused, unreachable, connect timeout)."""


class _Target:
    """Where a node is and the request-header lines every request to it carries."""

    __slots__ = ("host", "key", "lines", "port", "ssl")

    def __init__(self, node: NodeHandle) -> None:
        parts = urlsplit(node.base_url)
        self.ssl: ssl.SSLContext | None = (
            ssl.create_default_context() if parts.scheme == "https" else None
        )
        self.host = parts.hostname or "localhost"
        self.port = parts.port or (443 if self.ssl else 80)
        self.key = (self.host, self.port, self.ssl is not None)
        lines = f"Host: {parts.netloc}\r\nContent-Type: application/json\r\n"
        if node.config.api_key:
            lines += f"Authorization: Bearer {node.config.api_key}\r\n"
        self.lines = lines.encode("latin-1")


class Reply:
    """A node's answer: status and headers now, the body from ``content``.

    Call :meth:`finish` exactly once when done with it: the connection goes
    back to the pool if the body was read to its end, else it is closed (which
    is how a node learns that its client went away).
    """

    __slots__ = ("_pool", "_proto", "_target", "content", "headers", "status")

    def __init__(
        self,
        pool: Pool,
        target: _Target,
        proto: ResponseHandler,
        status: int,
        headers: CIMultiDictProxy[str],
        content: StreamReader,
    ) -> None:
        self._pool = pool
        self._target = target
        self._proto = proto
        self.status = status
        self.headers = headers
        self.content = content

    async def read(self) -> bytes:
        return await self.content.read()

    def finish(self) -> None:
        proto = self._proto
        if proto.should_close or not self.content.is_eof():
            proto.close()
        else:
            self._pool.put(self._target, proto)


class Pool:
    """Keep-alive connections to the nodes, most recently used first."""

    def __init__(self, connect_timeout: float) -> None:
        self.connect_timeout = connect_timeout
        self._idle: dict[tuple[str, int, bool], deque[ResponseHandler]] = {}
        self._targets: dict[tuple[str, str], _Target] = {}
        self._lines: dict[str, bytes] = {}
        self._connecting: dict[tuple[str, int, bool], asyncio.Semaphore] = {}

    async def request(self, node: NodeHandle, path: str, body: bytes, request_id: str) -> Reply:
        """POST ``body`` to ``path`` on ``node``; returns once the status line arrived."""
        target = self._target(node)
        head = b"".join(
            (
                self._request_line(path),
                target.lines,
                b"Content-Length: %d\r\nX-Request-Id: %s\r\n\r\n"
                % (len(body), request_id.encode("latin-1", "replace")),
            )
        )
        proto = self._take(target)
        if proto is not None:
            try:
                return await self._send(target, proto, head, body)
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
                proto.close()  # the node closed an idle connection: once more on a new one
        proto = await self._connect(target)
        return await self._send(target, proto, head, body)

    async def _send(
        self, target: _Target, proto: ResponseHandler, head: bytes, body: bytes
    ) -> Reply:
        transport = proto.transport
        assert transport is not None
        if len(body) < 16384:
            transport.write(head + body)
        else:
            transport.writelines((head, body))
        try:
            message, payload = await proto.read()
        except BaseException:
            proto.close()
            raise
        return Reply(self, target, proto, message.code, message.headers, payload)

    def _take(self, target: _Target) -> ResponseHandler | None:
        idle = self._idle.get(target.key)
        while idle:
            proto = idle.pop()
            if proto.is_connected():
                return proto
            proto.close()
        return None

    def put(self, target: _Target, proto: ResponseHandler) -> None:
        idle = self._idle.setdefault(target.key, deque())
        if len(idle) >= _MAX_IDLE:
            idle.popleft().close()
        idle.append(proto)

    async def _connect(self, target: _Target) -> ResponseHandler:
        # A burst of thousands of new connections would overflow the node's accept
        # backlog (1024) and time out: connect a bounded number at a time.
        gate = self._connecting.get(target.key)
        if gate is None:
            gate = self._connecting[target.key] = asyncio.Semaphore(_MAX_CONNECTING)
        async with gate:
            return await self._open(target)

    async def _open(self, target: _Target) -> ResponseHandler:
        loop = asyncio.get_running_loop()
        try:
            _, proto = await asyncio.wait_for(
                loop.create_connection(
                    lambda: _NodeConnection(loop), target.host, target.port, ssl=target.ssl
                ),
                self.connect_timeout,
            )
        except (OSError, TimeoutError) as exc:
            raise ConnectFailed(
                f"cannot connect to {target.host}:{target.port}: {str(exc) or 'timed out'}"
            ) from exc
        # Once per connection (aiohttp's client does it per request, building a new
        # parser each time): llhttp reads one answer after the other.
        proto.set_response_params(auto_decompress=False, read_bufsize=_READ_BUFSIZE)
        return proto

    def _target(self, node: NodeHandle) -> _Target:
        key = (node.base_url, node.config.api_key)
        target = self._targets.get(key)
        if target is None:
            target = self._targets[key] = _Target(node)
        return target

    def _request_line(self, path: str) -> bytes:
        line = self._lines.get(path)
        if line is None:
            line = self._lines[path] = f"POST {path} HTTP/1.1\r\n".encode("latin-1")
        return line

    def close(self) -> None:
        """Close every idle connection (on shutdown)."""
        for idle in self._idle.values():
            while idle:
                idle.pop().close()
        self._idle.clear()
