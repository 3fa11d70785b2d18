"""Every fault knob, set from Python and over HTTP, against a node on loopback."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from cortex.sim import SimConfig, SimModel, SimNode

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
STREAM = {**CHAT, "stream": True}


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


@pytest.fixture
async def node() -> AsyncIterator[SimNode]:
    config = SimConfig(models=[SimModel("m", answer_tokens=4)], instant=True, native_messages=True)
    async with SimNode(config).running() as running:
        yield running


async def post(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> tuple[int, str]:
    async with session.post(url, json=body) as response:
        return response.status, await response.text()


def frames(text: str) -> list[str]:
    return [frame.removeprefix("data: ") for frame in text.split("\n\n") if frame]


async def test_drop_after_chunks_cuts_the_connection(
    session: aiohttp.ClientSession, node: SimNode
) -> None:
    node.faults.drop_after_chunks = 2
    received = b""
    async with session.post(f"{node.url}/v1/chat/completions", json=STREAM) as response:
        assert response.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            async for line in response.content:
                received += line
    assert received.count(b"data: ") == 2
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await post(session, f"{node.url}/v1/chat/completions", CHAT)


async def test_no_done_ends_the_stream_cleanly_without_done(
    session: aiohttp.ClientSession, node: SimNode
) -> None:
    node.faults.no_done = True
    status, text = await post(session, f"{node.url}/v1/chat/completions", STREAM)
    chunks = frames(text)
    assert status == 200 and "[DONE]" not in chunks
    assert json.loads(chunks[-1])["choices"][0]["finish_reason"] == "stop"


async def test_error_after_chunks_sends_an_in_stream_error_then_done(
    session: aiohttp.ClientSession, node: SimNode
) -> None:
    node.faults.error_after_chunks = 1
    status, text = await post(session, f"{node.url}/v1/chat/completions", STREAM)
    chunks = frames(text)
    assert status == 200 and len(chunks) == 3 and chunks[-1] == "[DONE]"
    error = json.loads(chunks[1])["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "server_error"
    status, text = await post(session, f"{node.url}/v1/chat/completions", CHAT)
    assert status == 500 and "message" in json.loads(text)


async def test_error_after_chunks_on_messages_uses_an_error_event(
    session: aiohttp.ClientSession, node: SimNode
) -> None:
    node.faults.error_after_chunks = 2
    body = {
        "model": "m",
        "max_tokens": 50,
        "stream": True,
        "messages": [{"role": "user", "content": "hi"}],
    }
    status, text = await post(session, f"{node.url}/v1/messages", body)
    kinds = [frame.split("\n")[0] for frame in text.split("\n\n") if frame]
    assert status == 200
    assert kinds == ["event: message_start", "event: content_block_start", "event: error"]


async def test_stall_never_answers_not_even_headers(
    session: aiohttp.ClientSession, node: SimNode
) -> None:
    node.faults.stall = True
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(post(session, f"{node.url}/v1/chat/completions", STREAM), 0.2)
    async with session.get(f"{node.url}/health") as response:
        assert response.status == 200
    node.faults.stall = False
    assert (await post(session, f"{node.url}/v1/chat/completions", CHAT))[0] == 200


async def test_status_answers_every_inference_request(
    session: aiohttp.ClientSession, node: SimNode
) -> None:
    node.faults.status = 503
    status, text = await post(session, f"{node.url}/v1/chat/completions", STREAM)
    assert status == 503 and "503" in json.loads(text)["message"]
    status, text = await post(session, f"{node.url}/v1/embeddings", {"model": "m", "input": "x"})
    assert status == 503
    status, text = await post(
        session, f"{node.url}/v1/messages", {"model": "m", "max_tokens": 1, "messages": []}
    )
    assert status == 503 and json.loads(text)["type"] == "error"
    async with session.get(f"{node.url}/v1/models") as response:
        assert response.status == 200


@pytest.fixture
async def fresh() -> AsyncIterator[aiohttp.ClientSession]:
    """A client opening a new connection per request, so refusals show as refusals."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as client:
        yield client


