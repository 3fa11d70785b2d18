"""The admin API over HTTP, with a supervisor on emulated nodes; and `cortex status`'s table."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest

from cortex import config, errors
from cortex.admin import Route, admin_routes
from cortex.errors import CortexError, Dialect
from cortex.fleet import begin, end
from cortex.server import Handler, Request, Response, Server
from cortex.sim import SimConfig, SimModel, SimNode
from cortex.status import render_fleet
from cortex.supervisor import Supervisor


def dispatcher(routes: list[Route]) -> Handler:
    """What the gateway's dispatcher does: find the handler, render a CortexError it raises."""
    table = {(r.method, r.path): r.handler for r in routes}

    async def handle(request: Request) -> Response:
        handler = table.get((request.method, request.path))
        if handler is None:
            return Response(404, b'{"error":"no route"}')
        try:
            return await handler(request)
        except CortexError as err:
            body = errors.body(err, Dialect.OPENAI)
            return Response(errors.status_for(err, Dialect.OPENAI), body, errors.headers_for(err))

    return handle


@dataclass
class Admin:
    client: aiohttp.ClientSession
    sup: Supervisor
    nodes: dict[str, SimNode]

    async def post(self, path: str, body: Any) -> tuple[int, dict[str, Any]]:
        kwargs = {"data": body} if isinstance(body, (bytes, str)) else {"json": body}
        resp = await self.client.post(f"/admin/models/{path}", **kwargs)
        return resp.status, await resp.json()


@pytest.fixture
async def admin() -> AsyncIterator[Admin]:
    nodes = {
        "a": SimNode(
            SimConfig(
                models=[
                    SimModel("x", size_mb=8000, load_s=0.05),
                    SimModel("y", size_mb=8000, load_s=0.05, loaded=False),
                    SimModel("huge", size_mb=13000, load_s=0.05, loaded=False),
                ],
                vram_mb=20000,
            )
        ),
        "b": SimNode(SimConfig(models=[SimModel("y", size_mb=8000, load_s=0.05, loaded=False)])),
    }
    for node in nodes.values():
        await node.start("127.0.0.1", 0)
    cfg = config.decode(
        {
            "poll": {"interval_s": 0.1, "timeout_s": 0.5},
            "eviction": {"grace_s": 0.1, "defrag_after_cycles": 0},
            "nodes": [
                {"name": "a", "endpoint": nodes["a"].url, "vram_mb": 20000, "pinned": ["x"]},
                {"name": "b", "endpoint": nodes["b"].url, "vram_mb": 24576},
            ],
            "models": [
                {"id": "x", "vram_mb": 8000, "aliases": ["ex"]},
                {"id": "y", "vram_mb": 8000},
                {"id": "huge", "vram_mb": 13000},
            ],
        }
    )
    session = aiohttp.ClientSession()
    sup = Supervisor(cfg, session)
    await sup.start()
    server = Server(dispatcher(admin_routes(sup)), receive_timeout=10.0)
    listener = await asyncio.get_running_loop().create_server(server, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    client = aiohttp.ClientSession(f"http://127.0.0.1:{port}")
    yield Admin(client, sup, nodes)
    await client.close()
    listener.close()
    await server.shutdown(1.0)
    await listener.wait_closed()
    await sup.stop()
    await session.close()
    for node in nodes.values():
        await node.stop()


async def test_fleet_lists_nodes_and_models(admin: Admin) -> None:
    resp = await admin.client.get("/admin/fleet")
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "application/json"
    fleet = await resp.json()
    assert [n["name"] for n in fleet["nodes"]] == ["a", "b"]
    a = fleet["nodes"][0]
    assert (a["state"], a["vram_used_mb"], a["vram_total_mb"]) == ("up", 8000, 20000)
    assert [(m["id"], m["status"], m["pinned"]) for m in a["models"]] == [
        ("huge", "unloaded", False),
        ("x", "loaded", True),
        ("y", "unloaded", False),
    ]


async def test_load_unload_pin_unpin(admin: Admin) -> None:
    status, body = await admin.post("load", {"model": "y", "node": "b"})
    assert status == 200
    assert body["model"] == "y" and body["node"] == "b" and body["status"] == "loaded"
    assert body["seconds"] >= 0
    assert admin.nodes["b"].counters["/v1/models/reload"] == 1
    assert admin.sup.pick("y") is admin.sup.snapshot.nodes["b"].handle

    assert await admin.post("unload", {"model": "y"}) == (
        200,
        {"model": "y", "nodes": ["b"], "status": "unloaded"},
    )
    assert admin.sup.pick("y") is None

    assert await admin.post("pin", {"model": "y", "node": "a"}) == (
        200,
        {"model": "y", "nodes": ["a"], "pinned": True},
    )
    assert admin.sup.snapshot.nodes["a"].pinned == {"x", "y"}
    status, body = await admin.post("unpin", {"model": "ex"})  # aliases work too
    assert (status, body["nodes"], body["pinned"]) == (200, ["a"], False)
    assert admin.sup.snapshot.nodes["a"].pinned == {"y"}


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"not json",
        b"[]",
        {"node": "a"},
        {"model": ""},
        {"model": 3},
        {"model": "x", "node": ""},
        {"model": "x", "extra": 1},
    ],
)
async def test_bad_bodies_are_400(admin: Admin, body: Any) -> None:
    status, answer = await admin.post("pin", body)
    assert status == 400
    assert answer["error"]["type"] == "invalid_request_error"
    assert admin.sup.snapshot.nodes["a"].pinned == {"x"}


