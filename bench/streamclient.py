"""Per-stream timing client: N concurrent SSE streams in a closed loop, in its own process.

``python -m bench.streamclient --url URL --body-file F --streams N --seconds S`` prints
one JSON object: streams completed in the measurement window, errors, and
percentiles of time to first token (TTFT: request written -> first ``data:``
frame read) and of the gaps between frames.

Each of the N workers keeps one keep-alive connection and sends one streaming
request after another. Workers start spread over ``--ramp`` seconds. Streams/s
counts the streams that end in the window after the ramp; the timings come from
the streams that start in it. The HTTP/1.1 and SSE handling
is an :class:`asyncio.Protocol` on uvloop that counts frames without parsing
them, so one core follows tens of thousands of frames per second.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast
from urllib.parse import urlsplit

_FRAME = b"data: "
OPENAI_END = "data: [DONE]"
ANTHROPIC_END = '"type":"message_stop"'


@dataclass
class Tally:
    """What all workers measured; times in seconds (``perf_counter``)."""

    completed: int = 0
    errors: int = 0
    error_kinds: dict[str, int] = field(default_factory=dict)
    frames: int = 0
    ttft: list[float] = field(default_factory=list)
    gaps: list[float] = field(default_factory=list)

    def error(self, kind: str) -> None:
        self.errors += 1
        self.error_kinds[kind] = self.error_kinds.get(kind, 0) + 1


class _Chunked:
    """Incremental ``Transfer-Encoding: chunked`` decoder; ``feed`` returns the payload."""

    __slots__ = ("buf", "done", "last", "left", "skip")

    def __init__(self) -> None:
        self.buf = b""
        self.left = 0  # payload bytes left in the current chunk
        self.skip = 0  # CRLF bytes after a chunk still to drop
        self.last = False  # the zero-size chunk was seen
        self.done = False

    def feed(self, data: bytes) -> bytes:
        buf, out, i = self.buf + data if self.buf else data, [], 0
        n = len(buf)
        while i < n and not self.done:
            if self.left:
                take = min(self.left, n - i)
                out.append(buf[i : i + take])
                self.left -= take
                i += take
            elif self.skip:
                step = min(self.skip, n - i)
                self.skip -= step
                i += step
                self.done = self.last and not self.skip
            else:
                end = buf.find(b"\r\n", i)
                if end < 0:
                    break
                size = int(buf[i:end].split(b";", 1)[0], 16)
                i = end + 2
                self.left, self.skip, self.last = size, 2, size == 0
        self.buf = buf[i:]
        return b"".join(out)


class _Exchange(asyncio.Protocol):
    """One keep-alive connection; ``run(request)`` sends it and waits for the stream's end."""

    def __init__(self, tally: Tally, end: bytes) -> None:
        self.tally = tally
        self.end = end
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.loop = asyncio.get_running_loop()
        self.waiter: asyncio.Future[str | None] | None = None
        self._reset()

    def _reset(self) -> None:
        self.head = b""
        self.status = 0
        self.chunked: _Chunked | None = None
        self.length = -1
        self.carry = b""
        self.saw_done = False
        self.received = 0
        self.sent = 0.0
        self.last = 0.0
        self.ttft = -1.0
        self.gaps: list[float] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        close_delimited = self.chunked is None and self.length < 0
        self._finish(None if close_delimited and self.saw_done else "connection closed mid-stream")

    def _finish(self, error: str | None) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(error)

    async def run(self, request: bytes) -> tuple[str | None, float, list[float]]:
        assert self.transport is not None
        self._reset()
        self.waiter = self.loop.create_future()
        self.sent = self.last = time.perf_counter()
        self.transport.write(request)
        error = await self.waiter
        return error, self.ttft, self.gaps

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        if not self.status:
            self.head += data
            sep = self.head.find(b"\r\n\r\n")
            if sep < 0:
                return
            head, data = self.head[:sep], self.head[sep + 4 :]
            if not self._parse_head(head):
                return
        payload = self.chunked.feed(data) if self.chunked is not None else data
        self._payload(payload, now)

    def _parse_head(self, head: bytes) -> bool:
        lines = head.split(b"\r\n")
        self.status = int(lines[0].split()[1])
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"transfer-encoding" and b"chunked" in value.lower():
                self.chunked = _Chunked()
            elif name == b"content-length":
                self.length = int(value)
        if self.status != 200:
            self._finish(f"HTTP {self.status}")
            if self.transport is not None:
                self.transport.close()
            return False
        return True

    def _payload(self, payload: bytes, now: float) -> None:
        if payload:
            window = self.carry + payload
            frames = window.count(_FRAME) - self.carry.count(_FRAME)
            if frames:
                if self.ttft < 0:
                    self.ttft = now - self.sent
                else:
                    self.gaps.append(now - self.last)
                self.gaps.extend([0.0] * (frames - 1))
                self.last = now
                self.tally.frames += frames
            self.saw_done = self.saw_done or self.end in window
            self.carry = window[1 - len(self.end) :]
            self.received += len(payload)
        ended = self.chunked.done if self.chunked is not None else 0 <= self.length <= self.received
        if ended:
            self._finish(None if self.saw_done else "stream ended without its end event")


