"""Model lifecycle over real HTTP: listing, reload/unload answers, lazy reload, VRAM, aborts."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest

from cortex.sim import SimConfig, SimModel, SimNode, serve_forever

LOAD_S = 0.2


def two_models(**overrides: Any) -> SimConfig:
    models = [
        SimModel("a", size_mb=1000, load_s=LOAD_S, tok_per_s=1000.0),
        SimModel("b", size_mb=1000, load_s=LOAD_S, tok_per_s=1000.0, loaded=False),
    ]
    return SimConfig(**{"models": models, "vram_mb": 4000, "instant": True, **overrides})


async def until(predicate: Callable[[], bool], within: float = 5.0) -> None:
    """Poll ``predicate`` until true: requests reach the node asynchronously."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not predicate():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


@pytest.fixture
async def node() -> AsyncIterator[SimNode]:
    async with SimNode(two_models()).running() as running:
        yield running


async def lifecycle(
    session: aiohttp.ClientSession, node: SimNode, op: str, model_id: str
) -> dict[str, Any]:
    async with session.post(f"{node.url}/v1/models/{op}", json={"model_id": model_id}) as response:
        assert response.status == 200
        body: dict[str, Any] = await response.json()
        return body


async def listing(session: aiohttp.ClientSession, node: SimNode) -> list[dict[str, Any]]:
    async with session.get(f"{node.url}/v1/models") as response:
        body = await response.json()
        assert body["object"] == "list"
        data: list[dict[str, Any]] = body["data"]
        return data


async def chat(
    session: aiohttp.ClientSession, node: SimNode, model: str, **extra: Any
) -> tuple[int, Any]:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}
    async with session.post(f"{node.url}/v1/chat/completions", json=body) as response:
        return response.status, await response.json()


async def test_health_and_root_say_ok(session: aiohttp.ClientSession, node: SimNode) -> None:
    for path in ("/", "/health"):
        async with session.get(node.url + path) as response:
            assert (response.status, await response.text()) == (200, "OK")


async def test_models_lists_default_first_without_status(
    session: aiohttp.ClientSession, node: SimNode
) -> None:
    data = await listing(session, node)
    assert data[0] == {
        "id": "default",
        "object": "model",
        "created": data[0]["created"],
        "owned_by": "local",
        "root": "default",
    }
    assert [(m["id"], m["status"], m["root"], m["owned_by"]) for m in data[1:]] == [
        ("a", "loaded", "a", "local"),
        ("b", "unloaded", "b", "local"),
    ]


async def test_lifecycle_answers_are_http_200_with_the_status_in_the_body(
    session: aiohttp.ClientSession, node: SimNode
) -> None:
    assert await lifecycle(session, node, "status", "a") == {"model_id": "a", "status": "loaded"}
    assert await lifecycle(session, node, "status", "nope") == {
        "model_id": "nope",
        "status": "not_found",
    }
    assert await lifecycle(session, node, "unload", "nope") == {
        "model_id": "nope",
        "status": "not_found",
    }
    assert await lifecycle(session, node, "unload", "a") == {"model_id": "a", "status": "unloaded"}
    assert await lifecycle(session, node, "unload", "a") == {"model_id": "a", "status": "unloaded"}
    started = asyncio.get_running_loop().time()
    assert await lifecycle(session, node, "reload", "a") == {"model_id": "a", "status": "loaded"}
    assert asyncio.get_running_loop().time() - started >= LOAD_S * 0.9
    assert node.counters["/v1/models/reload"] == 1
    assert node.counters["/v1/models/unload"] == 3


async def test_reload_of_a_loaded_model_sticks_it_in_reloading_until_unloaded(
    session: aiohttp.ClientSession, node: SimNode
) -> None:
    assert await lifecycle(session, node, "reload", "a") == {"model_id": "a", "status": "not_found"}
    assert await lifecycle(session, node, "status", "a") == {"model_id": "a", "status": "reloading"}
    entries = [(m["id"], m.get("status")) for m in await listing(session, node)]
    assert entries.count(("a", "loaded")) == 1 and entries.count(("a", "reloading")) == 1
    assert await chat(session, node, "a") == (500, {"message": "model `a` is being reloaded"})
    assert await lifecycle(session, node, "reload", "a") == {"model_id": "a", "status": "reloading"}

    assert await lifecycle(session, node, "unload", "a") == {"model_id": "a", "status": "unloaded"}
    assert [m["status"] for m in await listing(session, node) if m["id"] == "a"] == ["unloaded"]
    status, body = await chat(session, node, "a")
    assert status == 200 and body["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize(
    ("headers", "data", "status", "text"),
    [
        ({}, b'{"model_id": "a"}', 415, "Expected request with `Content-Type: application/json`"),
        (
            {"Content-Type": "application/json"},
            b'{"model_id": ',
            400,
            "Failed to parse the request body as JSON",
        ),
        (
            {"Content-Type": "application/json"},
            b'{"model": "a"}',
            422,
            "Failed to deserialize the JSON body",
        ),
    ],
)
async def test_malformed_lifecycle_bodies_get_plain_text_rejections(
    session: aiohttp.ClientSession,
    node: SimNode,
    headers: dict[str, str],
    data: bytes,
    status: int,
    text: str,
) -> None:
    async with session.post(f"{node.url}/v1/models/unload", data=data, headers=headers) as response:
        assert response.status == status
        assert response.content_type == "text/plain"
        assert (await response.text()).startswith(text)
    assert await lifecycle(session, node, "status", "a") == {"model_id": "a", "status": "loaded"}


