"""The lean upstream client: keep-alive reuse, stale connections, failures, abandonment."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from multidict import CIMultiDict

from cortex.config import Node
from cortex.fleet import NodeHandle
from cortex.upstream import ConnectFailed, Pool


class FakeNode:
    """A tiny HTTP server that counts connections and records what it received."""

    def __init__(self) -> None:
        self.connections = 0
        self.requests: list[tuple[str, CIMultiDict[str], bytes]] = []
        self.hold = asyncio.Event()

    async def echo(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.requests.append((request.path_qs, CIMultiDict(request.headers), body))
        return web.json_response({"got": len(body)})

    async def stream(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(1000):
            await resp.write(b"data: %d\n\n" % i)
            await asyncio.sleep(0.001)
        return resp


@pytest.fixture
async def node(aiohttp_server: object) -> AsyncIterator[tuple[FakeNode, NodeHandle]]:
    fake = FakeNode()
    app = web.Application()
    app.router.add_post("/echo", fake.echo)
    app.router.add_post("/stream", fake.stream)
    server = await aiohttp_server(app)  # type: ignore[operator]
    original = server.runner.server.connection_made  # count TCP connections the pool opens

    def made(handler: object, transport: asyncio.Transport) -> None:
        fake.connections += 1
        original(handler, transport)

    server.runner.server.connection_made = made
    handle = NodeHandle.from_config(
        Node(name="n", endpoint=f"http://127.0.0.1:{server.port}", api_key="node-secret")
    )
    yield fake, handle


async def test_requests_reuse_one_keepalive_connection(node: tuple[FakeNode, NodeHandle]) -> None:
    fake, handle = node
    pool = Pool(connect_timeout=1.0)
    for i in range(5):
        reply = await pool.request(handle, "/echo?x=1", b'{"n":%d}' % i, f"req-{i}")
        assert reply.status == 200
        assert await reply.read() == b'{"got": 7}'
        reply.finish()
    assert fake.connections == 1
    path, headers, body = fake.requests[-1]
    assert path == "/echo?x=1" and body == b'{"n":4}'
    assert headers["X-Request-Id"] == "req-4"
    assert headers["Authorization"] == "Bearer node-secret"
    assert headers["Content-Type"] == "application/json"
    pool.close()


async def test_an_abandoned_stream_closes_its_connection(node: tuple[FakeNode, NodeHandle]) -> None:
    fake, handle = node
    pool = Pool(connect_timeout=1.0)
    reply = await pool.request(handle, "/stream", b"{}", "r1")
    assert reply.headers["Content-Type"] == "text/event-stream"
    assert (await reply.content.readany()).startswith(b"data: 0")
    reply.finish()  # not read to the end: the node must see the client go
    reply = await pool.request(handle, "/echo", b"{}", "r2")
    await reply.read()
    reply.finish()
    assert fake.connections == 2
    pool.close()


async def test_a_connection_the_node_closed_is_replaced(node: tuple[FakeNode, NodeHandle]) -> None:
    fake, handle = node
    pool = Pool(connect_timeout=1.0)
    reply = await pool.request(handle, "/echo", b"{}", "r1")
    await reply.read()
    reply.finish()
    idle = [proto for protos in pool._idle.values() for proto in protos]
    assert len(idle) == 1  # the pool kept the connection...
    [proto] = idle
    assert proto.transport is not None
    proto.transport.get_extra_info("socket").shutdown(socket.SHUT_RDWR)  # ...and the node closed it
    for _ in range(200):
        if not proto.is_connected():
            break
        await asyncio.sleep(0.01)
    assert not proto.is_connected()
    reply = await pool.request(handle, "/echo", b"{}", "r2")
    assert reply.status == 200
    await reply.read()
    reply.finish()
    assert fake.connections == 2
    pool.close()


async def test_refused_connection_is_connect_failed(unused_tcp_port: int) -> None:
    pool = Pool(connect_timeout=1.0)
    handle = NodeHandle.from_config(Node(name="n", endpoint=f"http://127.0.0.1:{unused_tcp_port}"))
    with pytest.raises(ConnectFailed, match="cannot connect"):
        await pool.request(handle, "/echo", b"{}", "r1")
    pool.close()
