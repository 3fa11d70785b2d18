"""Nodes that die, stall, flap, change their models or fail lifecycle calls, and
clients that all leave at once: what every client sees, and what is left behind."""

from __future__ import annotations

import asyncio
import gc
import signal
import time
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import orjson
import pytest

from cortex.sim import SimConfig, SimModel
from tests.conftest import Fleet, FleetFactory, open_fds, rss_mb
from tests.subproc import Cortex

HELLO = [{"role": "user", "content": "hello there"}]
CHAT = {"model": "m1", "messages": HELLO}
JSON = {"content-type": "application/json"}


# --- helpers -----------------------------------------------------------------------------


@pytest.fixture
async def sim_process() -> AsyncIterator[Callable[..., Awaitable[tuple[Cortex, str]]]]:
    """``cortex sim ARGS`` as a process of its own (to be killed for real), and its URL."""
    started: list[Cortex] = []

    async def spawn(*args: str) -> tuple[Cortex, str]:
        proc = await Cortex.spawn("sim", "--port", "0", *args)
        started.append(proc)
        return proc, (await proc.expect(r"listening on (http://\S+)")).group(1)

    yield spawn
    for proc in started:
        await proc.close()


def frames(raw: bytes) -> list[bytes]:
    return [f for f in raw.replace(b"\r\n", b"\n").split(b"\n\n") if f.strip()]


async def read_to_end(resp: aiohttp.ClientResponse, within: float) -> bytes:
    got = b""
    async with asyncio.timeout(within):
        try:
            async for chunk in resp.content.iter_any():
                got += chunk
        except aiohttp.ClientPayloadError:
            got += b"<broken>"
    return got


def routable(fleet: Fleet, name: str) -> bool:
    return fleet.gateway.supervisor.snapshot.nodes[name].state.routable


# --- a node process killed mid-stream ---------------------------------------------------------


async def test_a_node_killed_mid_stream(
    make_fleet: FleetFactory, sim_process: Callable[..., Awaitable[tuple[Cortex, str]]]
) -> None:
    doomed, doomed_url = await sim_process("--model", "m1:1000:0:20", "--answer-tokens", "2000")
    fleet = await make_fleet(
        {"b": SimConfig(models=[SimModel("m1", tok_per_s=20, answer_tokens=2000)])},
        nodes=[
            {"name": "doomed", "endpoint": doomed_url},
            {"name": "b", "endpoint": "{url:b}"},
        ],
    )
    assert routable(fleet, "doomed") and routable(fleet, "b")
    async with aiohttp.ClientSession() as s:
        streams: list[tuple[str, str, aiohttp.ClientResponse]] = []
        for i in range(8):
            path, body = (
                ("/v1/chat/completions", {**CHAT, "stream": True})
                if i % 4 < 2
                else ("/v1/messages", {**CHAT, "max_tokens": 4000, "stream": True})
            )
            resp = await s.post(fleet.url + path, data=orjson.dumps(body), headers=JSON)
            assert resp.status == 200
            seen = b""
            async with asyncio.timeout(10):
                while b"_delta" not in seen and b'"content":"' not in seen:
                    chunk = await resp.content.readany()  # the node's first token is through
                    assert chunk, f"stream {i} ended before its first token: {seen!r}"
                    seen += chunk
            streams.append((resp.headers["x-cortex-node"], path, resp))
        on_doomed = [(p, r) for n, p, r in streams if n == "doomed"]
        assert {p for p, _ in on_doomed} == {"/v1/chat/completions", "/v1/messages"}
        doomed.send(signal.SIGKILL)
        killed = time.monotonic()
        for path, resp in on_doomed:
            last = frames(await read_to_end(resp, within=3.0))[-1]
            if path == "/v1/messages":
                assert last.startswith(b"event: error\ndata: ")
                assert orjson.loads(last.split(b"data: ", 1)[1])["error"]["type"] == "api_error"
            else:
                assert orjson.loads(last.removeprefix(b"data: "))["error"]["code"] == "bad_gateway"
        assert time.monotonic() - killed < 3.0
        for node, _, resp in streams:  # the other node's streams go on
            if node == "b":
                assert await resp.content.readany()
            resp.close()
        await fleet.wait_for(lambda: not routable(fleet, "doomed"), within=5.0)
        short = orjson.dumps({**CHAT, "max_tokens": 2})
        for _ in range(4):
            async with s.post(fleet.url + "/v1/chat/completions", data=short, headers=JSON) as r:
                assert r.status == 200 and r.headers["x-cortex-node"] == "b"
    assert fleet.gateway.metrics.sample("cortex_node_up", node="doomed") == 0
    assert fleet.gateway.metrics.sample("cortex_node_up", node="b") == 1


