"""The OpenAI surface through a real gateway and emulated nodes, with real clients."""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import AsyncIterator

import aiohttp
import openai
import orjson
import pytest

from cortex.sim import SimConfig, SimModel, answer_text
from tests.conftest import FleetFactory

_clients: list[openai.AsyncOpenAI] = []


def oai(url: str, api_key: str = "unused") -> openai.AsyncOpenAI:
    """An SDK client, closed after the test (see the autouse fixture)."""
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=api_key, max_retries=0)
    _clients.append(client)
    return client


@pytest.fixture(autouse=True)
async def _close_clients() -> AsyncIterator[None]:
    yield
    while _clients:
        await _clients.pop().close()


HELLO = [{"role": "user", "content": "hello there"}]


async def test_models_are_merged_without_default(make_fleet: FleetFactory) -> None:
    fleet = await make_fleet(
        {
            "a": SimConfig(models=[SimModel("m1"), SimModel("shared")], instant=True),
            "b": SimConfig(models=[SimModel("m2"), SimModel("shared", loaded=False)], instant=True),
        },
        models=[{"id": "m1", "aliases": ["one"]}],
    )
    listing = await oai(fleet.url).models.list()
    ids = sorted(m.id for m in listing.data)
    assert ids == ["m1", "m2", "one", "shared"]
    async with aiohttp.ClientSession() as s, s.get(fleet.url + "/v1/models") as r:
        body = await r.json()
    shared = next(m for m in body["data"] if m["id"] == "shared")
    assert shared["cortex"]["nodes"] == {"a": "loaded", "b": "unloaded"}
    assert all(m["id"] != "default" for m in body["data"])


async def test_chat_plain_and_streamed_match_the_node(make_fleet: FleetFactory) -> None:
    fleet = await make_fleet()
    node = fleet.nodes["node-a"]
    direct = await oai(node.url).chat.completions.create(model="m1", messages=HELLO)  # type: ignore[arg-type]
    via = await oai(fleet.url).chat.completions.create(model="m1", messages=HELLO)  # type: ignore[arg-type]
    assert via.choices[0].message.content == direct.choices[0].message.content
    assert via.usage is not None and direct.usage is not None
    assert via.usage.completion_tokens == direct.usage.completion_tokens
    stream = await oai(fleet.url).chat.completions.create(model="m1", messages=HELLO, stream=True)  # type: ignore[arg-type]
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == direct.choices[0].message.content


async def test_completions_and_embeddings_match_the_node(make_fleet: FleetFactory) -> None:
    fleet = await make_fleet()
    client, direct = oai(fleet.url), oai(fleet.nodes["node-a"].url)
    for api in (client, direct):
        done = await api.completions.create(model="m1", prompt="once upon", max_tokens=5)
        assert done.choices[0].text == answer_text(5)
        chunks = [
            c
            async for c in await api.completions.create(
                model="m1", prompt="x", max_tokens=4, stream=True
            )
        ]
        assert "".join(c.choices[0].text for c in chunks if c.choices) == answer_text(4)
    via = await client.embeddings.create(model="m1", input=["a", "b"])
    node = await direct.embeddings.create(model="m1", input=["a", "b"])
    assert [e.embedding for e in via.data] == [e.embedding for e in node.data]
    assert len(via.data) == 2 and via.data[0].embedding != via.data[1].embedding


async def test_response_headers(make_fleet: FleetFactory) -> None:
    fleet = await make_fleet()
    body = orjson.dumps({"model": "m1", "messages": HELLO})
    async with aiohttp.ClientSession() as s:
        async with s.post(
            fleet.url + "/v1/chat/completions",
            data=body,
            headers={"content-type": "application/json"},
        ) as r:
            assert r.status == 200
            assert r.headers["x-cortex-node"] == "node-a"
            assert r.headers["x-request-id"].startswith("req_")
            assert float(r.headers["x-cortex-overhead-ms"]) >= 0
        async with s.post(
            fleet.url + "/v1/chat/completions",
            data=body,
            headers={"content-type": "application/json", "x-request-id": "mine-1"},
        ) as r:
            assert r.headers["x-request-id"] == "mine-1"


async def test_alias_is_rewritten_to_the_node_model_id(make_fleet: FleetFactory) -> None:
    fleet = await make_fleet(models=[{"id": "m1", "aliases": ["small"]}], model_map={"gpt-*": "m1"})
    for name in ("small", "gpt-4o"):
        done = await oai(fleet.url).chat.completions.create(model=name, messages=HELLO)  # type: ignore[arg-type]
        assert done.model == "m1"


