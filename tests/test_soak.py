"""50,000 short requests through one gateway: nothing accumulates.

The node runs as a process of its own (``cortex sim``), so this process holds
the gateway and its clients only and its RSS is theirs; it also leaves the
second core to the node. About 16 s on two idle cores.
"""

from __future__ import annotations

import asyncio
import gc
import time

import aiohttp
import orjson
import pytest

from tests.conftest import FleetFactory, open_fds, rss_mb
from tests.subproc import Cortex

REQUESTS = 50_000
WARM_UP = 5_000
CONCURRENCY = 256
BODY = orjson.dumps({"model": "m1", "messages": [{"role": "user", "content": "hi"}]})


async def run(s: aiohttp.ClientSession, url: str, n: int) -> dict[int, int]:
    """``n`` requests by CONCURRENCY workers over one pooled session; statuses counted."""
    statuses: dict[int, int] = {}
    todo = iter(range(n))

    async def worker() -> None:
        for _ in todo:
            async with s.post(url, data=BODY, headers={"content-type": "application/json"}) as r:
                await r.read()
                statuses[r.status] = statuses.get(r.status, 0) + 1

    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return statuses


@pytest.mark.slow
async def test_fifty_thousand_requests_leave_nothing_behind(make_fleet: FleetFactory) -> None:
    node = await Cortex.spawn(
        "sim", "--port", "0", "--instant", "--answer-tokens", "8", "--max-seqs", "1024",
        "--model", "m1",
    )  # fmt: skip
    try:
        url = (await node.expect(r"listening on (http://\S+)")).group(1)
        fleet = await make_fleet(
            {}, nodes=[{"name": "n", "endpoint": url}], poll={"interval_s": 1.0}
        )
        api = fleet.url + "/v1/chat/completions"
        connector = aiohttp.TCPConnector(limit=CONCURRENCY)
        async with aiohttp.ClientSession(connector=connector) as s:
            assert await run(s, api, WARM_UP) == {200: WARM_UP}
            gc.collect()
            rss, fds, tasks = rss_mb(), open_fds(), len(asyncio.all_tasks())
            started = time.monotonic()
            assert await run(s, api, REQUESTS) == {200: REQUESTS}
            elapsed = time.monotonic() - started
            gc.collect()
            assert open_fds() <= fds  # the same pooled connections, no more
            assert len(asyncio.all_tasks()) <= tasks
            assert rss_mb() - rss < 8, f"RSS grew from {rss:.0f} to {rss_mb():.0f} MB"
        handle = fleet.gateway.supervisor.snapshot.nodes["n"].handle
        assert handle.inflight == 0 and fleet.gateway.active == 0
        assert len(fleet.gateway.watchdog) == 0
        served = fleet.gateway.metrics.sample("cortex_requests_total", code="2xx")
        assert served == WARM_UP + REQUESTS
        assert elapsed < 120, f"{REQUESTS} requests took {elapsed:.0f} s"
    finally:
        await node.close()