# --- a node that accepts and never answers -------------------------------------------------


async def test_a_stalled_node_times_out_and_is_reported(make_fleet: FleetFactory) -> None:
    fleet = await make_fleet(
        {
            # more free VRAM: it wins the first tie
            "stuck": SimConfig(models=[SimModel("m1")], instant=True, vram_mb=32768),
            "b": SimConfig(models=[SimModel("m1")], instant=True),
        },
        gateway={"first_byte_timeout_s": 0.5},
        poll={"interval_s": 30.0},  # only what the request path reports moves the node
    )
    fleet.nodes["stuck"].faults.stall = True
    stuck = fleet.gateway.supervisor.snapshot.nodes["stuck"].handle
    async with aiohttp.ClientSession() as s:
        started = time.monotonic()
        async with s.post(
            fleet.url + "/v1/chat/completions",
            data=orjson.dumps({**CHAT, "stream": True}),
            headers=JSON,
        ) as r:
            assert r.status == 504
            assert r.headers["x-cortex-node"] == "stuck"
            err = (await r.json())["error"]
        assert err["code"] == "timeout" and "first byte" in err["message"]
        assert 0.5 <= time.monotonic() - started < 3.0
        assert stuck.inflight == 0
        errors = fleet.gateway.metrics.sample(
            "cortex_request_errors_total", node="stuck", error="GatewayTimeout"
        )
        assert errors == 1
        # reported: held out of routing for a poll interval (30 s), whatever its polls say
        assert not routable(fleet, "stuck")
        for _ in range(4):
            async with s.post(
                fleet.url + "/v1/chat/completions", data=orjson.dumps(CHAT), headers=JSON
            ) as r:
                assert r.status == 200 and r.headers["x-cortex-node"] == "b"


async def test_a_node_that_keeps_stalling_is_held_out_longer_each_time(
    make_fleet: FleetFactory,
) -> None:
    interval = 0.1
    fleet = await make_fleet(
        {
            # more free VRAM: it wins every tie, so it gets each request while it is up
            "stuck": SimConfig(models=[SimModel("m1")], instant=True, vram_mb=32768),
            "b": SimConfig(models=[SimModel("m1")], instant=True),
        },
        gateway={"first_byte_timeout_s": 0.3},
        poll={"interval_s": interval},
    )
    fleet.gateway.watchdog.period = 0.05  # a timeout fires within 0.05 s of its limit
    stuck = fleet.nodes["stuck"]
    stuck.faults.stall = True
    sup = fleet.gateway.supervisor
    handle = sup.snapshot.nodes["stuck"].handle

    async def chat(s: aiohttp.ClientSession) -> tuple[int, str]:
        body = orjson.dumps(CHAT)
        async with s.post(fleet.url + "/v1/chat/completions", data=body, headers=JSON) as r:
            await r.read()
            return r.status, r.headers.get("x-cortex-node", "")

    async def stall(s: aiohttp.ClientSession, hold: float, in_a_row: str) -> float:
        """One request stalls on `stuck`; how long it stays out of routing after that."""
        assert await chat(s) == (504, "stuck")
        held, polled = time.monotonic(), stuck.counters["/v1/models"]
        error = f"no first byte in 0.3 s; held out for {hold:g} s after {in_a_row}"
        assert sup.snapshot.nodes["stuck"].error == error
        while time.monotonic() < held + hold / 3:  # surely still held: the others serve
            assert await chat(s) == (200, "b")
        async with s.get(fleet.url + "/admin/fleet") as r:
            [node] = [n for n in (await r.json())["nodes"] if n["name"] == "stuck"]
        assert (node["state"], node["error"]) == ("down", error)
        assert fleet.gateway.metrics.sample("cortex_node_up", node="stuck") == 0
        await fleet.wait_for(lambda: routable(fleet, "stuck"))
        assert stuck.counters["/v1/models"] > polled  # its polls went on, and were good
        return time.monotonic() - held

    async with aiohttp.ClientSession() as s:
        out = [
            await stall(s, 0.1, "1 stall"),
            await stall(s, 0.2, "2 stalls in a row"),
            await stall(s, 0.4, "3 stalls in a row"),
        ]
        # out at least as long as each hold (its report came a few ms before `held`),
        # though good polls alone would have brought it back within about 0.1 s
        for took, hold in zip(out, (0.1, 0.2, 0.4), strict=True):
            assert hold - 0.02 < took < hold + 1.0
        assert handle.stalls == 3
        stuck.faults.stall = False
        assert await chat(s) == (200, "stuck")  # it answers again: the row is over
        assert handle.stalls == 0
        stuck.faults.stall = True
        await stall(s, 0.1, "1 stall")  # the base hold again