async def test_a_body_with_broken_chunk_framing_is_400(admin: Admin) -> None:
    url = admin.client._base_url
    assert url is not None and url.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", url.port)
    try:
        writer.write(
            b"POST /admin/models/pin HTTP/1.1\r\nHost: x\r\n"
            b'Transfer-Encoding: chunked\r\n\r\n5\r\n{"mod\r\n'
        )
        await asyncio.sleep(0.05)  # the framing breaks after the handler began reading
        writer.write(b"zz\r\n")
        async with asyncio.timeout(5):
            status_line = await reader.readline()
            answer = await reader.read()
    finally:
        writer.close()
    assert status_line.startswith(b"HTTP/1.1 400 ")
    assert b"not valid HTTP" in answer
    assert admin.sup.snapshot.nodes["a"].pinned == {"x"}


async def test_unknown_model_or_node_is_404(admin: Admin) -> None:
    status, body = await admin.post("load", {"model": "ghost"})
    assert status == 404 and body["error"]["code"] == "model_not_found"
    status, body = await admin.post("pin", {"model": "x", "node": "nowhere"})
    assert status == 404 and "nowhere" in body["error"]["message"]
    status, body = await admin.post("unload", {"model": "x", "node": "b"})  # b does not serve x
    assert status == 404 and body["error"]["code"] == "model_not_found"


async def test_a_load_that_cannot_be_done_is_503(admin: Admin) -> None:
    status, body = await admin.post("load", {"model": "huge", "node": "a"})
    assert status == 503
    assert body["error"]["message"] == (
        "huge cannot be loaded: huge needs 13000 MB; a has 20000 MB with 8000 MB pinned"
    )
    assert admin.nodes["a"].counters["/v1/models/unload"] == 0


async def test_an_unload_with_requests_in_flight_is_503_with_retry_after(admin: Admin) -> None:
    handle = admin.sup.snapshot.nodes["a"].handle
    begin(handle, "x")
    resp = await admin.client.post("/admin/models/unload", json={"model": "x"})
    assert resp.status == 503
    assert int(resp.headers["Retry-After"]) >= 1
    assert "in flight" in (await resp.json())["error"]["message"]
    assert admin.sup.pick("x") is handle
    end(handle, "x")


async def test_status_table_renders_the_fleet(admin: Admin) -> None:
    handle = admin.sup.snapshot.nodes["a"].handle
    begin(handle, "x")
    text = render_fleet(admin.sup.fleet())
    end(handle, "x")
    assert text == (
        "NODE  STATE  USED/TOTAL MB  IN-FLIGHT  RUN/WAIT  CYCLES  ERROR\n"
        "a     up     8000/20000     1          0/0       0\n"
        "b     up     0/24576        0          0/0       0\n"
        "\n"
        "NODE  MODEL  STATUS    PIN  LAST USED  IN-FLIGHT\n"
        "a     huge   unloaded       never      0\n"
        "a     x      loaded    *    never      1\n"
        "a     y      unloaded       never      0\n"
        "b     y      unloaded       never      0\n"
    )


def test_status_table_of_an_empty_or_down_fleet() -> None:
    assert render_fleet({"nodes": []}) == "no nodes configured\n"
    fleet = {
        "nodes": [
            {
                "name": "gpu-a",
                "state": "down",
                "vram_total_mb": 0,
                "vram_used_mb": 0,
                "inflight": 0,
                "running": None,
                "waiting": None,
                "cycles": 3,
                "error": "ClientConnectorError: refused",
                "models": [
                    {
                        "id": "m",
                        "status": "loaded",
                        "pinned": False,
                        "last_used_s": 4000.0,
                        "inflight": 0,
                    }
                ],
            }
        ],
        "loading": [{"node": "gpu-a", "model": "m"}],
    }
    text = render_fleet(fleet)
    assert "gpu-a  down   0/?" in text
    assert text.splitlines()[1].endswith("-         3       ClientConnectorError: refused")
    assert "1.1h ago" in text
    assert text.endswith("loading: m on gpu-a\n")