async def raw_post(
    port: int, path: str, body: dict[str, Any]
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    payload = json.dumps(body).encode()
    head = f"POST {path} HTTP/1.1\r\nHost: sim\r\nContent-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    writer.write(head.encode() + payload)
    await writer.drain()
    return reader, writer


async def metric(session: aiohttp.ClientSession, node: SimNode, name: str) -> int:
    async with session.get(f"{node.url}/metrics") as response:
        text = await response.text()
    values = [line.split()[1] for line in text.splitlines() if line.startswith(name + " ")]
    return int(values[0])


async def test_lazy_reload_sends_no_byte_until_loaded_and_rejects_concurrent_requests(
    session: aiohttp.ClientSession,
) -> None:
    config = SimConfig(
        models=[SimModel("a"), SimModel("b", load_s=0.6, loaded=False)], instant=True
    )
    async with SimNode(config).running() as node:
        await check_lazy_reload(session, node)
    assert (node.counters["lazy_load"], node.counters["load"]) == (1, 1)


async def check_lazy_reload(session: aiohttp.ClientSession, node: SimNode) -> None:
    body = {"model": "b", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    reader, writer = await raw_post(node.port, "/v1/chat/completions", body)
    try:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.read(1), 0.2)
        assert await chat(session, node, "b") == (500, {"message": "model `b` is being reloaded"})
        assert await lifecycle(session, node, "status", "b") == {
            "model_id": "b",
            "status": "reloading",
        }
        assert await metric(session, node, "mistralrs_requests_pending_admission") == 1
        assert (await chat(session, node, "a"))[0] == 200
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)
        assert head.startswith(b"HTTP/1.1 200")
    finally:
        writer.close()
        await writer.wait_closed()
    assert await lifecycle(session, node, "status", "b") == {"model_id": "b", "status": "loaded"}


async def test_a_reload_that_does_not_fit_fails_like_a_cuda_oom(
    session: aiohttp.ClientSession,
) -> None:
    async with SimNode(two_models(vram_mb=1500)).running() as node:
        assert await lifecycle(session, node, "reload", "b") == {
            "model_id": "b",
            "status": "internal_error",
            "error": "CUDA out of memory: tried to allocate 1000 MiB (500 MiB free)",
        }
        assert await lifecycle(session, node, "status", "b") == {
            "model_id": "b",
            "status": "unloaded",
        }
        status, body = await chat(session, node, "b")
        assert status == 500 and "CUDA out of memory" in body["message"]
        assert await lifecycle(session, node, "status", "b") == {
            "model_id": "b",
            "status": "unloaded",
        }

        assert await lifecycle(session, node, "unload", "a") == {
            "model_id": "a",
            "status": "unloaded",
        }
        assert await lifecycle(session, node, "reload", "b") == {
            "model_id": "b",
            "status": "loaded",
        }
        assert node.counters["oom"] == 2


async def read_sse_data(response: aiohttp.ClientResponse) -> list[str]:
    text = (await response.content.read()).decode()
    return [line.removeprefix("data: ") for line in text.split("\n") if line.startswith("data: ")]


async def test_unload_aborts_in_flight_streams_which_end_without_done(
    session: aiohttp.ClientSession,
) -> None:
    slow = SimConfig(models=[SimModel("a", tok_per_s=40.0, answer_tokens=40)])
    async with SimNode(slow).running() as node:
        body = {"model": "a", "messages": [{"role": "user", "content": "hi"}], "stream": True}
        async with session.post(f"{node.url}/v1/chat/completions", json=body) as response:
            assert response.status == 200
            first = await response.content.readuntil(b"\n\n")
            assert first.startswith(b"data: {")
            assert await lifecycle(session, node, "unload", "a") == {
                "model_id": "a",
                "status": "unloaded",
            }
            rest = await asyncio.wait_for(read_sse_data(response), 2)
        assert "[DONE]" not in rest
        assert all(json.loads(line)["usage"] is None for line in rest)
        assert node.counters["abort"] == 1


async def test_unload_fails_an_in_flight_non_streaming_request(
    session: aiohttp.ClientSession,
) -> None:
    slow = SimConfig(models=[SimModel("a", tok_per_s=40.0, answer_tokens=40)])
    async with SimNode(slow).running() as node:
        pending = asyncio.ensure_future(chat(session, node, "a"))
        await until(lambda: node.running_sequences == 1)  # in flight on the node
        assert await lifecycle(session, node, "unload", "a") == {
            "model_id": "a",
            "status": "unloaded",
        }
        status, body = await asyncio.wait_for(pending, 2)
        assert status == 500 and "unloaded" in body["message"]