async def test_a_node_back_from_a_stall_hold_gets_one_request_at_a_time(
    make_fleet: FleetFactory,
) -> None:
    fleet = await make_fleet(
        {
            "stuck": SimConfig(models=[SimModel("m1")], instant=True, vram_mb=32768),
            "b": SimConfig(models=[SimModel("m1")], instant=True),
        },
        gateway={"first_byte_timeout_s": 0.3},
        poll={"interval_s": 0.1},
    )
    fleet.gateway.watchdog.period = 0.05
    fleet.nodes["stuck"].faults.stall = True

    async def chat(s: aiohttp.ClientSession) -> tuple[int, str]:
        body = orjson.dumps(CHAT)
        async with s.post(fleet.url + "/v1/chat/completions", data=body, headers=JSON) as r:
            await r.read()
            return r.status, r.headers.get("x-cortex-node", "")

    async with aiohttp.ClientSession() as s:
        assert await chat(s) == (504, "stuck")  # held out for 0.1 s
        await fleet.wait_for(lambda: routable(fleet, "stuck"))
        # back: it wins every tie, but only one request (the probe) goes to it
        answers = await asyncio.gather(*(chat(s) for _ in range(6)))
    assert sorted(answers) == [(200, "b")] * 5 + [(504, "stuck")]
    assert fleet.gateway.supervisor.snapshot.nodes["stuck"].handle.stalls == 2


# --- a flapping node -----------------------------------------------------------------------


async def test_a_flapping_node_causes_no_load_or_eviction_storm(make_fleet: FleetFactory) -> None:
    fleet = await make_fleet(
        {
            "flappy": SimConfig(
                models=[SimModel("m1", load_s=0.05), SimModel("m2", load_s=0.05)], instant=True
            ),
            "steady": SimConfig(
                models=[SimModel("m1", load_s=0.05), SimModel("m3", load_s=0.05, loaded=False)],
                instant=True,
                vram_mb=8192,
            ),
        },
        models=[{"id": m, "vram_mb": 4096} for m in ("m1", "m2", "m3")],
        poll={"interval_s": 0.1, "down_after": 1},
        gateway={"queue_timeout_s": 0.3},
    )
    flappy = fleet.nodes["flappy"]
    seen: dict[str, list[int]] = {"m1": [], "m2": []}
    stop = asyncio.Event()

    async def client(model: str) -> None:
        async with aiohttp.ClientSession() as s:
            while not stop.is_set():
                body = orjson.dumps({**CHAT, "model": model})
                async with s.post(fleet.url + "/v1/chat/completions", data=body, headers=JSON) as r:
                    seen[model].append(r.status)
                    await r.read()
                await asyncio.sleep(0.01)

    downs = 0  # transitions routable -> not routable, as the gateway saw them

    async def watch() -> None:
        nonlocal downs
        was_up = routable(fleet, "flappy")
        while True:
            up = routable(fleet, "flappy")
            downs += was_up and not up
            was_up = up
            await asyncio.sleep(0.005)

    watcher = asyncio.create_task(watch())
    clients = [asyncio.create_task(client(m)) for m in ("m1", "m1", "m2")]
    # ~2 s: refuse on, off, on... every poll or so; on a loaded machine polls can lag
    # behind the toggles, so keep flapping (up to ~10 s) until it was really seen down
    toggles = 0
    while toggles < 16 or (downs < 2 and toggles < 80):
        flappy.faults.refuse = not flappy.faults.refuse
        toggles += 1
        await asyncio.sleep(0.12)
    flappy.faults.refuse = False
    stop.set()
    await asyncio.gather(*clients)
    watcher.cancel()
    assert downs >= 2, "the node should really have been seen down"
    assert set(seen["m1"]) == {200}, "m1 is always on the steady node"
    assert 200 in seen["m2"] and set(seen["m2"]) <= {200, 503}
    for node in fleet.nodes.values():
        assert node.counters["/v1/models/reload"] == 0
        assert node.counters["/v1/models/unload"] == 0
    await fleet.wait_for(lambda: routable(fleet, "flappy"))


