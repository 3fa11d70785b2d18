"""The fleet through a real gateway: routing, eviction, loads, failover, restarts.

Every test sends real HTTP requests to a gateway in front of emulated
mistral.rs nodes (unit-level supervisor tests live in ``test_supervisor.py``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import msgspec
import orjson
import pytest
from aiohttp import web

import cortex.proxy
from cortex.app import Gateway
from cortex.demo import FLEET, demo_config
from cortex.sim import SimConfig, SimModel, SimNode
from tests.conftest import Fleet, FleetFactory

JSON = {"content-type": "application/json"}
HELLO = [{"role": "user", "content": "hello there"}]


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def chat(
    http: aiohttp.ClientSession, fleet: Fleet, model: str, **extra: Any
) -> tuple[int, str, dict[str, Any]]:
    """A non-streaming chat completion: status, the node that served it, the body."""
    body = orjson.dumps({"model": model, "messages": HELLO, **extra})
    async with http.post(fleet.url + "/v1/chat/completions", data=body, headers=JSON) as r:
        return r.status, r.headers.get("x-cortex-node", ""), orjson.loads(await r.read())


async def open_stream(
    http: aiohttp.ClientSession, fleet: Fleet, model: str, **extra: Any
) -> aiohttp.ClientResponse:
    """A chat stream with its headers read; the caller reads (or releases) the rest."""
    body = orjson.dumps({"model": model, "messages": HELLO, "stream": True, **extra})
    resp = await http.post(fleet.url + "/v1/chat/completions", data=body, headers=JSON)
    assert resp.status == 200, await resp.text()
    return resp


async def admin_fleet(http: aiohttp.ClientSession, fleet: Fleet) -> dict[str, dict[str, Any]]:
    """``GET /admin/fleet`` as node name -> node info."""
    async with http.get(fleet.url + "/admin/fleet") as r:
        assert r.status == 200
        return {n["name"]: n for n in (await r.json())["nodes"]}


async def statuses(http: aiohttp.ClientSession, fleet: Fleet, node: str) -> dict[str, str]:
    info = (await admin_fleet(http, fleet))[node]
    return {m["id"]: m["status"] for m in info["models"]}


async def ready(http: aiohttp.ClientSession, fleet: Fleet) -> tuple[int, list[str]]:
    async with http.get(fleet.url + "/ready") as r:
        return r.status, (await r.json())["nodes_up"]


def model(model_id: str, size: int = 4000, **kw: Any) -> SimModel:
    kw.setdefault("load_s", 0.1)
    return SimModel(model_id, size_mb=size, **kw)


def sizes(*models: SimModel) -> list[dict[str, Any]]:
    """``[[models]]`` entries with the sims' true sizes (placement needs them)."""
    return [{"id": m.id, "vram_mb": m.size_mb} for m in models]


# --- routing ------------------------------------------------------------------------


async def test_a_request_goes_to_the_node_where_its_model_is_loaded(
    make_fleet: FleetFactory, http: aiohttp.ClientSession
) -> None:
    fleet = await make_fleet(
        {
            "a": SimConfig(models=[model("only-a"), model("both", loaded=False)], instant=True),
            "b": SimConfig(models=[model("only-b"), model("both")], instant=True),
        }
    )
    for name, node in (("only-a", "a"), ("only-b", "b"), ("both", "b"), ("both", "b")):
        status, served_by, body = await chat(http, fleet, name)
        assert (status, served_by, body["model"]) == (200, node, name)
    assert fleet.nodes["a"].counters["/v1/chat/completions"] == 1
    assert fleet.nodes["a"].counters["/v1/models/reload"] == 0


async def test_least_loaded_node_wins_between_two_that_have_the_model(
    make_fleet: FleetFactory, http: aiohttp.ClientSession
) -> None:
    slow = model("shared", tok_per_s=20.0, answer_tokens=200)  # a 10 s answer: held open
    fleet = await make_fleet({"a": SimConfig(models=[slow]), "b": SimConfig(models=[slow])})
    held = [await open_stream(http, fleet, "shared")]
    busy = held[0].headers["x-cortex-node"]
    other = "b" if busy == "a" else "a"
    try:
        for _ in range(3):  # one in flight on `busy`, none on `other`
            status, served_by, _ = await chat(http, fleet, "shared", max_tokens=1)
            assert (status, served_by) == (200, other)
        held.append(await open_stream(http, fleet, "shared"))
        assert held[1].headers["x-cortex-node"] == other
        held.append(await open_stream(http, fleet, "shared"))  # 1 and 1: a tie, either
        held.append(await open_stream(http, fleet, "shared"))  # 2 and 1: the one with 1
        nodes = sorted(r.headers["x-cortex-node"] for r in held)
        assert nodes == ["a", "a", "b", "b"]
    finally:
        for resp in held:
            resp.close()