async def test_request_ids_are_echoed_or_generated_and_cors_is_open(
    session: aiohttp.ClientSession, node: SimNode
) -> None:
    async with session.get(f"{node.url}/health", headers={"x-request-id": "abc-1"}) as response:
        assert response.headers["x-request-id"] == "abc-1"
        assert response.headers["Access-Control-Allow-Origin"] == "*"
    async with session.get(f"{node.url}/v1/models") as response:
        assert response.headers["x-request-id"].startswith("req_")
        assert len(response.headers["x-request-id"]) == len("req_") + 36
    preflight = {"Origin": "http://x", "Access-Control-Request-Method": "POST"}
    async with session.options(f"{node.url}/v1/chat/completions", headers=preflight) as response:
        assert response.status == 200
        assert response.headers["Access-Control-Allow-Methods"] == "*"


async def test_bodies_over_50_mb_are_refused(session: aiohttp.ClientSession, node: SimNode) -> None:
    huge = b'{"messages":[{"role":"user","content":"' + b"x" * (50 * 1024 * 1024) + b'"}]}'
    async with session.post(f"{node.url}/v1/chat/completions", data=io.BytesIO(huge)) as response:
        assert response.status == 413


async def test_models_can_be_replaced_at_runtime_and_restored(
    session: aiohttp.ClientSession, node: SimNode
) -> None:
    async with session.post(
        f"{node.url}/_sim/faults", json={"models_override": ["c:500", "d:500:0.1"]}
    ) as response:
        assert response.status == 200
        assert (await response.json())["models"] == ["c", "d"]
    assert [m["id"] for m in await listing(session, node)] == ["default", "c", "d"]
    status, body = await chat(session, node, "a")
    assert status == 500
    assert body["message"].startswith(
        "Requested model 'a' is not available. Available models: c, d."
    )
    async with session.post(
        f"{node.url}/_sim/faults", json={"models_override": ["e:9000"]}
    ) as response:
        assert response.status == 422
    async with session.delete(f"{node.url}/_sim/faults") as response:
        assert (await response.json())["models"] == ["a", "b"]
    assert [m["id"] for m in await listing(session, node)] == ["default", "a", "b"]


async def test_stop_ends_streams_stalls_and_loads_at_once(session: aiohttp.ClientSession) -> None:
    config = SimConfig(
        models=[SimModel("a", tok_per_s=5.0), SimModel("b", loaded=False, load_s=30.0)]
    )
    node = SimNode(config)
    await node.start()
    body = {"messages": [{"role": "user", "content": "hi"}], "stream": True}
    streaming = asyncio.ensure_future(post_and_read(session, node, {**body, "model": "a"}))
    loading = asyncio.ensure_future(post_and_read(session, node, {**body, "model": "b"}))
    # the stream is generating (its headers are sent) and the lazy load of b is under way
    await until(lambda: node.running_sequences == 1 and node.counters["lazy_load"] == 1)
    node.faults.stall = True
    stalled = asyncio.ensure_future(post_and_read(session, node, {**body, "model": "a"}))
    # the third request reached the node's handler, where the stall holds it
    await until(lambda: node.counters["/v1/chat/completions"] == 3)
    started = asyncio.get_running_loop().time()
    await node.stop()
    assert asyncio.get_running_loop().time() - started < 1.5
    outcomes = await asyncio.wait_for(asyncio.gather(streaming, loading, stalled), 5)
    assert [type(o) for o in outcomes] == [
        aiohttp.ClientPayloadError,
        aiohttp.ServerDisconnectedError,
        aiohttp.ServerDisconnectedError,
    ]


async def post_and_read(
    session: aiohttp.ClientSession, node: SimNode, body: dict[str, Any]
) -> object:
    try:
        async with session.post(f"{node.url}/v1/chat/completions", json=body) as response:
            return await response.read()
    except aiohttp.ClientError as exc:
        return exc


async def test_serve_forever_logs_one_line_applies_faults_and_stops_when_cancelled(
    session: aiohttp.ClientSession, unused_tcp_port: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="cortex.sim")
    serving = asyncio.ensure_future(
        serve_forever(two_models(), "127.0.0.1", unused_tcp_port, faults={"status": 503})
    )
    url = f"http://127.0.0.1:{unused_tcp_port}"
    for _ in range(100):
        if caplog.records:
            break
        await asyncio.sleep(0.01)
    (record,) = caplog.records
    assert (
        f"listening on {url}" in record.getMessage()
        and "a (loaded), b (unloaded)" in record.getMessage()
    )
    async with session.post(
        f"{url}/v1/chat/completions", json={"model": "a", "messages": []}
    ) as response:
        assert response.status == 503
    serving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await serving
    async with aiohttp.ClientSession() as fresh:
        with pytest.raises(aiohttp.ClientConnectorError):
            await fresh.get(f"{url}/health")