async def test_unknown_model_is_404_without_touching_a_node(make_fleet: FleetFactory) -> None:
    fleet = await make_fleet()
    before = dict(fleet.nodes["node-a"].counters)
    with pytest.raises(openai.NotFoundError) as info:
        await oai(fleet.url).chat.completions.create(model="nope", messages=HELLO)  # type: ignore[arg-type]
    assert info.value.code == "model_not_found"
    assert dict(fleet.nodes["node-a"].counters).get("/v1/chat/completions") == before.get(
        "/v1/chat/completions"
    )


@pytest.mark.parametrize(
    ("body", "ctype", "status", "fragment"),
    [
        (b"{not json", "application/json", 400, "not valid JSON"),
        (b"[1, 2]", "application/json", 400, "invalid request body"),
        (b'{"messages": []}', "application/json", 400, "`model` is required"),
        (b'{"model": 7}', "application/json", 400, "invalid request body"),
        (b'{"model": "m1"}', "text/plain", 415, "Content-Type"),
        (b'{"model": "\xff\xfe"}', "application/json", 400, "not valid JSON (UTF-8)"),
    ],
)
async def test_bad_requests_get_openai_errors(
    make_fleet: FleetFactory, body: bytes, ctype: str, status: int, fragment: str
) -> None:
    fleet = await make_fleet()
    async with (
        aiohttp.ClientSession() as s,
        s.post(fleet.url + "/v1/chat/completions", data=body, headers={"content-type": ctype}) as r,
    ):
        assert r.status == status
        err = (await r.json())["error"]
        assert set(err) == {"message", "type", "param", "code"}
        assert fragment in err["message"]


async def test_body_over_the_limit_is_413(make_fleet: FleetFactory) -> None:
    fleet = await make_fleet(gateway={"max_body_mb": 1})
    big = (
        b'{"model":"m1","messages":[{"role":"user","content":"' + b"x" * (2 * 1024 * 1024) + b'"}]}'
    )
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            fleet.url + "/v1/chat/completions",
            data=io.BytesIO(big),
            headers={"content-type": "application/json"},
        ) as r,
    ):
        assert r.status == 413
        assert (await r.json())["error"]["code"] == "request_too_large"


async def test_unknown_path_is_404_in_openai_shape(make_fleet: FleetFactory) -> None:
    fleet = await make_fleet()
    async with aiohttp.ClientSession() as s:
        async with s.get(fleet.url + "/v2/whatever") as r:
            assert r.status == 404
            assert (await r.json())["error"]["type"] == "invalid_request_error"
        async with s.get(fleet.url + "/v1/chat/completions") as r:
            assert r.status == 405


async def test_health_and_ready(make_fleet: FleetFactory) -> None:
    fleet = await make_fleet()
    async with aiohttp.ClientSession() as s:
        async with s.get(fleet.url + "/health") as r:
            assert r.status == 200
        async with s.get(fleet.url + "/ready") as r:
            assert r.status == 200
            assert (await r.json())["nodes_up"] == ["node-a"]
        fleet.nodes["node-a"].faults.refuse = True
        await fleet.wait_for(
            lambda: not fleet.gateway.supervisor.snapshot.nodes["node-a"].state.routable
        )
        async with s.get(fleet.url + "/ready") as r:
            assert r.status == 503


async def _raw_stream(url: str, model: str = "m1") -> bytes:
    body = orjson.dumps({"model": model, "stream": True, "messages": HELLO})
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            url + "/v1/chat/completions", data=body, headers={"content-type": "application/json"}
        ) as r,
    ):
        assert r.status == 200
        return await r.read()


async def test_stream_cut_without_done_ends_with_an_error_event(make_fleet: FleetFactory) -> None:
    fleet = await make_fleet()
    fleet.nodes["node-a"].faults.no_done = True
    raw = await _raw_stream(fleet.url)
    last = raw.strip().split(b"\n\n")[-1]
    assert last.startswith(b"data: ")
    assert orjson.loads(last[6:])["error"]["code"] == "stream_truncated"


async def test_connection_dropped_mid_stream_ends_with_an_error_event(
    make_fleet: FleetFactory,
) -> None:
    fleet = await make_fleet()
    fleet.nodes["node-a"].faults.drop_after_chunks = 3
    raw = await _raw_stream(fleet.url)
    frames = raw.strip().split(b"\n\n")
    assert b'"error"' in frames[-1]
    assert b"[DONE]" not in raw


