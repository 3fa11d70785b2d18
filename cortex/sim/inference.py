"""The generation pipeline every inference route shares.

model (lazy reload) -> plan the answer -> [stream: headers] -> wait for a sequence
slot -> generate (paced at the model's speed unless `instant`) -> answer.

A stream's headers go out before the sequence waits for a slot, as mistral.rs
returns its SSE response as soon as the request reaches the engine; a lazy
reload happens before that, so its request sees no byte until the model is
loaded. Keep-alive comments fill every silence longer than `keepalive_s`.

An unload aborts the model's sequences by cancelling their tasks: a stream then
just ends (no terminator), a non-streaming request answers 500.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from typing import NamedTuple

from aiohttp import web

from cortex.sim.answer import Answer, Prompt, Timing, plan
from cortex.sim.config import SimModel
from cortex.sim.dialect import FAULT_MESSAGE, KEEPALIVE, SSE_HEADERS, Dialect, Reply, SseBody
from cortex.sim.faults import Faults
from cortex.sim.models import ModelUnavailable, SimError
from cortex.sim.state import NodeState


class Job(NamedTuple):
    """What an inference route decodes from its body."""

    dialect: Dialect
    model_id: str
    prompt: Prompt
    stream: bool


@dataclass(frozen=True, slots=True)
class StreamPlan:
    """The frames to write, with their token costs; `drop` closes the connection after them."""

    frames: list[bytes]
    costs: list[int]
    drop: bool = False


def stream_plan(body: SseBody, faults: Faults) -> StreamPlan:
    """Apply the stream faults to a rendered stream."""
    tail = [body.done] if body.done else []
    if not faults.streams_faulty:
        return StreamPlan(body.frames + tail, body.costs + [0] * len(tail))
    frames, costs = body.frames, body.costs
    if faults.no_done:
        tail = []
    if faults.error_after_chunks is not None:
        limit = faults.error_after_chunks
        frames, costs, tail = frames[:limit], costs[:limit], [body.error]
    frames, costs = frames + tail, costs + [0] * len(tail)
    if faults.drop_after_chunks is None:
        return StreamPlan(frames, costs)
    limit = faults.drop_after_chunks
    return StreamPlan(frames[:limit], costs[:limit], drop=True)


class Pipeline:
    """Turns decoded inference requests into answers, sharing the node's state."""

    def __init__(self, state: NodeState) -> None:
        self._state = state

    async def run(self, request: web.Request, job: Job) -> web.StreamResponse:
        """Answer one inference request; errors before the first byte use the dialect's shape."""
        state, dialect = self._state, job.dialect
        try:
            slot = await state.registry.acquire(job.model_id)
        except ModelUnavailable as exc:
            return dialect.error(dialect.unknown_model_status, str(exc))
        except SimError as exc:
            return dialect.error(exc.status, str(exc))
        sequence = slot.track()
        response = web.StreamResponse(headers=SSE_HEADERS) if job.stream else None
        try:
            answer = plan(job.prompt, slot.spec, state.call_ids)
            reply = Reply(str(next(state.ids)), int(time.time()), slot.spec)
            if response is None:
                return await self._respond(request, dialect, answer, reply)
            await response.prepare(request)
            body = dialect.stream(answer, reply)
            return await self._stream(request, response, answer, reply, body)
        except asyncio.CancelledError:
            if not sequence.aborted:
                raise
            _uncancel()
            return await _aborted(dialect, response, slot.spec.id)
        except ConnectionError:
            # The client left or a fault (drop, refuse, stop) closed the connection.
            return response if response is not None else _unsent()
        finally:
            slot.untrack(sequence)

    async def _stream(
        self,
        request: web.Request,
        response: web.StreamResponse,
        answer: Answer,
        reply: Reply,
        body: SseBody,
    ) -> web.StreamResponse:
        writing = stream_plan(body, self._state.faults)
        await self._enter(response)
        try:
            await self._write(response, writing, answer, reply.model)
        finally:
            self._state.admission.leave()
        if writing.drop:
            _drop(request)
        else:
            await response.write_eof()
        return response

    async def _write(
        self, response: web.StreamResponse, writing: StreamPlan, answer: Answer, model: SimModel
    ) -> None:
        config = self._state.config
        if config.instant:
            await response.write(b"".join(writing.frames))
            return
        pacer = Pacer(response, config.keepalive_s)
        await pacer.run(writing, Timing.of(answer, model).prompt_s, 1 / model.tok_per_s)

    async def _respond(
        self, request: web.Request, dialect: Dialect, answer: Answer, reply: Reply
    ) -> web.StreamResponse:
        await self._enter(None)
        try:
            if not self._state.config.instant:
                await asyncio.sleep(Timing.of(answer, reply.model).total_s)
        finally:
            self._state.admission.leave()
        faults = self._state.faults
        if faults.drop_after_chunks is not None:
            _drop(request)
            return _unsent()
        if faults.error_after_chunks is not None:
            return dialect.error(500, FAULT_MESSAGE)
        return web.Response(body=dialect.body(answer, reply), content_type="application/json")

    async def _enter(self, response: web.StreamResponse | None) -> None:
        """Wait for a sequence slot; a waiting stream gets keep-alive comments."""
        admission = self._state.admission
        if admission.try_enter():
            return
        waiter = admission.enqueue()
        try:
            if response is None:
                await waiter
                return
            keepalive = self._state.config.keepalive_s
            while not (await asyncio.wait((waiter,), timeout=keepalive))[0]:
                await response.write(KEEPALIVE)
        except BaseException:
            admission.abandon(waiter)
            raise


class Pacer:
    """Writes frames when due at the model's speed, with keep-alives in long silences."""

    __slots__ = ("_keepalive_s", "_loop", "_quiet_since", "_response")

    def __init__(self, response: web.StreamResponse, keepalive_s: float) -> None:
        self._response = response
        self._keepalive_s = keepalive_s
        self._loop = asyncio.get_running_loop()
        self._quiet_since = self._loop.time()

    async def run(self, writing: StreamPlan, prompt_s: float, token_s: float) -> None:
        due = self._loop.time() + prompt_s
        for frame, cost in zip(writing.frames, writing.costs, strict=True):
            due += cost * token_s
            await self._sleep_until(due)
            await self._response.write(frame)
            self._quiet_since = self._loop.time()

    async def _sleep_until(self, due: float) -> None:
        while (now := self._loop.time()) < due:
            ping_at = self._quiet_since + self._keepalive_s
            if due <= ping_at:
                await asyncio.sleep(due - now)
                return
            await asyncio.sleep(ping_at - now)
            await self._response.write(KEEPALIVE)
            self._quiet_since = self._loop.time()


def _drop(request: web.Request) -> None:
    """Close the TCP connection without finishing the answer."""
    if request.transport is not None:
        request.transport.close()


def _unsent() -> web.Response:
    """What a handler returns for a connection that is already closed."""
    return web.Response(status=499)


def _uncancel() -> None:
    task = asyncio.current_task()
    if task is not None:
        task.uncancel()


async def _aborted(
    dialect: Dialect, response: web.StreamResponse | None, model_id: str
) -> web.StreamResponse:
    if response is not None and response.prepared:
        with contextlib.suppress(ConnectionError):
            await response.write_eof()
        return response
    return dialect.error(500, f"model `{model_id}` was unloaded while the request was in flight")