# --- eviction ---------------------------------------------------------------------


async def test_lru_eviction_spares_pinned_and_busy_models(
    make_fleet: FleetFactory, http: aiohttp.ClientSession
) -> None:
    models = [
        model("pinned"),  # never used: the oldest, but pinned
        model("busy", tok_per_s=20.0, answer_tokens=30),  # used first, then busy streaming
        model("old", tok_per_s=1000.0),  # used after `busy`: the one LRU should take
        model("new", loaded=False, load_s=0.2),
    ]
    fleet = await make_fleet(
        {"a": SimConfig(models=models, vram_mb=12000)},
        nodes=[{"name": "a", "endpoint": "{url:a}", "vram_mb": 12000, "pinned": ["pinned"]}],
        models=sizes(*models),
        eviction={"grace_s": 5.0},
    )
    node = fleet.nodes["a"]
    assert (await chat(http, fleet, "busy", max_tokens=1))[0] == 200
    assert (await chat(http, fleet, "old", max_tokens=1))[0] == 200
    stream = await open_stream(http, fleet, "busy")
    try:
        status, served_by, body = await chat(http, fleet, "new")
        assert (status, served_by, body["model"]) == (200, "a", "new")
        assert node.counters["/v1/models/unload"] == 1
        assert node.counters["/v1/models/reload"] == 1
        assert await statuses(http, fleet, "a") == {
            "pinned": "loaded",
            "busy": "loaded",
            "old": "unloaded",
            "new": "loaded",
        }
        raw = await stream.read()  # the busy stream was never cut
    finally:
        stream.close()
    assert raw.rstrip().endswith(b"data: [DONE]")
    assert node.counters["abort"] == 0
    assert fleet.gateway.metrics.sample("cortex_model_evictions_total", model="old") == 1


async def test_priority_strategy_evicts_the_lowest_priority_first(
    make_fleet: FleetFactory, http: aiohttp.ClientSession
) -> None:
    models = [model("low"), model("high"), model("new", loaded=False)]
    fleet = await make_fleet(
        {"a": SimConfig(models=models, vram_mb=8000, instant=True)},
        models=[
            {"id": "low", "vram_mb": 4000, "priority": 1},
            {"id": "high", "vram_mb": 4000, "priority": 5},
            {"id": "new", "vram_mb": 4000},
        ],
        eviction={"strategy": "priority"},
    )
    assert (await chat(http, fleet, "high"))[0] == 200
    assert (await chat(http, fleet, "low"))[0] == 200  # the most recent: LRU would spare it
    assert (await chat(http, fleet, "new"))[0] == 200
    assert await statuses(http, fleet, "a") == {
        "low": "unloaded",
        "high": "loaded",
        "new": "loaded",
    }
    metrics = fleet.gateway.metrics
    assert metrics.sample("cortex_model_evictions_total", model="low", reason="priority") == 1
    assert metrics.sample("cortex_model_evictions_total", model="high") == 0


# --- loads --------------------------------------------------------------------------


async def test_fifty_concurrent_requests_share_one_load(
    make_fleet: FleetFactory, http: aiohttp.ClientSession
) -> None:
    cold = model("cold", loaded=False, load_s=0.5)
    fleet = await make_fleet({"a": SimConfig(models=[model("warm"), cold], instant=True)})
    results = await asyncio.gather(*(chat(http, fleet, "cold") for _ in range(50)))
    node = fleet.nodes["a"]
    assert [status for status, _, _ in results] == [200] * 50, results
    assert all(body["choices"][0]["message"]["content"] for _, _, body in results)
    assert not [b for _, _, b in results if "being reloaded" in orjson.dumps(b).decode()]
    assert node.counters["/v1/models/reload"] == 1
    assert node.counters["lazy_load"] == 0
    assert node.counters["/v1/chat/completions"] == 50