async def test_refuse_stops_listening_and_clearing_it_listens_on_the_same_port(
    fresh: aiohttp.ClientSession, node: SimNode
) -> None:
    port = node.port
    assert (await post(fresh, f"{node.url}/v1/chat/completions", CHAT))[0] == 200
    node.faults.refuse = True
    with pytest.raises(aiohttp.ClientConnectorError):
        await post(fresh, f"{node.url}/v1/chat/completions", CHAT)
    node.faults.refuse = False
    assert node.port == port
    assert (await post(fresh, f"{node.url}/v1/chat/completions", CHAT))[0] == 200


async def test_refuse_drops_connections_already_open(node: SimNode) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", node.port)
    node.faults.refuse = True
    assert await asyncio.wait_for(reader.read(), 1) == b""
    writer.close()
    await writer.wait_closed()


async def test_refuse_for_s_over_http_comes_back_by_itself(
    fresh: aiohttp.ClientSession, node: SimNode
) -> None:
    async with fresh.post(f"{node.url}/_sim/faults", json={"refuse_for_s": 0.5}) as response:
        assert response.status == 200
        assert (await response.json())["refuse"] is True
    with pytest.raises(aiohttp.ClientConnectorError):
        await post(fresh, f"{node.url}/v1/chat/completions", CHAT)
    for _ in range(100):
        if not node.faults.refuse:
            break
        await asyncio.sleep(0.02)
    assert node.faults.refuse is False
    assert (await post(fresh, f"{node.url}/v1/chat/completions", CHAT))[0] == 200


@pytest.mark.parametrize("forced", ["internal_error", "not_found"])
async def test_lifecycle_status_forces_reload_and_unload_answers(
    session: aiohttp.ClientSession, node: SimNode, forced: str
) -> None:
    node.faults.lifecycle_status = forced
    for op in ("reload", "unload"):
        status, text = await post(session, f"{node.url}/v1/models/{op}", {"model_id": "m"})
        answer = json.loads(text)
        assert status == 200 and answer["status"] == forced
        assert ("error" in answer) is (forced == "internal_error")
    status, text = await post(session, f"{node.url}/v1/models/status", {"model_id": "m"})
    assert json.loads(text)["status"] == "loaded"


async def test_faults_over_http_set_show_and_clear(
    session: aiohttp.ClientSession, node: SimNode
) -> None:
    async with session.post(
        f"{node.url}/_sim/faults", json={"no_done": True, "lifecycle_status": "not_found"}
    ) as response:
        assert response.status == 200
    assert node.faults.no_done and node.faults.lifecycle_status == "not_found"
    async with session.post(f"{node.url}/_sim/faults", json={"drop_after_chunks": 3}) as response:
        shown = await response.json()
    assert (shown["drop_after_chunks"], shown["no_done"]) == (3, True)
    for bad in (
        {"stalll": True},
        {"status": 42},
        {"lifecycle_status": "bogus"},
        {"drop_after_chunks": -1},
    ):
        async with session.post(f"{node.url}/_sim/faults", json=bad) as response:
            assert response.status == 422, bad
    async with session.delete(f"{node.url}/_sim/faults") as response:
        assert response.status == 200
    async with session.get(f"{node.url}/_sim/faults") as response:
        cleared = await response.json()
    assert not any(
        cleared[k]
        for k in ("drop_after_chunks", "no_done", "stall", "status", "refuse", "lifecycle_status")
    )
    await post(session, f"{node.url}/v1/chat/completions", CHAT)
    async with session.get(f"{node.url}/_sim/counters") as response:
        assert (await response.json())["/v1/chat/completions"] == 1


async def test_apply_faults_validates_names_and_values(node: SimNode) -> None:
    node.apply_faults({"stall": True, "status": 502})
    assert node.faults.stall and node.faults.status == 502
    with pytest.raises(ValueError, match="stalll"):
        node.apply_faults({"stalll": True})
    node.clear_faults()
    assert not node.faults.stall and node.faults.status is None