async def test_node_error_event_mid_stream_passes_through(make_fleet: FleetFactory) -> None:
    fleet = await make_fleet()
    fleet.nodes["node-a"].faults.error_after_chunks = 2
    raw = await _raw_stream(fleet.url)
    assert b'"error"' in raw and raw.rstrip().endswith(b"data: [DONE]")


async def test_first_byte_timeout_is_504(make_fleet: FleetFactory) -> None:
    fleet = await make_fleet(gateway={"first_byte_timeout_s": 0.3})
    fleet.nodes["node-a"].faults.stall = True
    with pytest.raises(openai.APIStatusError) as info:
        await oai(fleet.url).chat.completions.create(model="m1", messages=HELLO)  # type: ignore[arg-type]
    assert info.value.status_code == 504


async def test_failover_when_a_node_refuses_connections(make_fleet: FleetFactory) -> None:
    fleet = await make_fleet(
        {
            "a": SimConfig(models=[SimModel("m1")], instant=True),
            "b": SimConfig(models=[SimModel("m1")], instant=True),
        },
        poll={"interval_s": 30.0},
    )
    fleet.nodes["a"].faults.refuse = True
    client = oai(fleet.url)
    for _ in range(6):
        raw = await client.chat.completions.with_raw_response.create(
            model="m1",
            messages=HELLO,  # type: ignore[arg-type]
        )
        assert raw.headers["x-cortex-node"] == "b"
        assert raw.parse().choices[0].message.content
    # a was tried, failed, and is out of the routes until it polls well again
    assert not fleet.gateway.supervisor.snapshot.nodes["a"].state.routable


async def test_aborted_streams_leave_nothing_behind(make_fleet: FleetFactory) -> None:
    fleet = await make_fleet(
        {"a": SimConfig(models=[SimModel("m1", tok_per_s=200.0, answer_tokens=500)])}
    )
    body = orjson.dumps({"model": "m1", "stream": True, "messages": HELLO})
    baseline_tasks = len(asyncio.all_tasks())

    async def abort_after_first_chunk(s: aiohttp.ClientSession) -> None:
        async with s.post(
            fleet.url + "/v1/chat/completions",
            data=body,
            headers={"content-type": "application/json"},
        ) as r:
            await r.content.readany()

    async with aiohttp.ClientSession() as s:
        for _ in range(5):
            await asyncio.gather(*(abort_after_first_chunk(s) for _ in range(40)))
    handle = fleet.gateway.supervisor.snapshot.nodes["a"].handle
    await fleet.wait_for(lambda: handle.inflight == 0, within=5)
    await fleet.wait_for(lambda: len(asyncio.all_tasks()) <= baseline_tasks + 2, within=5)
    await fleet.wait_for(lambda: fleet.nodes["a"].running_sequences == 0, within=5)


async def test_api_keys(make_fleet: FleetFactory) -> None:
    fleet = await make_fleet(gateway={"api_keys": ["k-123"]})
    with pytest.raises(openai.AuthenticationError):
        await oai(fleet.url).models.list()
    ok = oai(fleet.url, api_key="k-123")
    assert [m.id for m in (await ok.models.list()).data] == ["m1"]
    async with aiohttp.ClientSession() as s:
        async with s.get(fleet.url + "/v1/models", headers={"x-api-key": "k-123"}) as r:
            assert r.status == 200
        async with s.get(fleet.url + "/health") as r:
            assert r.status == 200


async def test_a_client_gone_during_a_load_is_a_quiet_499(
    make_fleet: FleetFactory, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("cortex.proxy.KEEPALIVE_EVERY_S", 0.05)
    fleet = await make_fleet({"a": SimConfig(models=[SimModel("cold", loaded=False, load_s=0.5)])})
    body = orjson.dumps({"model": "cold", "stream": True, "messages": HELLO})
    with caplog.at_level(logging.INFO, logger="cortex"):
        async with aiohttp.ClientSession() as s:
            r = await s.post(
                fleet.url + "/v1/chat/completions",
                data=body,
                headers={"content-type": "application/json"},
            )
            assert r.status == 200
            assert (await r.content.readany()).startswith(b": cortex")
            r.close()  # gone while the model loads and keep-alives are being written
            await fleet.wait_for(lambda: any(rec.name == "cortex.access" for rec in caplog.records))
            await asyncio.sleep(0.6)  # keep-alives would have hit the closed socket by now
    errors = [rec for rec in caplog.records if rec.levelno >= logging.ERROR]
    assert errors == []
    access = [getattr(rec, "fields", {}) for rec in caplog.records if rec.name == "cortex.access"]
    assert [(f["status"], f["error"]) for f in access] == [(499, "client_disconnected")]
