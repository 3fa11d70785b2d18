"""Time limits for upstream exchanges without a timer per request or per chunk.

A request registers a :class:`Watch` and bumps ``watch.progress`` (an int)
when bytes arrive. One coroutine ticks every ``period`` seconds and cancels
the task of any watch that made no progress for longer than its ``limit``,
marking it ``fired`` so the handler can tell a timeout from a client that went
away. Precision is one period, which is plenty for limits of seconds to minutes.
"""

from __future__ import annotations

import asyncio
import contextlib


class Watch:
    """One exchange being timed. ``limit`` may change as the exchange advances."""

    __slots__ = ("fired", "limit", "progress", "seen", "since", "stage", "task")

    def __init__(self, task: asyncio.Task[object], limit: float, stage: str, now: float) -> None:
        self.task = task
        self.limit = limit
        self.stage = stage
        self.progress = 0
        self.seen = 0
        self.since = now
        self.fired = False

    def advance(self, limit: float, stage: str) -> None:
        """Enter a new stage with its own limit (e.g. first byte -> idle)."""
        self.limit = limit
        self.stage = stage
        self.progress += 1


class Watchdog:
    """Cancels stalled exchanges; see the module docstring."""

    def __init__(self, period: float = 0.5) -> None:
        self.period = period
        self._active: set[Watch] = set()
        self._runner: asyncio.Task[None] | None = None

    def watch(self, limit: float, stage: str) -> Watch:
        task = asyncio.current_task()
        assert task is not None, "watch() must run inside a task"
        w = Watch(task, limit, stage, asyncio.get_running_loop().time())
        self._active.add(w)
        return w

    def release(self, w: Watch) -> None:
        self._active.discard(w)

    def start(self) -> None:
        self._runner = asyncio.get_running_loop().create_task(self._run(), name="cortex-watchdog")

    async def stop(self) -> None:
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
            self._runner = None

    def tick(self, now: float) -> None:
        """Check every watch once; cancel those past their limit."""
        for w in self._active:
            if w.progress != w.seen:
                w.seen = w.progress
                w.since = now
            elif not w.fired and now - w.since > w.limit:
                w.fired = True
                w.task.cancel()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.period)
            self.tick(loop.time())

    def __len__(self) -> int:
        return len(self._active)