async def test_a_stream_waiting_for_a_load_gets_headers_and_keepalives_at_once(
    make_fleet: FleetFactory, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cortex.proxy, "KEEPALIVE_EVERY_S", 0.2)
    load_s = 3.0  # long enough that "at once" stands out on a loaded machine
    fleet = await make_fleet(
        {"a": SimConfig(models=[model("cold", loaded=False, load_s=load_s)], instant=True)}
    )
    started = time.monotonic()
    stream = await open_stream(http, fleet, "cold")
    try:
        headers_after = time.monotonic() - started
        assert stream.headers["Content-Type"].startswith("text/event-stream")
        first = await stream.content.readuntil(b"\n\n")
        first_after = time.monotonic() - started
        rest = await stream.read()
    finally:
        stream.close()
    assert headers_after < 1.5  # well before the load (3 s) is over
    assert first.startswith(b":")  # an SSE comment, ignored by clients
    assert first_after < 2.5  # a keep-alive, still before the load is over
    frames = [f for f in rest.split(b"\n\n") if f.startswith(b"data: ")]
    assert frames[-1] == b"data: [DONE]"
    assert b'"content":"' in frames[0]
    assert fleet.nodes["a"].counters["/v1/models/reload"] == 1


async def test_queue_timeout_is_503_with_retry_after(
    make_fleet: FleetFactory, http: aiohttp.ClientSession
) -> None:
    fleet = await make_fleet(
        {"a": SimConfig(models=[model("glacial", loaded=False, load_s=5.0)], instant=True)},
        gateway={"queue_timeout_s": 0.5},
    )
    body = orjson.dumps({"model": "glacial", "messages": HELLO})
    started = time.monotonic()
    async with http.post(fleet.url + "/v1/chat/completions", data=body, headers=JSON) as r:
        assert r.status == 503
        assert int(r.headers["Retry-After"]) >= 1
        error = (await r.json())["error"]
    assert time.monotonic() - started < 3.0
    assert set(error) == {"message", "type", "param", "code"}
    assert "glacial" in error["message"]


# --- node failures ------------------------------------------------------------------


@pytest.mark.parametrize("kill", ["stop", "refuse"])
async def test_requests_fail_over_when_a_node_dies(
    make_fleet: FleetFactory, http: aiohttp.ClientSession, kill: str
) -> None:
    both = [model("shared")]
    fleet = await make_fleet(
        {"a": SimConfig(models=both, instant=True), "b": SimConfig(models=both, instant=True)},
        poll={"interval_s": 5.0},  # only the failed request may notice the death
    )
    assert (await chat(http, fleet, "shared"))[:2] == (200, "a")  # a tie goes to the first
    if kill == "stop":
        await fleet.nodes["a"].stop()
    else:
        fleet.nodes["a"].faults.refuse = True
    for _ in range(3):
        status, served_by, body = await chat(http, fleet, "shared")
        assert (status, served_by) == (200, "b"), body
    info = await admin_fleet(http, fleet)
    assert info["a"]["state"] == "down" and info["a"]["error"]
    assert (await ready(http, fleet)) == (200, ["b"])


async def test_node_down_and_up_hysteresis_in_ready_and_admin_fleet(
    make_fleet: FleetFactory, http: aiohttp.ClientSession
) -> None:
    interval, down_after = 0.25, 3
    fleet = await make_fleet(
        {
            "a": SimConfig(models=[model("m")], instant=True),
            "b": SimConfig(models=[model("m")], instant=True),
        },
        poll={"interval_s": interval, "timeout_s": 0.2, "down_after": down_after},
    )
    assert await ready(http, fleet) == (200, ["a", "b"])
    b = fleet.nodes["b"]
    b.faults.refuse = True
    refused = time.monotonic()
    seen_up_after_a_failure = False
    while (state := await ready(http, fleet)) != (200, ["a"]):
        assert state == (200, ["a", "b"])  # up, or just down: nothing in between
        seen_up_after_a_failure |= time.monotonic() - refused > interval * 1.5
        assert time.monotonic() - refused < 5, "b never went down"
        await asyncio.sleep(0.03)
    went_down = time.monotonic() - refused
    # down only after `down_after` failed polls in a row: at least (down_after - 1) intervals
    assert went_down >= (down_after - 1) * interval * 0.9
    assert seen_up_after_a_failure
    info = (await admin_fleet(http, fleet))["b"]
    assert (info["state"], bool(info["error"])) == ("down", True)
    assert await ready(http, fleet) == (200, ["a"])

    fleet.nodes["a"].faults.refuse = True
    await _until(http, fleet, lambda code, up: code == 503)
    async with http.get(fleet.url + "/ready") as r:
        assert (await r.json()) == {"ready": False, "nodes_up": []}

    b.faults.refuse = False  # one good poll brings it back
    back = time.monotonic()
    await _until(http, fleet, lambda code, up: up == ["b"])
    assert time.monotonic() - back < 2.0  # a poll or two (generous for a loaded machine)
    info = (await admin_fleet(http, fleet))["b"]
    assert (info["state"], info["error"]) == ("up", "")
    fleet.nodes["a"].faults.refuse = False
    await _until(http, fleet, lambda code, up: up == ["a", "b"])