# --- a node restarted with other models ------------------------------------------------------


async def test_the_catalogue_follows_a_node_restarted_with_other_models(
    make_fleet: FleetFactory,
) -> None:
    interval = 0.2
    fleet = await make_fleet(
        {"a": SimConfig(models=[SimModel("m1", tok_per_s=50, answer_tokens=500)])},
        poll={"interval_s": interval},
    )
    node = fleet.nodes["a"]
    async with aiohttp.ClientSession() as s:

        async def catalogue() -> list[str]:
            async with s.get(fleet.url + "/v1/models") as r:
                return sorted(m["id"] for m in (await r.json())["data"])

        assert await catalogue() == ["m1"]
        stream = await s.post(
            fleet.url + "/v1/chat/completions",
            data=orjson.dumps({**CHAT, "stream": True}),
            headers=JSON,
        )
        await stream.content.readany()
        node.replace_models([SimModel("m3", tok_per_s=1000), SimModel("m4", loaded=False)])
        replaced = time.monotonic()
        last = frames(await read_to_end(stream, within=3.0))[-1]
        assert orjson.loads(last.removeprefix(b"data: "))["error"]["code"] == "stream_truncated"
        stream.close()
        while await catalogue() != ["m3", "m4"]:
            # within a poll or so (generous: a loaded machine delays the poll loop)
            assert time.monotonic() - replaced < interval * 2 + 1.0, "not within one poll"
            await asyncio.sleep(0.02)
        for model, status in (("m3", 200), ("m1", 404)):
            body = orjson.dumps({**CHAT, "model": model})
            async with s.post(fleet.url + "/v1/chat/completions", data=body, headers=JSON) as r:
                assert r.status == status


# --- lifecycle calls that fail ---------------------------------------------------------------


@pytest.mark.parametrize("answer", ["internal_error", "not_found"])
async def test_failed_lifecycle_calls_leave_nothing_stuck(
    make_fleet: FleetFactory, answer: str
) -> None:
    fleet = await make_fleet(
        {
            # room for m2 next to m1: loading it is a plain reload
            "roomy": SimConfig(
                models=[SimModel("m1", load_s=0.05), SimModel("m2", load_s=0.05, loaded=False)],
                vram_mb=16384,
                instant=True,
            ),
            # no room for m4 next to m3: m3 must be unloaded first
            "tight": SimConfig(
                models=[SimModel("m3", load_s=0.05), SimModel("m4", load_s=0.05, loaded=False)],
                vram_mb=6000,
                instant=True,
            ),
        },
        models=[{"id": m, "vram_mb": 4096} for m in ("m1", "m2", "m3", "m4")],
        gateway={"queue_timeout_s": 5.0},
    )
    for node in fleet.nodes.values():
        node.faults.lifecycle_status = answer

    async def chat(s: aiohttp.ClientSession, model: str) -> tuple[int, dict[str, Any]]:
        body = orjson.dumps({**CHAT, "model": model})
        async with s.post(fleet.url + "/v1/chat/completions", data=body, headers=JSON) as r:
            return r.status, await r.json()

    async with aiohttp.ClientSession() as s:
        for model in ("m2", "m4"):
            started = time.monotonic()
            status, body = await chat(s, model)
            assert status == 503, body
            assert body["error"]["type"] == "server_error"
            assert time.monotonic() - started < 2.5  # told at once, not after queue_timeout_s
        assert (await chat(s, "m1"))[0] == 200  # nothing was evicted or left half-unloaded
        assert (await chat(s, "m3"))[0] == 200
        assert fleet.gateway.supervisor._loads == {}
        for node in fleet.nodes.values():
            node.faults.lifecycle_status = None
        for model in ("m2", "m4", "m1"):
            status, body = await chat(s, model)
            assert status == 200, (model, body)
    assert fleet.nodes["tight"].counters["/v1/models/unload"] >= 2


