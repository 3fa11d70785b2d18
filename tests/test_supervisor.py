"""The supervisor: pure reconciliation helpers, then the real thing against emulated nodes."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import msgspec
import orjson
import pytest
from aiohttp import web

from cortex import config
from cortex.errors import ModelNotFound, NotFound, Unavailable
from cortex.fleet import ModelState, NodeState, Snapshot, begin, end
from cortex.nodeapi import is_oom, parse_metrics, parse_models
from cortex.sim import SimConfig, SimModel, SimNode
from cortex.supervisor import Supervisor
from tests.conftest import with_sections

L, U, R = ModelState.LOADED, ModelState.UNLOADED, ModelState.RELOADING
UP, DOWN, UNKNOWN = NodeState.UP, NodeState.DOWN, NodeState.UNKNOWN

# --- pure helpers --------------------------------------------------------------


def test_parse_models_skips_default_and_keeps_statuses() -> None:
    raw = orjson.dumps(
        {
            "object": "list",
            "data": [
                {"id": "default", "object": "model", "root": "default"},
                {"id": "a", "status": "loaded"},
                {"id": "b", "status": "unloaded"},
                {"id": "c", "status": "reloading"},
                {"id": "lora", "parent": "a"},
                {"id": "odd", "status": "something-new"},
            ],
        }
    )
    assert parse_models(raw) == {"a": L, "b": U, "c": R, "lora": L}


def test_parse_models_a_model_listed_twice_is_not_loaded() -> None:
    stuck = [{"id": "a", "status": "loaded"}, {"id": "a", "status": "reloading"}]
    assert parse_models(orjson.dumps({"data": stuck})) == {"a": R}
    assert parse_models(orjson.dumps({"data": stuck[::-1]})) == {"a": R}


def test_parse_metrics_sums_over_labels_and_tolerates_absence() -> None:
    text = (
        "# HELP mistralrs_sequences_running running\n"
        "# TYPE mistralrs_sequences_running gauge\n"
        'mistralrs_sequences_running{model="a"} 3\n'
        'mistralrs_sequences_running{model="b"} 2\n'
        "mistralrs_sequences_waiting 7 1700000000\n"
        "mistralrs_sequences_capacity 32\n"
    )
    assert parse_metrics(text) == (5, 7)
    assert parse_metrics("other_metric 1\n") == (None, None)


def test_is_oom() -> None:
    assert is_oom("CUDA out of memory: tried to allocate 8000 MiB (4000 MiB free)")
    assert is_oom("Error: OOM while loading")
    assert not is_oom("no loader config")
    assert not is_oom(None)


# --- harness ---------------------------------------------------------------------


@dataclass
class Events:
    """A FleetEvents that remembers everything."""

    loads: list[tuple[str, str, str]] = field(default_factory=list)
    evictions: list[tuple[str, str, str]] = field(default_factory=list)
    restarts: list[str] = field(default_factory=list)
    snapshots: list[Snapshot] = field(default_factory=list)
    waiting: Counter[str] = field(default_factory=Counter)
    max_waiting: int = 0

    def model_load(self, node: str, model: str, result: str, seconds: float) -> None:
        self.loads.append((node, model, result))

    def model_evicted(self, node: str, model: str, reason: str) -> None:
        self.evictions.append((node, model, reason))

    def node_restart(self, node: str) -> None:
        self.restarts.append(node)

    def fleet_changed(self, snapshot: Snapshot) -> None:
        self.snapshots.append(snapshot)

    def queued(self, model: str, delta: int) -> None:
        self.waiting[model] += delta
        self.max_waiting = max(self.max_waiting, self.waiting[model])


@dataclass
class Harness:
    sup: Supervisor
    nodes: dict[str, SimNode]
    events: Events
    cfg: config.Config

    def state(self, node: str, model: str) -> ModelState:
        return self.sup.snapshot.nodes[node].models[model]

    def node_state(self, node: str) -> NodeState:
        return self.sup.snapshot.nodes[node].state

    def handle(self, node: str) -> Any:
        return self.sup.snapshot.nodes[node].handle


Make = Callable[..., Awaitable[Harness]]


def make_config(
    sims: dict[str, SimNode], sizes: dict[str, int] | None = None, **sections: Any
) -> config.Config:
    if sizes is None:
        sizes = {m.id: m.size_mb for n in sims.values() for m in n.config.models}
    raw: dict[str, Any] = {
        "gateway": {"queue_timeout_s": 5.0},
        "poll": {"interval_s": 0.1, "timeout_s": 0.5, "down_after": 2},
        "eviction": {"grace_s": 1.0, "defrag_after_cycles": 0},
        "nodes": [
            {"name": name, "endpoint": n.url, "vram_mb": n.config.vram_mb}
            for name, n in sims.items()
        ],
        "models": [{"id": m, "vram_mb": s} for m, s in sizes.items()],
    }
    return with_sections(raw, sections)


@pytest.fixture
async def make() -> AsyncIterator[Make]:
    """Start sim nodes and a supervisor over them; all stop at teardown.

    ``await make({"a": SimConfig(...)}, sizes={...}, eviction={...}, nodes=[...])``:
    sections merge over the defaults; ``sizes`` are the ``[[models]]`` sizes
    (default: the sims' true sizes).
    """
    cleanup: list[Callable[[], Awaitable[None]]] = []
    session = aiohttp.ClientSession()

    async def factory(
        sims: dict[str, SimConfig], sizes: dict[str, int] | None = None, **sections: Any
    ) -> Harness:
        nodes = {name: SimNode(cfg) for name, cfg in sims.items()}
        for node in nodes.values():
            await node.start("127.0.0.1", 0)
            cleanup.append(node.stop)
        for extra in sections.get("nodes", []):
            extra.setdefault("endpoint", nodes[extra["name"]].url)
        cfg = make_config(nodes, sizes, **sections)
        events = Events()
        sup = Supervisor(cfg, session, events)
        await sup.start()
        cleanup.append(sup.stop)
        return Harness(sup, nodes, events, cfg)

    yield factory
    for stop in reversed(cleanup):
        await stop()
    await session.close()


async def wait_for(predicate: Callable[[], bool], within: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


def sim(*models: SimModel, vram: int = 24576) -> SimConfig:
    return SimConfig(models=list(models), vram_mb=vram)


def m(model_id: str, size: int = 4000, *, loaded: bool = True, load_s: float = 0.05) -> SimModel:
    return SimModel(model_id, size_mb=size, load_s=load_s, loaded=loaded)


# --- polling and the snapshot --------------------------------------------------------


async def test_first_poll_builds_the_snapshot(make: Make) -> None:
    made_after = int(time.time())
    h = await make(
        {
            "a": sim(m("x"), m("y", loaded=False)),
            "b": sim(m("x", loaded=False), m("z")),
        },
        models=[{"id": "x", "vram_mb": 4000, "aliases": ["ex"]}, {"id": "z", "vram_mb": 4000}],
        model_map={"claude-*": "x"},
    )
    snap = h.sup.snapshot
    assert snap.version >= 1
    assert {n: dict(v.models) for n, v in snap.nodes.items()} == {
        "a": {"x": L, "y": U},
        "b": {"x": U, "z": L},
    }
    assert [x.name for x in snap.routes["x"]] == ["a"]
    assert snap.routes["y"] == ()
    assert "default" not in snap.routes
    assert snap.resolve("ex") == "x"
    assert snap.resolve("claude-opus-5-5") == "x"
    assert snap.nodes["a"].running == 0  # from the node's /metrics
    assert snap.nodes["a"].used_mb == 4000
    body = orjson.loads(snap.models_body)
    ids = [e["id"] for e in body["data"]]
    assert ids == ["x", "y", "z", "ex"]
    entry = dict(body["data"][0])
    created = entry.pop("created")
    # the supervisor's start time, in whole seconds, the same for every entry
    assert isinstance(created, int) and made_after <= created <= time.time()
    assert {e["created"] for e in body["data"]} == {created}
    assert entry == {
        "id": "x",
        "object": "model",
        "owned_by": "cortex",
        "cortex": {"nodes": {"a": "loaded", "b": "unloaded"}},
    }
    assert body["data"][3]["cortex"] == {"alias_of": "x"}
    assert body["cortex"] == {"model_map": {"claude-*": "x"}}


async def test_down_after_failed_polls_and_up_after_one(make: Make) -> None:
    h = await make({"a": sim(m("x"))}, poll={"interval_s": 0.05, "down_after": 3})
    h.nodes["a"].faults.refuse = True
    await wait_for(lambda: h.node_state("a") is DOWN)
    failing = [s.nodes["a"] for s in h.events.snapshots if s.nodes["a"].error]
    assert failing[0].state is UP  # the first failed poll only noted the error
    assert h.sup.snapshot.routes["x"] == ()
    assert h.sup.pick("x") is None
    assert orjson.loads(h.sup.snapshot.models_body)["data"] == []  # a down node lists nothing
    h.nodes["a"].faults.refuse = False
    await wait_for(lambda: h.node_state("a") is UP)
    assert h.sup.pick("x") is h.handle("a")


async def test_a_model_of_a_down_node_is_unavailable_not_unknown(make: Make) -> None:
    h = await make(
        {"a": sim(m("x"))},
        poll={"interval_s": 0.05, "down_after": 1},
        gateway={"queue_timeout_s": 0.3},
    )
    h.nodes["a"].faults.refuse = True
    await wait_for(lambda: h.node_state("a") is DOWN)
    with pytest.raises(Unavailable, match="a is down") as info:
        await h.sup.acquire("x")
    assert info.value.retry_after is not None
    with pytest.raises(ModelNotFound):
        await h.sup.acquire("nope")


async def test_catalogue_follows_a_restarted_node(make: Make) -> None:
    h = await make({"a": sim(m("x"), m("y"))})
    h.nodes["a"].replace_models([m("y"), m("z", loaded=False)])
    await wait_for(lambda: set(h.sup.snapshot.nodes["a"].models) == {"y", "z"})
    assert "x" not in h.sup.snapshot.routes
    assert h.state("a", "z") is U


async def test_report_failure_stops_routing_at_once_and_polls_soon(make: Make) -> None:
    h = await make({"a": sim(m("x")), "b": sim(m("x"))}, poll={"interval_s": 30.0})
    a = h.handle("a")
    h.sup.report_failure(a, "ClientConnectorError: refused")
    assert h.node_state("a") is DOWN
    assert h.sup.pick("x") is h.handle("b")
    # the node is fine: the poll made right away brings it back long before the 30 s interval
    await wait_for(lambda: h.node_state("a") is UP, within=2.0)
    assert h.sup.pick("x", frozenset({"b"})) is a


async def test_stalls_hold_a_node_out_through_good_polls_longer_each_time(
    make: Make, caplog: pytest.LogCaptureFixture
) -> None:
    h = await make({"a": sim(m("x")), "b": sim(m("x"))}, poll={"interval_s": 0.05})
    a, polls = h.handle("a"), h.nodes["a"].counters
    stalled = "no first byte in 600 s"
    held = 0.0
    with caplog.at_level(logging.INFO, logger="cortex"):
        for stalls, hold in ((1, 0.05), (2, 0.1), (3, 0.2), (4, 0.4), (1, 0.05)):
            if stalls == 1 and a.stalls:
                h.sup.report_ok(a, held - 0.01)  # sent before the last hold: no news
                assert a.stalls == 4
                h.sup.report_ok(a, time.monotonic())  # a first byte: the row is over
                assert a.stalls == 0
            sent = time.monotonic()  # a request sent now (the node is up), never answered
            h.sup.report_failure(a, stalled, poll_now=False, sent=sent)
            held, polled = time.monotonic(), polls["/v1/models"]
            in_a_row = "1 stall" if stalls == 1 else f"{stalls} stalls in a row"
            assert h.sup.snapshot.nodes["a"].error == (
                f"{stalled}; held out for {hold:g} s after {in_a_row}"
            )
            assert h.node_state("a") is DOWN and h.sup.pick("x") is h.handle("b")
            # another request sent before the hold stalls too: the same episode
            h.sup.report_failure(a, stalled, poll_now=False, sent=sent)
            assert a.stalls == stalls
            await wait_for(lambda: h.node_state("a") is UP)
            # ... and after it: still no new stall (the timeout is longer than a hold)
            h.sup.report_failure(a, stalled, poll_now=False, sent=sent)
            assert a.stalls == stalls and h.node_state("a") is UP
            assert hold <= time.monotonic() - held < hold + 1.0
            if hold >= 0.2:  # it was polled, well, while held: not only by the poll ending it
                assert polls["/v1/models"] - polled >= 2
            assert h.sup.snapshot.nodes["a"].error == ""
    holds = [r.getMessage() for r in caplog.records if "held out" in r.getMessage()]
    assert holds == [
        f"node a held out for {s} s after {k}: {stalled}"
        for s, k in (
            ("0.05", "1 stall"),
            ("0.1", "2 stalls in a row"),
            ("0.2", "3 stalls in a row"),
            ("0.4", "4 stalls in a row"),
            ("0.05", "1 stall"),
        )
    ]
    assert "node a answered after 4 stalls in a row" in caplog.messages
    # a connection failure is no stall: polled at once, back at once, the count untouched
    h.sup.report_failure(a, "ClientConnectorError: refused")
    assert h.node_state("a") is DOWN
    await wait_for(lambda: h.node_state("a") is UP, within=1.0)
    assert a.stalls == 1


# --- loading ------------------------------------------------------------------------


async def test_concurrent_acquires_share_one_load(make: Make) -> None:
    h = await make({"a": sim(m("x"), m("y", loaded=False, load_s=0.2))})
    assert h.sup.pick("y") is None
    results = await asyncio.gather(*(h.sup.acquire("y") for _ in range(50)))
    node = h.handle("a")
    assert all(handle is node for handle, _ in results)
    assert all(0.1 < waited < 2.0 for _, waited in results)
    assert h.nodes["a"].counters["/v1/models/reload"] == 1
    assert h.state("a", "y") is L
    assert h.events.loads == [("a", "y", "ok")]
    assert h.events.max_waiting == 50
    assert h.events.waiting["y"] == 0
    assert await h.sup.acquire("y") == (node, 0.0)  # loaded now: the fast path


async def test_queue_timeout_is_unavailable_with_retry_after(make: Make) -> None:
    h = await make({"a": sim(m("y", loaded=False, load_s=2.0))}, gateway={"queue_timeout_s": 0.2})
    with pytest.raises(Unavailable, match=r"0\.2 s") as info:
        await h.sup.acquire("y")
    assert info.value.retry_after is not None and info.value.retry_after >= 1
    # the reload call itself is bounded the same way: reported, and no LOADING left behind
    await wait_for(lambda: h.events.loads == [("a", "y", "timeout")])
    await wait_for(lambda: h.state("a", "y") is R)  # the node is still at it
    assert h.sup.fleet()["loading"] == []


async def test_lru_eviction_spares_pinned_and_busy_models(make: Make) -> None:
    h = await make(
        {"a": sim(m("pin", 8000), m("b"), m("c"), m("d"), m("e", loaded=False), vram=20000)},
        nodes=[{"name": "a", "vram_mb": 20000, "pinned": ["pin"]}],
    )
    node = h.handle("a")
    begin(node, "b")  # busy: a request in flight
    begin(node, "c")
    end(node, "c")  # used recently; d was never used: the oldest
    handle, _ = await h.sup.acquire("e")
    assert handle is node
    counters = h.nodes["a"].counters
    assert counters["/v1/models/unload"] == 1
    models = h.sup.snapshot.nodes["a"].models
    assert models == {"pin": L, "b": L, "c": L, "d": U, "e": L}
    assert h.events.evictions == [("a", "d", "lru")]
    assert h.sup.snapshot.nodes["a"].cycles == 1
    end(node, "b")


async def test_a_busy_evictee_drains_before_it_is_unloaded(make: Make) -> None:
    h = await make(
        {"a": sim(m("b", 8000), m("new", 8000, loaded=False), vram=12000)},
        eviction={"grace_s": 3.0},
    )
    node = h.handle("a")
    begin(node, "b")
    acquiring = asyncio.create_task(h.sup.acquire("new"))
    await wait_for(lambda: h.state("a", "b") is ModelState.UNLOADING)
    assert h.sup.pick("b") is None  # no new requests for the evictee
    await asyncio.sleep(0.2)
    assert h.nodes["a"].counters["/v1/models/unload"] == 0  # never while requests are in flight
    assert not acquiring.done()
    end(node, "b")
    handle, waited = await acquiring
    assert handle is node and waited >= 0.2
    assert h.nodes["a"].counters["/v1/models/unload"] == 1
    assert h.nodes["a"].counters["abort"] == 0
    assert h.sup.snapshot.nodes["a"].models == {"b": U, "new": L}


async def test_an_evictee_that_does_not_drain_is_spared(make: Make) -> None:
    h = await make(
        {"a": sim(m("b", 8000), m("new", 8000, loaded=False), vram=12000)},
        eviction={"grace_s": 0.2},
    )
    node = h.handle("a")
    begin(node, "b")
    with pytest.raises(Unavailable, match="could not evict b now"):
        await h.sup.acquire("new")
    assert h.nodes["a"].counters["/v1/models/unload"] == 0
    assert h.state("a", "b") is L  # routable again
    assert h.state("a", "new") is U  # no stuck claim
    assert h.sup.pick("b") is node
    end(node, "b")
    handle, _ = await h.sup.acquire("new")  # idle now: it goes
    assert handle is node


async def test_a_cancelled_load_releases_its_evictees(make: Make) -> None:
    h = await make(
        {"a": sim(m("b", 8000), m("new", 8000, loaded=False), vram=12000)},
        eviction={"grace_s": 5.0},
    )
    node = h.handle("a")
    begin(node, "b")
    acquiring = asyncio.create_task(h.sup.acquire("new"))
    await wait_for(lambda: h.state("a", "b") is ModelState.UNLOADING)
    await h.sup.stop()  # cancels the load while it waits for b to drain
    assert (h.state("a", "b"), h.state("a", "new")) == (L, U)
    assert h.sup.pick("b") is node
    with pytest.raises(Unavailable, match="shutting down"):
        await acquiring
    end(node, "b")


async def test_out_of_memory_evicts_the_next_and_retries(make: Make) -> None:
    # cortex believes the models are small; the node knows better
    h = await make(
        {"a": sim(m("x", 8000), m("y", 8000), m("new", 8000, loaded=False), vram=20000)},
        sizes={"x": 1000, "y": 1000, "new": 1000},
    )
    node = h.handle("a")
    begin(node, "y")
    end(node, "y")  # x never used: evicted first
    handle, _ = await h.sup.acquire("new")
    assert handle is node
    assert h.events.loads == [("a", "new", "oom"), ("a", "new", "ok")]
    assert h.events.evictions == [("a", "x", "lru")]
    assert h.sup.snapshot.nodes["a"].models == {"x": U, "y": L, "new": L}


async def test_out_of_memory_gives_up_after_max_attempts(make: Make) -> None:
    h = await make(
        {"a": sim(m("x", 8000), m("y", 8000), m("new", 8000, loaded=False), vram=20000)},
        sizes={"x": 1000, "y": 1000, "new": 1000},
        eviction={"max_load_attempts": 1},
    )
    with pytest.raises(Unavailable, match="out of memory on a 1 times"):
        await h.sup.acquire("new")
    assert h.state("a", "new") is U
    assert h.nodes["a"].counters["/v1/models/unload"] == 0
    assert not h.sup.fleet()["loading"]


@pytest.mark.parametrize("status", ["internal_error", "not_found"])
async def test_a_failed_lifecycle_call_leaves_no_stuck_state(make: Make, status: str) -> None:
    h = await make({"a": sim(m("x", loaded=False))})
    h.nodes["a"].faults.lifecycle_status = status
    with pytest.raises(Unavailable, match=f"a could not load x: {status}"):
        await h.sup.acquire("x")
    assert h.state("a", "x") is U
    assert h.events.loads == [("a", "x", "error")]
    h.nodes["a"].faults.lifecycle_status = None
    handle, _ = await h.sup.acquire("x")
    assert handle is h.handle("a")


async def test_a_model_the_node_is_reloading_is_waited_for_not_reloaded(make: Make) -> None:
    h = await make({"a": sim(m("x", loaded=False, load_s=0.3))}, poll={"interval_s": 0.05})
    async with aiohttp.ClientSession() as client:  # a lazy load, not through cortex
        lazy = asyncio.create_task(
            client.post(
                f"{h.nodes['a'].url}/v1/chat/completions",
                json={"model": "x", "messages": [{"role": "user", "content": "hi"}]},
            )
        )
        await wait_for(lambda: h.state("a", "x") is R)
        handle, _ = await h.sup.acquire("x")
        assert handle is h.handle("a")
        assert h.nodes["a"].counters["/v1/models/reload"] == 0
        (await lazy).release()


async def test_priority_strategy_end_to_end(make: Make) -> None:
    h = await make(
        {"a": sim(m("hi"), m("lo1"), m("lo2"), m("new", loaded=False), vram=12000)},
        models=[
            {"id": "hi", "vram_mb": 4000, "priority": 10},
            {"id": "lo1", "vram_mb": 4000, "priority": 1},
            {"id": "lo2", "vram_mb": 4000, "priority": 1},
            {"id": "new", "vram_mb": 4000},
        ],
        eviction={"strategy": "priority"},
    )
    node = h.handle("a")
    for model in ("lo2", "lo1"):  # hi was never used: LRU alone would evict it
        begin(node, model)
        end(node, model)
    await h.sup.acquire("new")
    assert h.events.evictions == [("a", "lo2", "priority")]
    assert h.state("a", "hi") is L


async def test_failover_acquire_loads_elsewhere(make: Make) -> None:
    h = await make({"a": sim(m("x")), "b": sim(m("x", loaded=False))})
    assert h.sup.pick("x") is h.handle("a")
    handle, _ = await h.sup.acquire("x", exclude=frozenset({"a"}))
    assert handle is h.handle("b")
    assert h.nodes["b"].counters["/v1/models/reload"] == 1
    with pytest.raises(Unavailable, match="served only by a, b"):
        await h.sup.acquire("x", exclude=frozenset({"a", "b"}))


async def test_cannot_be_placed_fails_fast_with_the_reason(make: Make) -> None:
    h = await make(
        {"small": sim(m("pin", 8000), m("big", 6000, loaded=False), vram=12288)},
        nodes=[{"name": "small", "vram_mb": 12288, "pinned": ["pin"]}],
    )
    with pytest.raises(
        Unavailable, match="big needs 6000 MB; small has 12288 MB with 8000 MB pinned"
    ):
        await asyncio.wait_for(h.sup.acquire("big"), 1.0)


# --- defrag restarts ----------------------------------------------------------------


async def _cycle(h: Harness, *models: str) -> None:
    for model in models:
        await h.sup.acquire(model)


async def test_defrag_restart_through_the_agent(make: Make, aiohttp_server: Any) -> None:
    calls: list[str] = []
    node: dict[str, SimNode] = {}

    async def restart(request: web.Request) -> web.Response:
        calls.append(request.headers.get("Authorization", ""))
        node["a"].faults.refuse = True  # the process goes away...
        await asyncio.sleep(0.1)
        node["a"].faults.refuse = False  # ...and comes back with its configured models
        node["a"].replace_models(None)
        return web.json_response({"unit": "mistralrs.service", "restarted": True, "seconds": 0.1})

    app = web.Application()
    app.router.add_post("/restart", restart)
    agent = await aiohttp_server(app)
    h = await make(
        {"a": sim(m("x", 8000), m("y", 8000, loaded=False), vram=12000)},
        nodes=[
            {
                "name": "a",
                "vram_mb": 12000,
                "agent": str(agent.make_url("")).rstrip("/"),
                "agent_token": "s3cret",
            }
        ],
        eviction={"defrag_after_cycles": 2},
    )
    node["a"] = h.nodes["a"]
    await _cycle(h, "y", "x")  # two unloads: two cycles
    await wait_for(lambda: h.events.restarts == ["a"])
    assert calls == ["Bearer s3cret"]
    states = [s.nodes["a"].state for s in h.events.snapshots]
    assert NodeState.DRAINING in states and NodeState.RESTARTING in states
    assert states.index(NodeState.DRAINING) < states.index(NodeState.RESTARTING)
    view = h.sup.snapshot.nodes["a"]
    assert view.state is UP and view.cycles == 0
    assert dict(view.models) == {"x": L, "y": U}  # the fresh process's catalogue
    assert h.sup.pick("x") is h.handle("a")


async def test_defrag_waits_for_requests_to_drain(make: Make, aiohttp_server: Any) -> None:
    inflight_at_restart: list[int] = []
    app = web.Application()

    async def restart(request: web.Request) -> web.Response:
        inflight_at_restart.append(h.handle("a").inflight)
        return web.json_response({"restarted": True, "seconds": 0.0})

    app.router.add_post("/restart", restart)
    agent = await aiohttp_server(app)
    h = await make(
        {"a": sim(m("x", 8000), m("y", 8000, loaded=False), m("z", 1000), vram=16000)},
        nodes=[{"name": "a", "vram_mb": 16000, "agent": str(agent.make_url("")).rstrip("/")}],
        eviction={"defrag_after_cycles": 1, "grace_s": 3.0},
        sizes={"x": 8000, "y": 8000, "z": 1000},
    )
    node = h.handle("a")
    begin(node, "z")
    await h.sup.acquire("y")  # evicts x: one cycle
    await wait_for(lambda: h.node_state("a") is NodeState.DRAINING)
    assert h.sup.pick("z") is None
    await asyncio.sleep(0.2)
    assert inflight_at_restart == []
    end(node, "z")
    await wait_for(lambda: h.events.restarts == ["a"])
    assert inflight_at_restart == [0]


async def test_no_agent_warns_once_and_resets_the_count(
    make: Make, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="cortex.fleet")
    h = await make(
        {"a": sim(m("x", 8000), m("y", 8000, loaded=False), vram=12000)},
        eviction={"defrag_after_cycles": 1},
    )
    await _cycle(h, "y")
    await wait_for(lambda: h.sup.snapshot.nodes["a"].cycles == 0)
    await _cycle(h, "x")
    await wait_for(lambda: h.sup.snapshot.nodes["a"].cycles == 0)
    warnings = [r for r in caplog.records if "no agent" in r.getMessage()]
    assert len(warnings) == 1
    assert NodeState.DRAINING not in [s.nodes["a"].state for s in h.events.snapshots]


# --- reconfigure and stop -------------------------------------------------------------


async def test_reconfigure_keeps_handles_of_unchanged_nodes(make: Make) -> None:
    h = await make({"a": sim(m("x")), "b": sim(m("y")), "c": sim(m("z"))})
    a = h.handle("a")
    begin(a, "x")
    nodes = [
        config.Node(name="a", endpoint=h.nodes["a"].url, vram_mb=24576, pinned=["x"]),
        config.Node(name="c2", endpoint=h.nodes["c"].url),
    ]
    h.sup.reconfigure(msgspec.structs.replace(h.cfg, nodes=nodes))
    assert h.handle("a") is a and a.inflight == 1
    assert list(h.sup.snapshot.nodes) == ["a", "c2"]
    assert h.sup.snapshot.nodes["a"].pinned == {"x"}
    assert "y" not in h.sup.snapshot.routes
    await wait_for(lambda: h.node_state("c2") is UP)
    assert h.sup.pick("z") is h.handle("c2")
    end(a, "x")


async def test_stop_leaves_no_tasks() -> None:
    nodes = {"a": SimNode(sim(m("x"), m("y", loaded=False, load_s=5.0)))}
    await nodes["a"].start("127.0.0.1", 0)
    async with aiohttp.ClientSession() as session:
        before = asyncio.all_tasks()
        sup = Supervisor(make_config(nodes), session)
        await sup.start()
        waiting = asyncio.create_task(sup.acquire("y"))  # a load under way
        await wait_for(lambda: sup.snapshot.nodes["a"].models["y"] is ModelState.LOADING)
        await sup.stop()
        with pytest.raises(Unavailable, match="shutting down"):
            await waiting
        ours = [t for t in asyncio.all_tasks() - before if t.get_name().startswith("cortex-")]
        assert ours == []
        await nodes["a"].stop()  # the node's own load task ends with it
        # the last tasks finish unwinding over a few loop turns
        await wait_for(lambda: asyncio.all_tasks() == before, within=2.0)
        assert asyncio.all_tasks() == before


# --- admin operations ---------------------------------------------------------------


async def test_admin_load_unload_pin(make: Make) -> None:
    h = await make({"a": sim(m("x")), "b": sim(m("x", loaded=False), m("y"))})
    assert await h.sup.load("x") == "a"  # already loaded: nothing to do
    assert await h.sup.load("x", "b") == "b"
    assert h.nodes["b"].counters["/v1/models/reload"] == 1
    assert await h.sup.unload("x", "a") == ["a"]
    assert h.events.evictions == [("a", "x", "admin")]
    assert await h.sup.unload("x", "a") == []  # nothing left to unload there
    assert h.sup.pin("x") == ["a", "b"]
    assert h.sup.snapshot.nodes["b"].pinned == {"x"}
    assert h.sup.unpin("x", "a") == ["a"]
    assert h.sup.snapshot.nodes["a"].pinned == frozenset()
    with pytest.raises(NotFound):
        h.sup.pin("x", "nowhere")
    with pytest.raises(ModelNotFound):
        await h.sup.unload("y", "a")
    with pytest.raises(ModelNotFound):
        h.sup.pin("ghost")


async def test_admin_unload_refuses_while_requests_are_in_flight(make: Make) -> None:
    h = await make({"a": sim(m("x"))}, eviction={"grace_s": 0.1})
    begin(h.handle("a"), "x")
    with pytest.raises(Unavailable, match="still has requests in flight on a"):
        await h.sup.unload("x")
    assert h.state("a", "x") is L
    assert h.nodes["a"].counters["/v1/models/unload"] == 0
    end(h.handle("a"), "x")


async def test_admin_unload_clears_a_stuck_reload(make: Make) -> None:
    h = await make({"a": sim(m("x"))}, poll={"interval_s": 0.05})
    url = f"{h.nodes['a'].url}/v1/models/reload"  # someone hits the reload-on-loaded bug
    async with aiohttp.ClientSession() as client, client.post(url, json={"model_id": "x"}) as r:
        assert (await r.json())["status"] == "not_found"
    await wait_for(lambda: h.state("a", "x") is R)
    assert await h.sup.unload("x") == ["a"]
    handle, _ = await h.sup.acquire("x")
    assert handle is h.handle("a")


async def test_fleet_report(make: Make) -> None:
    h = await make(
        {"a": sim(m("x"), m("y", loaded=False))},
        nodes=[{"name": "a", "vram_mb": 24576, "pinned": ["x"]}],
    )
    begin(h.handle("a"), "x")
    report = h.sup.fleet()
    assert report["loading"] == []
    [node] = report["nodes"]
    assert {k: v for k, v in node.items() if k not in ("url", "models")} == {
        "name": "a",
        "state": "up",
        "vram_total_mb": 24576,
        "vram_used_mb": 4000,
        "gpu_used_mb": None,
        "gpu_total_mb": None,
        "inflight": 1,
        "running": 0,
        "waiting": 0,
        "cycles": 0,
        "error": "",
    }
    assert node["models"] == [
        {
            "id": "x",
            "status": "loaded",
            "pinned": True,
            "last_used_s": None,
            "inflight": 1,
            "vram_mb": 4000,
        },
        {
            "id": "y",
            "status": "unloaded",
            "pinned": False,
            "last_used_s": None,
            "inflight": 0,
            "vram_mb": 4000,
        },
    ]
    end(h.handle("a"), "x")
    assert h.sup.fleet()["nodes"][0]["models"][0]["last_used_s"] == 0.0