async def _until(
    http: aiohttp.ClientSession,
    fleet: Fleet,
    check: Callable[[int, list[str]], bool],
    within: float = 5,
) -> None:
    deadline = time.monotonic() + within
    while not check(*await ready(http, fleet)):
        assert time.monotonic() < deadline, "/ready never showed the expected state"
        await asyncio.sleep(0.03)


# --- defrag restarts ------------------------------------------------------------------


async def test_defrag_drains_then_restarts_through_the_agent(
    make_fleet: FleetFactory, http: aiohttp.ClientSession, aiohttp_server: Any
) -> None:
    calls: list[tuple[str, int]] = []
    restarted = asyncio.Event()
    box: dict[str, Fleet] = {}

    async def restart(request: web.Request) -> web.Response:
        fl = box["fleet"]
        calls.append(
            (
                request.headers.get("Authorization", ""),
                fl.gateway.supervisor.snapshot.nodes["a"].handle.inflight,
            )
        )
        restarted.set()
        node = fl.nodes["a"]
        node.faults.refuse = True  # the process goes away...
        await asyncio.sleep(0.3)
        node.replace_models(None)
        node.faults.refuse = False  # ...and comes back with its configured models
        return web.json_response({"unit": "mistralrs.service", "restarted": True, "seconds": 0.3})

    app = web.Application()
    app.router.add_post("/restart", restart)
    agent = await aiohttp_server(app)
    models = [
        model("x", 8000, tok_per_s=20.0, answer_tokens=12),
        model("y", 8000, loaded=False, tok_per_s=20.0, answer_tokens=12),
    ]
    fleet = await make_fleet(
        {"a": SimConfig(models=models, vram_mb=8000)},
        nodes=[
            {
                "name": "a",
                "endpoint": "{url:a}",
                "vram_mb": 8000,
                "agent": str(agent.make_url("")).rstrip("/"),
                "agent_token": "s3cret",
            }
        ],
        models=sizes(*models),
        eviction={"defrag_after_cycles": 2, "grace_s": 5.0},
    )
    box["fleet"] = fleet
    assert (await chat(http, fleet, "y", max_tokens=1))[0] == 200  # evicts x: cycle 1
    stream = await open_stream(http, fleet, "x")  # evicts y: cycle 2, then 0.6 s of tokens
    states: set[str] = set()
    try:
        deadline = time.monotonic() + 5
        while not restarted.is_set():
            assert time.monotonic() < deadline, "the agent was never asked to restart the node"
            states.add((await admin_fleet(http, fleet))["a"]["state"])
            await asyncio.sleep(0.02)
        raw = await stream.read()
    finally:
        stream.close()
    assert raw.rstrip().endswith(b"data: [DONE]")  # drained, not cut by the restart
    assert "draining" in states
    assert calls == [("Bearer s3cret", 0)]
    # a request during the restart waits for the node to come back
    status, served_by, _ = await chat(http, fleet, "x", max_tokens=1)
    assert (status, served_by) == (200, "a")
    await fleet.wait_for(lambda: fleet.gateway.metrics.sample("cortex_node_restarts_total") == 1)
    info = (await admin_fleet(http, fleet))["a"]
    assert (info["state"], info["cycles"]) == ("up", 0)
    assert len(calls) == 1


# --- the demo fleet ---------------------------------------------------------------------


