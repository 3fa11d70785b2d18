"""The engine's sequence limit: at most `capacity` sequences generate at once.

Beyond that, sequences wait in FIFO order, silently: a node never answers 429 or
503 for load, which shows only in `/metrics` (running, waiting, capacity).
"""

from __future__ import annotations

import asyncio
from collections import deque


class Admission:
    __slots__ = ("_waiters", "capacity", "running")

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.running = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def try_enter(self) -> bool:
        """Take a free slot at once, if there is one and nobody is queued before us."""
        if self.running < self.capacity and not self._waiters:
            self.running += 1
            return True
        return False

    def enqueue(self) -> asyncio.Future[None]:
        """Queue for a slot; the future resolves when the slot is handed over."""
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        return waiter

    def leave(self) -> None:
        """Free a slot, handing it straight to the first waiter if any."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.running -= 1

    def abandon(self, waiter: asyncio.Future[None]) -> None:
        """A queued sequence gave up; pass its slot on if it had already been granted."""
        if waiter.done() and not waiter.cancelled():
            self.leave()
            return
        waiter.cancel()
        if waiter in self._waiters:
            self._waiters.remove(waiter)