# --- thousands of clients gone at once --------------------------------------------------------


async def _open_streams(port: int, n: int) -> list[asyncio.StreamWriter]:
    """``n`` raw streaming requests, each read up to its first event.

    Connections open 100 at a time, 10 batches a second: a node's accept backlog
    (1024 for mistral.rs and the emulator) cannot take a burst of thousands.
    """
    body = orjson.dumps({**CHAT, "stream": True})
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: c\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
    )

    async def one() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(head + body)
        return reader, writer

    async def first_event(reader: asyncio.StreamReader) -> None:
        got = b""
        while b"data:" not in got:  # the marker may be split across reads
            chunk = await reader.read(4096)
            assert chunk, f"connection closed before the first event: {got[-200:]!r}"
            got += chunk

    conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    for i in range(0, n, 100):
        conns += await asyncio.gather(*(one() for _ in range(min(100, n - i))))
        await asyncio.sleep(0.1)
    async with asyncio.timeout(10):
        await asyncio.gather(*(first_event(reader) for reader, _ in conns))
    return [writer for _, writer in conns]


async def test_two_thousand_clients_disconnecting_mid_stream(make_fleet: FleetFactory) -> None:
    fleet = await make_fleet(
        {"a": SimConfig(models=[SimModel("m1", tok_per_s=2, answer_tokens=400)], max_seqs=4096)},
        poll={"interval_s": 30.0},  # a poll slowed by the load must not mark the node down
    )
    node = fleet.nodes["a"]
    handle = fleet.gateway.supervisor.snapshot.nodes["a"].handle

    async def wave(n: int) -> None:
        writers = await _open_streams(fleet.gateway.port, n)
        assert node.running_sequences == n
        for w in writers:
            w.transport.abort()  # all at once, no goodbye
        del writers
        await fleet.wait_for(lambda: node.running_sequences == 0, within=10)
        await fleet.wait_for(lambda: fleet.gateway.active == 0 and handle.inflight == 0)
        await asyncio.sleep(0.3)  # the aborted transports finish closing over a few loop turns
        gc.collect()

    await wave(200)  # warm-up: pools, buffers, the allocator
    fds, tasks, objects, rss = open_fds(), len(asyncio.all_tasks()), len(gc.get_objects()), rss_mb()
    await wave(2000)
    await fleet.wait_for(lambda: open_fds() <= fds, within=5)
    await fleet.wait_for(lambda: len(asyncio.all_tasks()) <= tasks, within=5)
    assert len(gc.get_objects()) <= objects + 200
    assert len(fleet.gateway.watchdog) == 0
    # RSS keeps the peak of 2000 streams (allocator arenas); what is left must not be per stream:
    assert rss_mb() - rss < 200
    tracemalloc.start()
    try:
        traced = tracemalloc.get_traced_memory()[0]
        await wave(200)
        assert tracemalloc.get_traced_memory()[0] - traced < 200 * 1024  # < 1 KB per stream
    finally:
        tracemalloc.stop()
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            fleet.url + "/v1/chat/completions",
            data=orjson.dumps({**CHAT, "max_tokens": 1}),
            headers=JSON,
        ) as r,
    ):
        assert r.status == 200