@dataclass(frozen=True)
class Plan:
    host: str
    port: int
    request: bytes
    end: bytes
    streams: int
    seconds: float
    ramp: float


async def _worker(plan: Plan, tally: Tally, index: int, t0: float) -> None:
    await asyncio.sleep(plan.ramp * index / plan.streams)
    loop = asyncio.get_running_loop()
    conn: _Exchange | None = None
    end = t0 + plan.ramp + plan.seconds
    while (started := time.perf_counter()) < end:
        if conn is None or conn.closed:
            try:
                _, conn = await loop.create_connection(
                    lambda: _Exchange(tally, plan.end), plan.host, plan.port
                )
            except OSError as exc:
                tally.error(f"connect: {exc.strerror or exc}")
                await asyncio.sleep(0.1)
                continue
        error, ttft, gaps = await conn.run(plan.request)
        if error is not None:
            tally.error(error)
            if conn.transport is not None:
                conn.transport.close()
            conn = None
            continue
        if t0 + plan.ramp <= time.perf_counter() <= end:
            tally.completed += 1
        if started >= t0 + plan.ramp:
            tally.ttft.append(ttft)
            tally.gaps.extend(gaps)
    if conn is not None and conn.transport is not None:
        conn.transport.close()


def _percentiles(values: list[float], points: tuple[float, ...]) -> dict[str, float]:
    if not values:
        return {f"p{p:g}": float("nan") for p in points}
    values.sort()
    last = len(values) - 1
    return {f"p{p:g}": values[min(last, round(p / 100 * last))] * 1000 for p in points}


async def measure(plan: Plan) -> dict[str, object]:
    tally = Tally()
    t0 = time.perf_counter()
    workers = [asyncio.create_task(_worker(plan, tally, i, t0)) for i in range(plan.streams)]
    # Streams still running at the end of the window would count for nothing: stop them.
    _, late = await asyncio.wait(workers, timeout=plan.ramp + plan.seconds + 0.05)
    for task in late:
        task.cancel()
    await asyncio.gather(*late, return_exceptions=True)
    return {
        "streams": plan.streams,
        "seconds": plan.seconds,
        "completed": tally.completed,
        "streams_per_s": tally.completed / plan.seconds,
        "errors": tally.errors,
        "error_kinds": tally.error_kinds,
        "frames": tally.frames,
        "ttft_ms": _percentiles(tally.ttft, (50, 90, 99)),
        "gap_ms": _percentiles(tally.gaps, (50, 99, 99.9)),
    }


def build_request(url: str, body: bytes, headers: dict[str, str]) -> tuple[str, int, bytes]:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    lines = [
        f"POST {parts.path or '/'} HTTP/1.1",
        f"Host: {host}:{port}",
        "Content-Type: application/json",
        "Accept: text/event-stream",
        f"Content-Length: {len(body)}",
        *(f"{k}: {v}" for k, v in headers.items()),
    ]
    return host, port, ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.streamclient", description=__doc__)
    ap.add_argument("--url", required=True)
    ap.add_argument("--body-file", type=Path, required=True)
    ap.add_argument("--header", action="append", default=[], metavar="NAME:VALUE")
    ap.add_argument("--streams", type=int, required=True)
    ap.add_argument("--seconds", type=float, required=True, help="measurement window")
    ap.add_argument("--ramp", type=float, default=2.0, help="start-up, not measured")
    ap.add_argument("--end", default=OPENAI_END, help="what marks a complete stream")
    args = ap.parse_args(argv)
    headers = dict(h.split(":", 1) for h in args.header)
    host, port, request = build_request(args.url, args.body_file.read_bytes(), headers)
    plan = Plan(host, port, request, args.end.encode(), args.streams, args.seconds, args.ramp)
    import uvloop

    result = uvloop.run(measure(plan))
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
