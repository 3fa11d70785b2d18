"""The watchdog cancels only exchanges that made no progress for their limit."""

from __future__ import annotations

import asyncio

import pytest

from cortex.watchdog import Watchdog


async def test_stalled_exchange_is_cancelled_and_marked() -> None:
    dog = Watchdog(period=0.02)
    dog.start()
    fired = None

    async def stalled() -> None:
        nonlocal fired
        w = dog.watch(0.05, "first byte")
        try:
            await asyncio.sleep(5)
        finally:
            fired = w.fired
            dog.release(w)

    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(asyncio.ensure_future(stalled()), 2)
    assert fired is True
    assert len(dog) == 0
    await dog.stop()


async def test_progress_keeps_an_exchange_alive() -> None:
    dog = Watchdog(period=0.02)
    dog.start()

    async def busy() -> bool:
        w = dog.watch(0.08, "idle")
        for _ in range(15):
            await asyncio.sleep(0.02)
            w.progress += 1
        dog.release(w)
        return w.fired

    assert await busy() is False
    await dog.stop()


async def test_tick_fires_once_past_the_limit_and_not_before() -> None:
    dog = Watchdog()
    holder = asyncio.ensure_future(asyncio.sleep(10))
    w = dog.watch(1.0, "idle")
    w.task = holder
    start = w.since
    dog.tick(start + 0.5)
    assert not w.fired
    w.progress += 1
    dog.tick(start + 1.4)  # progress: the clock restarts here
    assert not w.fired
    dog.tick(start + 2.0)
    assert not w.fired
    dog.tick(start + 2.5)
    assert w.fired
    await asyncio.gather(holder, return_exceptions=True)
    assert holder.cancelled()