async def test_the_demo_fleet_evicts_when_models_are_asked_for_in_turn(
    http: aiohttp.ClientSession,
) -> None:
    # The demo's own nodes and gateway config, on ephemeral ports; loads made quick.
    nodes = [
        SimNode(
            SimConfig(
                models=[msgspec.structs.replace(m, load_s=0.1, tok_per_s=1000.0) for m in specs],
                vram_mb=vram,
                name=name,
            )
        )
        for name, vram, specs, _ in FLEET
    ]
    gateway: Gateway | None = None
    try:
        for node in nodes:
            await node.start("127.0.0.1", 0)
        gateway = Gateway(demo_config(0, 0, tuple(n.port for n in nodes)))
        await gateway.start()
        fleet = Fleet(gateway, {n.config.name: n for n in nodes})
        large = fleet.nodes["gpu-large"]

        for alias, where in (
            ("coder", "gpu-large"),
            ("tiny", "gpu-small"),
            ("gpt-4o", "gpu-medium"),
        ):
            status, served_by, _ = await chat(http, fleet, alias, max_tokens=2)
            assert (status, served_by) == (200, where)
        assert large.counters["/v1/models/unload"] == 0

        status, served_by, body = await chat(http, fleet, "vision", max_tokens=2)
        assert (status, served_by, body["model"]) == (200, "gpu-large", "your-org/vision")
        assert await statuses(http, fleet, "gpu-large") == {
            "your-org/large-model": "loaded",  # pinned
            "your-org/coder": "unloaded",
            "your-org/vision": "loaded",
        }
        status, served_by, _ = await chat(http, fleet, "coder", max_tokens=2)
        assert (status, served_by) == (200, "gpu-large")
        assert await statuses(http, fleet, "gpu-large") == {
            "your-org/large-model": "loaded",
            "your-org/coder": "loaded",
            "your-org/vision": "unloaded",
        }
        assert large.counters["/v1/models/unload"] == 2
        evicted = gateway.metrics.sample("cortex_model_evictions_total", node="gpu-large")
        assert evicted == 2
    finally:
        if gateway is not None:
            await gateway.stop()
        for node in nodes:
            await node.stop()


# --- measured GPU memory from the node agent -------------------------------------------


async def test_the_agents_gpu_figures_reach_the_fleet_view_metrics_and_placement(
    make_fleet: FleetFactory, http: aiohttp.ClientSession, aiohttp_server: Any
) -> None:
    tokens: list[str] = []

    async def gpu(request: web.Request) -> web.Response:
        tokens.append(request.headers.get("Authorization", ""))
        report = {
            "available": True,
            "gpus": [
                {
                    "index": 0,
                    "name": "RTX 4090",
                    "memory_used_mb": 6000,
                    "memory_total_mb": 8000,
                    "utilization_pct": 40,
                },
                {
                    "index": 1,
                    "name": "RTX 4090",
                    "memory_used_mb": 1000,
                    "memory_total_mb": 8000,
                    "utilization_pct": 5,
                },
            ],
        }
        return web.json_response(report)

    app = web.Application()
    app.router.add_get("/gpu", gpu)
    agent = await aiohttp_server(app)
    # No vram_mb in the config: the measured 16000 MiB is the node's capacity.
    models = [model("x", 9000), model("y", 9000, loaded=False)]
    fleet = await make_fleet(
        {"a": SimConfig(models=models, vram_mb=18000)},
        nodes=[
            {
                "name": "a",
                "endpoint": "{url:a}",
                "agent": str(agent.make_url("")).rstrip("/"),
                "agent_token": "s3cret",
            }
        ],
        models=sizes(*models),
    )
    await fleet.wait_for(lambda: fleet.gateway.supervisor.snapshot.nodes["a"].gpu_total_mb == 16000)
    info = (await admin_fleet(http, fleet))["a"]
    assert (info["gpu_used_mb"], info["gpu_total_mb"], info["vram_total_mb"]) == (
        7000,
        16000,
        16000,
    )
    assert tokens[0] == "Bearer s3cret"
    metrics = fleet.gateway.metrics
    assert metrics.sample("cortex_node_gpu_memory_used_bytes", node="a") == 7000 * 1024 * 1024
    assert metrics.sample("cortex_node_gpu_memory_total_bytes", node="a") == 16000 * 1024 * 1024
    # 9000 + 9000 > 16000 measured: loading y must evict x first.
    status, node, _ = await chat(http, fleet, "y")
    assert (status, node) == (200, "a")
    assert await statuses(http, fleet, "a") == {"x": "unloaded", "y": "loaded"}


async def test_a_node_back_from_down_has_its_anthropic_route_probed_again(
    make_fleet: FleetFactory,
) -> None:
    fleet = await make_fleet(
        {"a": SimConfig(models=[model("m")], instant=True)},
        poll={"interval_s": 0.1, "timeout_s": 0.2, "down_after": 1},
    )
    supervisor = fleet.gateway.supervisor
    handle = supervisor.snapshot.nodes["a"].handle
    handle.messages_native = False  # an older node: its 404 was remembered
    fleet.nodes["a"].faults.refuse = True
    await fleet.wait_for(lambda: not supervisor.snapshot.nodes["a"].state.routable)
    assert handle.messages_native is False
    fleet.nodes["a"].faults.refuse = False
    await fleet.wait_for(lambda: supervisor.snapshot.nodes["a"].state.routable)
    assert handle.messages_native is None
