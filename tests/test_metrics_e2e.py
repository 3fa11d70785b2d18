"""The numbers must be right: known traffic through a real gateway, then a real scrape.

Emulated nodes answer with token counts known in advance (prompt tokens are
``max(1, chars // 4)`` of the message text, completion tokens
``min(max_tokens, answer_tokens)``), so every counter and histogram count
below is exact. Metrics are read the way Prometheus reads them: an HTTP scrape
of the metrics port, parsed with :func:`cortex.metrics.parse`.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import aiohttp
import orjson
import pytest
from multidict import CIMultiDictProxy

from cortex.metrics import Sample, parse
from cortex.sim import SimConfig, SimModel
from tests.conftest import Fleet, FleetFactory

JSON = {"content-type": "application/json"}
MIB = 1024 * 1024
AccessLog = Callable[[], list[dict[str, Any]]]


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
def access_log(caplog: pytest.LogCaptureFixture) -> Iterator[AccessLog]:
    """The fields of every ``cortex.access`` line so far, in order.

    caplog's handler is attached to the access logger itself: another test may
    have called ``logs.setup()``, which stops ``cortex`` records reaching the root.
    """
    logger = logging.getLogger("cortex.access")
    saved = (logger.level, logger.propagate)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    logger.addHandler(caplog.handler)

    def lines() -> list[dict[str, Any]]:
        records = [r for r in caplog.records if r.name == "cortex.access"]
        assert all(r.levelno == logging.INFO and r.getMessage() == "request" for r in records)
        return [dict(r.fields) for r in records]  # type: ignore[attr-defined]

    try:
        yield lines
    finally:
        logger.removeHandler(caplog.handler)
        logger.level, logger.propagate = saved


async def scrape(http: aiohttp.ClientSession, fleet: Fleet) -> list[Sample]:
    async with http.get(fleet.metrics_url + "/metrics") as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        return parse(await r.read())


def value(samples: list[Sample], name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels``."""
    return sum(
        s.value
        for s in samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


def series(samples: list[Sample], name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {tuple(sorted(s.labels.items())): s.value for s in samples if s.name == name}


def key(**labels: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(labels.items()))


async def post(
    http: aiohttp.ClientSession, fleet: Fleet, path: str, request_id: str, **body: Any
) -> tuple[int, CIMultiDictProxy[str], bytes]:
    headers = {**JSON, "x-request-id": request_id}
    async with http.post(fleet.url + path, data=orjson.dumps(body), headers=headers) as r:
        return r.status, r.headers, await r.read()


def chat(content: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": content}]


# --- requests -------------------------------------------------------------------------


async def test_request_metrics_and_access_log_are_exact(
    make_fleet: FleetFactory, http: aiohttp.ClientSession, access_log: AccessLog
) -> None:
    fleet = await make_fleet({"n": SimConfig(models=[SimModel("m", answer_tokens=7)])})
    node = fleet.nodes["n"]
    c, done = "/v1/chat/completions", "/v1/completions"
    answers = {
        # id: (path, body) -> prompt tokens, completion tokens
        "r1": await post(http, fleet, c, "r1", model="m", messages=chat("a" * 40)),  # 10, 7
        "r2": await post(http, fleet, c, "r2", model="m", messages=chat("b" * 80), stream=True),
        "r3": await post(http, fleet, done, "r3", model="m", prompt="c" * 12, max_tokens=5),
        "r4": await post(
            http, fleet, done, "r4", model="m", prompt="d" * 16, max_tokens=4, stream=True
        ),  # no usage in completions streams: 4 tokens counted from chunks
    }
    node.faults.status = 500
    answers["r5"] = await post(http, fleet, c, "r5", model="m", messages=chat("e" * 8))
    node.faults.status = None
    answers["r6"] = await post(http, fleet, c, "r6", model="nope", messages=chat("f"))
    assert {k: a[0] for k, a in answers.items()} == {
        "r1": 200, "r2": 200, "r3": 200, "r4": 200, "r5": 500, "r6": 404,
    }  # fmt: skip
    for rid in ("r1", "r3"):
        assert 0 <= float(answers[rid][1]["x-cortex-overhead-ms"]) < 1000
    for rid in ("r2", "r4"):
        assert "x-cortex-overhead-ms" not in answers[rid][1]
    assert node.counters[c] == 3 and node.counters[done] == 2

    s = await scrape(http, fleet)
    mn = {"model": "m", "node": "n"}
    assert series(s, "cortex_requests_total") == {
        key(**mn, endpoint="chat", code="2xx"): 2,
        key(**mn, endpoint="completions", code="2xx"): 2,
        key(**mn, endpoint="chat", code="5xx"): 1,
        key(model="", node="", endpoint="chat", code="4xx"): 1,
    }
    assert series(s, "cortex_request_errors_total") == {
        key(**mn, endpoint="chat", error="NodeError"): 1,
        key(model="", node="", endpoint="chat", error="ModelNotFound"): 1,
    }
    assert series(s, "cortex_prompt_tokens_total") == {key(**mn): 10 + 20 + 3}
    completion = series(s, "cortex_completion_tokens_total")
    assert completion[key(**mn, estimated="false")] == 7 + 7 + 5
    assert completion.keys() == {key(**mn, estimated="false"), key(**mn, estimated="true")}
    assert series(s, "cortex_request_duration_seconds_count") == {
        key(**mn, endpoint="chat"): 3,
        key(**mn, endpoint="completions"): 2,
        key(model="", node="", endpoint="chat"): 1,
    }
    assert series(s, "cortex_time_to_first_token_seconds_count") == {key(**mn): 4}
    assert series(s, "cortex_node_time_to_first_token_seconds_count") == {key(**mn): 4}
    # tok/s needs a first token and a time after it: only streams have one
    assert series(s, "cortex_tokens_per_second_count") == {key(**mn): 2}
    assert series(s, "cortex_overhead_seconds_count") == {(): 5}  # all that went upstream
    assert series(s, "cortex_queue_wait_seconds_count") == {}
    assert series(s, "cortex_model_load_wait_seconds_count") == {}
    assert value(s, "cortex_inflight_requests", node="n") == 0
    assert value(s, "cortex_node_up", node="n") == 1
    assert series(s, "cortex_model_loaded") == {key(node="n", model="m"): 1}

    lines = {line["request_id"]: line for line in access_log()}
    # r4 is estimated (counted from chunks), and the estimate is exact (see the test below):
    # the emulator generates min(max_tokens, answer_tokens) = min(4, 7) = 4 tokens
    r4_tokens = min(4, 7)
    assert completion[key(**mn, estimated="true")] == r4_tokens
    assert sorted(lines) == ["r1", "r2", "r3", "r4", "r5", "r6"]
    expected = {
        "r1": ("chat", "m", "n", 200, False, 10, 7, False, ""),
        "r2": ("chat", "m", "n", 200, True, 20, 7, False, ""),
        "r3": ("completions", "m", "n", 200, False, 3, 5, False, ""),
        "r4": ("completions", "m", "n", 200, True, None, r4_tokens, True, ""),
        "r5": ("chat", "m", "n", 500, False, None, None, False, "NodeError"),
        "r6": ("chat", "", "", 404, False, None, None, False, "ModelNotFound"),
    }
    fields = (
        "endpoint", "model", "node", "status", "stream",
        "prompt_tokens", "completion_tokens", "estimated", "error",
    )  # fmt: skip
    for rid, want in expected.items():
        line = lines[rid]
        assert tuple(line[f] for f in fields) == want, (rid, line)
        assert (line["dialect"], line["client"]) == ("openai", "127.0.0.1")
        assert line["latency_ms"] >= 0 and line["queue_ms"] == 0 and line["load_ms"] == 0
        assert (line["ttft_ms"] is None) == (rid in ("r5", "r6"))


async def test_load_eviction_and_queue_metrics(
    make_fleet: FleetFactory, http: aiohttp.ClientSession, access_log: AccessLog
) -> None:
    load_s = 2.0  # long enough to see the three requests queued on a loaded machine
    models = [SimModel("a", size_mb=8000), SimModel("b", size_mb=8000, loaded=False, load_s=load_s)]
    fleet = await make_fleet(
        {"n": SimConfig(models=models, vram_mb=8000, instant=True)},
        models=[{"id": "a", "vram_mb": 8000}, {"id": "b", "vram_mb": 8000}],
    )
    s = await scrape(http, fleet)
    assert series(s, "cortex_model_loaded") == {
        key(node="n", model="a"): 1,
        key(node="n", model="b"): 0,
    }
    assert value(s, "cortex_node_vram_used_bytes", node="n") == 8000 * MIB
    assert value(s, "cortex_node_vram_total_bytes", node="n") == 8000 * MIB

    requests = [
        asyncio.ensure_future(
            post(http, fleet, "/v1/chat/completions", f"q{i}", model="b", messages=chat("hi"))
        )
        for i in range(3)
    ]
    try:
        deadline = time.monotonic() + load_s
        while value(s := await scrape(http, fleet), "cortex_queued_requests", model="b") < 3:
            assert time.monotonic() < deadline, "the three requests were never seen queued"
            await asyncio.sleep(0.02)
        assert value(s, "cortex_queued_requests", model="b") == 3
        assert value(s, "cortex_model_loaded", model="b") == 0
        answers = await asyncio.gather(*requests)
    finally:
        for r in requests:
            r.cancel()
    assert [a[0] for a in answers] == [200, 200, 200]

    s = await scrape(http, fleet)
    assert series(s, "cortex_model_loads_total") == {key(node="n", model="b", result="ok"): 1}
    assert series(s, "cortex_model_load_duration_seconds_count") == {key(node="n", model="b"): 1}
    took = value(s, "cortex_model_load_duration_seconds_sum")
    assert load_s * 0.9 <= took < load_s + 2.0
    assert series(s, "cortex_model_evictions_total") == {key(node="n", model="a", reason="lru"): 1}
    assert series(s, "cortex_model_loaded") == {
        key(node="n", model="a"): 0,
        key(node="n", model="b"): 1,
    }
    assert value(s, "cortex_queued_requests", model="b") == 0
    assert series(s, "cortex_model_load_wait_seconds_count") == {key(model="b"): 3}
    assert value(s, "cortex_model_load_wait_seconds_sum") >= 3 * load_s * 0.5
    assert value(s, "cortex_requests_total", model="b", code="2xx") == 3
    assert value(s, "cortex_node_vram_used_bytes", node="n") == 8000 * MIB
    loads = [line["load_ms"] for line in access_log()]
    assert len(loads) == 3 and all(ms > 0 for ms in loads)


async def test_inflight_while_streams_are_held_and_zero_after(
    make_fleet: FleetFactory, http: aiohttp.ClientSession
) -> None:
    slow = SimModel("slow", tok_per_s=20.0, answer_tokens=200)  # 10 s: held open
    fleet = await make_fleet({"n": SimConfig(models=[slow, SimModel("quick", tok_per_s=500.0)])})
    body = orjson.dumps({"model": "slow", "stream": True, "messages": chat("hi")})
    held = [
        await http.post(fleet.url + "/v1/chat/completions", data=body, headers=JSON)
        for _ in range(2)
    ]
    try:
        assert [r.status for r in held] == [200, 200]
        s = await scrape(http, fleet)
        assert value(s, "cortex_inflight_requests", node="n") == 2
    finally:
        for r in held:
            r.close()
    status, _, _ = await post(
        http, fleet, "/v1/chat/completions", "after", model="quick", messages=chat("hi")
    )
    assert status == 200
    deadline = time.monotonic() + 2
    while value(await scrape(http, fleet), "cortex_inflight_requests", node="n") != 0:
        assert time.monotonic() < deadline, "in-flight count never came back to 0"
        await asyncio.sleep(0.02)


async def test_node_up_follows_the_node(
    make_fleet: FleetFactory, http: aiohttp.ClientSession
) -> None:
    fleet = await make_fleet(
        {
            "a": SimConfig(models=[SimModel("m")], instant=True),
            "b": SimConfig(models=[SimModel("m")], instant=True),
        }
    )
    s = await scrape(http, fleet)
    assert series(s, "cortex_node_up") == {key(node="a"): 1, key(node="b"): 1}
    fleet.nodes["b"].faults.refuse = True
    deadline = time.monotonic() + 3
    while value(s := await scrape(http, fleet), "cortex_node_up", node="b") != 0:
        assert time.monotonic() < deadline, "b never went down"
        await asyncio.sleep(0.05)
    assert value(s, "cortex_node_up", node="a") == 1
    fleet.nodes["b"].faults.refuse = False
    deadline = time.monotonic() + 3
    while value(await scrape(http, fleet), "cortex_node_up", node="b") != 1:
        assert time.monotonic() < deadline, "b never came back"
        await asyncio.sleep(0.05)


@pytest.mark.external
async def test_promtool_accepts_a_real_scrape(
    make_fleet: FleetFactory, http: aiohttp.ClientSession
) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian/Ubuntu package: prometheus)")
    models = [SimModel("a", size_mb=8000), SimModel("b", size_mb=8000, loaded=False, load_s=0.1)]
    fleet = await make_fleet(
        {"n": SimConfig(models=models, vram_mb=8000, instant=True)},
        models=[{"id": "a", "vram_mb": 8000}, {"id": "b", "vram_mb": 8000}],
    )
    c = "/v1/chat/completions"
    await post(http, fleet, c, "p1", model="a", messages=chat("hello"))
    await post(http, fleet, c, "p2", model="b", messages=chat("hello"), stream=True)  # evicts a
    await post(http, fleet, "/v1/completions", "p3", model="b", prompt="x", stream=True)
    await post(http, fleet, c, "p4", model="nope", messages=chat("hello"))
    async with http.get(fleet.metrics_url + "/metrics") as r:
        body = await r.read()
    assert b"cortex_model_evictions_total" in body and b"cortex_model_load_wait" in body
    done = await asyncio.to_thread(
        subprocess.run,
        [promtool, "check", "metrics"],
        input=body,
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stdout.decode() + done.stderr.decode()


# --- measurement edge cases: completions estimates, load vs queue wait, clients leaving ---


async def test_a_completions_stream_estimate_is_the_tokens_generated(
    make_fleet: FleetFactory, http: aiohttp.ClientSession, access_log: AccessLog
) -> None:
    fleet = await make_fleet({"n": SimConfig(models=[SimModel("m", answer_tokens=7)])})
    path = "/v1/completions"
    await post(http, fleet, path, "e1", model="m", prompt="x", max_tokens=4, stream=True)
    await post(http, fleet, path, "e2", model="m", prompt="x", stream=True)
    s = await scrape(http, fleet)
    assert value(s, "cortex_completion_tokens_total", estimated="true") == 4 + 7
    assert [line["completion_tokens"] for line in access_log()] == [4, 7]


async def test_waiting_for_a_load_is_not_queueing(
    make_fleet: FleetFactory, http: aiohttp.ClientSession, access_log: AccessLog
) -> None:
    cold = SimModel("cold", loaded=False, load_s=0.2)
    fleet = await make_fleet({"n": SimConfig(models=[cold], instant=True)})
    for stream in (False, True):
        body = {"model": "cold", "messages": chat("hi"), "stream": stream}
        assert (await post(http, fleet, "/v1/chat/completions", f"w{stream}", **body))[0] == 200
        await post(http, fleet, "/admin/models/unload", "u", model="cold")
    s = await scrape(http, fleet)
    assert series(s, "cortex_model_load_wait_seconds_count") == {key(model="cold"): 2}
    assert series(s, "cortex_queue_wait_seconds_count") == {}
    assert [line["queue_ms"] for line in access_log()] == [0, 0]


async def test_a_client_leaving_mid_stream_is_a_499(
    make_fleet: FleetFactory, http: aiohttp.ClientSession, access_log: AccessLog
) -> None:
    slow = SimModel("slow", tok_per_s=20.0, answer_tokens=200)
    fleet = await make_fleet({"n": SimConfig(models=[slow])})
    body = orjson.dumps({"model": "slow", "stream": True, "messages": chat("hi")})
    resp = await http.post(fleet.url + "/v1/chat/completions", data=body, headers=JSON)
    try:
        assert resp.status == 200
        await resp.content.readuntil(b"\n\n")
    finally:
        resp.close()
    deadline = time.monotonic() + 2
    while not access_log():
        assert time.monotonic() < deadline, "the request was never recorded"
        await asyncio.sleep(0.02)
    s = await scrape(http, fleet)
    assert series(s, "cortex_requests_total") == {
        key(model="slow", node="n", endpoint="chat", code="4xx"): 1
    }
    assert value(s, "cortex_request_errors_total", error="client_disconnected") == 1
    [line] = access_log()
    assert (line["status"], line["error"]) == (499, "client_disconnected")
