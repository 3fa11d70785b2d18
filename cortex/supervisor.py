"""The control plane: polls the nodes, publishes snapshots, loads, evicts, restarts.

One :class:`Supervisor` per gateway. Its loop polls every node's ``/v1/models``
(and ``/metrics``) each ``poll.interval_s`` and publishes a new immutable
:class:`~cortex.fleet.Snapshot` whenever anything changed; the request path
only reads ``supervisor.snapshot`` and calls :meth:`Supervisor.pick`.

When a request needs a model that is not loaded, :meth:`Supervisor.acquire`
asks :mod:`cortex.placement` for a plan, then carries it out in a task of its
own that every caller for that model awaits: mark the evictees ``UNLOADING``
(no new requests), wait for their requests to drain, unload them, reload the
model. Cortex keeps its own truth between polls; a poll never undoes a load or
an eviction under way, and a poll sent before cortex changed a node's models
is not allowed to overwrite that change.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import aiohttp

from cortex import placement
from cortex.config import Config
from cortex.errors import CortexError, ModelNotFound, NotFound, Unavailable
from cortex.fleet import (
    EMPTY,
    FleetEvents,
    ModelState,
    NodeHandle,
    NodeState,
    NodeView,
    NoEvents,
    Snapshot,
    build_snapshot,
)
from cortex.nodeapi import (
    HTTP_ERRORS,
    AgentError,
    Lifecycle,
    NodeClient,
    PollResult,
    describe,
    is_oom,
)
from cortex.placement import LoadPlan, Unplaceable

log = logging.getLogger("cortex.fleet")

# The request path's end() signals nothing (it must stay cheap), so drains are
# watched by reading the in-flight counters this often.
_DRAIN_CHECK_S = 0.05
# How often a load cortex waits for (the node's own, e.g. a lazy reload) is checked.
_LOAD_CHECK_MAX_S = 0.5


@dataclass(slots=True, eq=False)
class _Node:
    """The supervisor's own, mutable truth about one node."""

    handle: NodeHandle
    state: NodeState = NodeState.UNKNOWN
    models: dict[str, ModelState] = field(default_factory=dict)
    failures: int = 0
    cycles: int = 0
    running: int | None = None
    waiting: int | None = None
    error: str = ""
    # bumped whenever cortex changes `models` itself: older polls don't overwrite that
    epoch: int = 0
    pins_added: set[str] = field(default_factory=set)  # by the admin API, on top of config
    pins_removed: set[str] = field(default_factory=set)
    warned_no_agent: bool = False
    gpu: tuple[int, int] | None = None
    held_until: float = 0.0  # time.monotonic(): out of routing for stalls until then
    held_at: float = 0.0  # when the latest hold began
    hold_reason: str = ""  # shown as its error while held, whatever the polls say

    @property
    def name(self) -> str:
        return self.handle.name

    @property
    def pinned(self) -> frozenset[str]:
        return frozenset((set(self.handle.config.pinned) | self.pins_added) - self.pins_removed)

    def set_model(self, model: str, state: ModelState) -> None:
        """Cortex's own change to a model it knows (one the node no longer lists stays gone)."""
        if model in self.models:
            self.models[model] = state
            self.epoch += 1


class Supervisor:
    """Fleet state, its one writer, and the model lifecycle."""

    def __init__(
        self, cfg: Config, session: aiohttp.ClientSession, events: FleetEvents | None = None
    ) -> None:
        self.cfg = cfg
        self.nodes = NodeClient(session)
        self.events: FleetEvents = events if events is not None else NoEvents()
        self.snapshot: Snapshot = EMPTY
        self._nodes = {n.name: _Node(NodeHandle.from_config(n)) for n in cfg.nodes}
        self._policy = _policy(cfg)
        self._loads: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._restarts: dict[str, asyncio.Task[None]] = {}
        self._loop_task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._soon: set[str] = set()
        self._changed = asyncio.Event()
        self._created = int(time.time())
        self._closed = False

    @property
    def _lifecycle_timeout(self) -> float:
        # a reload returns only once the model is loaded: as long as a request may wait
        return self.cfg.gateway.queue_timeout_s

    # --- lifecycle ------------------------------------------------------------

    async def start(self) -> None:
        """Poll every node once (bounded by ``poll.timeout_s``), publish, start the loop."""
        await self._poll(list(self._nodes.values()))
        if self.snapshot is EMPTY:  # no nodes: still publish the names and model map
            self._publish(force=True)
        self._loop_task = asyncio.create_task(self._run(), name="cortex-supervisor")

    async def stop(self) -> None:
        """Cancel the loop and every load and restart under way, and wait for them."""
        self._closed = True
        tasks = [*self._loads.values(), *self._restarts.values()]
        if self._loop_task is not None:
            tasks.append(self._loop_task)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._loop_task = None

    def reconfigure(self, cfg: Config) -> None:
        """Take a new config: nodes added, removed or changed, pins, model facts.

        A node whose endpoint is unchanged keeps its handle (and with it the
        requests in flight on it and its LRU times).
        """
        old = self._nodes
        nodes: dict[str, _Node] = {}
        for node in cfg.nodes:
            rec = old.get(node.name)
            if rec is not None and rec.handle.base_url == node.endpoint.rstrip("/"):
                rec.handle.config = node
            else:
                rec = _Node(NodeHandle.from_config(node))
                self._soon.add(node.name)
            nodes[node.name] = rec
        for name, rec in old.items():
            if nodes.get(name) is not rec:
                self._cancel_node_tasks(name)
        self.cfg = cfg
        self._nodes = nodes
        self._policy = _policy(cfg)
        self._publish(force=True)
        self._wake.set()

    def _cancel_node_tasks(self, name: str) -> None:
        for (node, _), task in self._loads.items():
            if node == name:
                task.cancel()
        restart = self._restarts.get(name)
        if restart is not None:
            restart.cancel()

    # --- the request path -----------------------------------------------------

    def pick(
        self, model_id: str, exclude: frozenset[str] = placement.NO_NODES
    ) -> NodeHandle | None:
        """The node to send a request for ``model_id`` to, if it is loaded somewhere usable."""
        return placement.choose_loaded(self.snapshot, model_id, exclude)

    async def acquire(
        self, model_id: str, *, exclude: frozenset[str] = placement.NO_NODES
    ) -> tuple[NodeHandle, float]:
        """A node with ``model_id`` loaded, loading it first if needed.

        Returns the node and the seconds spent waiting. Raises
        :class:`ModelNotFound` for a model no node lists and :class:`Unavailable`
        when it cannot be placed or is not ready within ``gateway.queue_timeout_s``.
        """
        handle = self.pick(model_id, exclude)
        if handle is not None:
            return handle, 0.0
        started = time.monotonic()
        self.events.queued(model_id, 1)
        try:
            handle = await self._ensure(model_id, exclude)
        finally:
            self.events.queued(model_id, -1)
        return handle, time.monotonic() - started

    def report_failure(
        self, node: NodeHandle, reason: str, *, poll_now: bool = True, sent: float = 0.0
    ) -> None:
        """A request to ``node`` failed before its first byte: stop routing there now.

        ``poll_now`` (the connection failed): the node is marked down at once and
        polled right away; one good poll brings it back. Not ``poll_now`` (a
        first-byte timeout of the request sent at ``sent``: the node answers polls
        but not requests): it is held out, down whatever its polls say, for
        ``poll.interval_s`` doubled with each stall in a row (at most
        :data:`~cortex.placement.STALL_HOLD_MAX_S`); the first good poll after that
        brings it back. Requests sent before the latest hold do not count.
        :meth:`report_ok` ends the row.
        """
        rec = self._nodes.get(node.name)
        if rec is None or rec.handle is not node:
            return
        if not poll_now:
            self._stalled(rec, reason, sent)
            return
        if rec.state in (NodeState.UP, NodeState.UNKNOWN):
            log.warning("node %s is down: %s", rec.name, reason)
            rec.state = NodeState.DOWN
            rec.failures = max(rec.failures, self.cfg.poll.down_after)
            rec.error = reason
            self._publish()
        self._poll_soon(rec.name)

    def report_ok(self, node: NodeHandle, sent: float) -> None:
        """A request to ``node`` sent at ``sent`` got its first byte: its stalls in a
        row are over, if it was sent since the latest hold began.

        The request path calls this only when ``node.stalls`` is not 0. A hold
        under way runs out.
        """
        rec = self._nodes.get(node.name)
        if rec is None or rec.handle is not node or sent <= rec.held_at or not node.stalls:
            return
        log.info("node %s answered after %s", node.name, _in_a_row(node.stalls))
        node.stalls = 0

    def _stalled(self, rec: _Node, reason: str, sent: float) -> None:
        now = time.monotonic()
        stalls, hold_s = placement.after_stall(
            rec.state, rec.handle.stalls, rec.held_at, sent, now, self.cfg.poll.interval_s
        )
        if not hold_s:
            return
        rec.handle.stalls = stalls
        rec.held_at = now
        rec.held_until = now + hold_s
        rec.hold_reason = f"{reason}; held out for {hold_s:g} s after {_in_a_row(stalls)}"
        log.warning(
            "node %s held out for %g s after %s: %s", rec.name, hold_s, _in_a_row(stalls), reason
        )
        rec.state = NodeState.DOWN
        rec.error = rec.hold_reason
        self._publish()

    async def _ensure(
        self, model_id: str, exclude: frozenset[str], *, patient: bool = True
    ) -> NodeHandle:
        """The loop behind :meth:`acquire`, bounded by ``gateway.queue_timeout_s``.

        Not ``patient``: a reason that waiting might cure (a node down, memory
        taken by another load) fails at once too; a load under way is still waited for.
        """
        timeout = self.cfg.gateway.queue_timeout_s
        why = "still loading"
        try:
            async with asyncio.timeout(timeout):
                while True:
                    handle = self.pick(model_id, exclude)
                    if handle is not None:
                        return handle
                    step = self._load_step(model_id, exclude)
                    if isinstance(step, asyncio.Task):
                        await _join(step)
                    elif step.transient and patient:
                        why = step.reason
                        await self._next_change(self.cfg.poll.interval_s)
                    else:
                        raise Unavailable(
                            step.reason, retry_after=self._retry_after if step.transient else None
                        )
        except TimeoutError:
            raise Unavailable(
                f"{model_id} is not available after waiting {timeout:g} s ({why})",
                retry_after=self._retry_after,
            ) from None

    @property
    def _retry_after(self) -> float:
        return max(1.0, self.cfg.poll.interval_s)

    def _load_step(
        self, model_id: str, exclude: frozenset[str]
    ) -> asyncio.Task[None] | Unplaceable:
        """The load to wait for: one under way on a usable node, or a new one (sync)."""
        if self._closed:
            raise Unavailable("cortex is shutting down", retry_after=self._retry_after)
        if model_id not in self.snapshot.routes:
            raise ModelNotFound(f"The model `{model_id}` does not exist on any node of this fleet")
        for (node, model), task in self._loads.items():
            if model == model_id and node not in exclude:
                return task
        found = placement.plan_load(
            self.snapshot,
            model_id,
            self._policy,
            exclude=exclude,
        )
        if isinstance(found, Unplaceable):
            return found
        return self._start_load(found)

    async def _next_change(self, at_most: float) -> None:
        changed = self._changed
        try:
            async with asyncio.timeout(at_most):
                await changed.wait()
        except TimeoutError:
            pass

    # --- loading ----------------------------------------------------------------

    def _start_load(self, plan: LoadPlan) -> asyncio.Task[None]:
        """Claim the model and the evictees (publish), then start the task doing the I/O."""
        rec = self._nodes[plan.node]
        if plan.reload:
            rec.set_model(plan.model, ModelState.LOADING)
        for ev in plan.evictions:
            rec.set_model(ev.model, ModelState.UNLOADING)
        self._publish()
        key = (plan.node, plan.model)
        task = asyncio.create_task(
            self._load(rec, plan), name=f"cortex-load:{plan.node}:{plan.model}"
        )
        self._loads[key] = task
        task.add_done_callback(partial(self._load_done, key))
        return task

    def _load_done(self, key: tuple[str, str], task: asyncio.Task[None]) -> None:
        if self._loads.get(key) is task:
            del self._loads[key]
        if not task.cancelled():
            task.exception()  # retrieved: its callers were told, and it was logged where it failed

    async def _load(self, rec: _Node, plan: LoadPlan) -> None:
        if not plan.reload:
            await self._wait_loaded(rec, plan.model)
            return
        try:
            await self._make_room_and_load(rec, plan)
        except BaseException:
            if rec.models.get(plan.model) is ModelState.LOADING:
                rec.set_model(plan.model, ModelState.UNLOADED)  # provisional: polled right away
            self._publish()
            self._poll_soon(rec.name)
            raise

    async def _make_room_and_load(self, rec: _Node, plan: LoadPlan) -> None:
        model = plan.model
        evictions = plan.evictions
        spare: set[str] = set()
        attempts = 0
        while True:
            failed = await self._evict(rec, evictions)
            if failed:
                spare |= failed
                evictions = self._replan_room(rec, model, spare)
                continue
            attempts += 1
            oom = await self._reload(rec, model)
            if oom is None:
                return
            if attempts >= self.cfg.eviction.max_load_attempts:
                raise Unavailable(
                    f"{model} ran out of memory on {rec.name} {attempts} times "
                    f"(eviction.max_load_attempts); last error: {oom}",
                    retry_after=self._retry_after,
                )
            evictions = self._next_room(rec, model, spare, oom)

    def _replan_room(
        self, rec: _Node, model: str, spare: set[str]
    ) -> tuple[placement.Eviction, ...]:
        room = placement.plan_room(
            self._view(rec),
            model,
            self._policy,
            spare=spare,
        )
        if isinstance(room, Unplaceable):
            raise Unavailable(
                f"{room.reason} (could not evict {', '.join(sorted(spare))} now)",
                retry_after=self._retry_after,
            )
        self._claim(rec, room)
        return room

    def _next_room(
        self, rec: _Node, model: str, spare: set[str], oom: str
    ) -> tuple[placement.Eviction, ...]:
        ev = placement.next_eviction(
            self._view(rec),
            model,
            self._policy,
            spare=spare,
        )
        if ev is None:
            raise Unavailable(
                f"{model} does not fit on {rec.name} and nothing more may be evicted: {oom}",
                retry_after=self._retry_after,
            )
        self._claim(rec, (ev,))
        return (ev,)

    def _claim(self, rec: _Node, evictions: Iterable[placement.Eviction]) -> None:
        for ev in evictions:
            rec.set_model(ev.model, ModelState.UNLOADING)
        self._publish()

    async def _evict(self, rec: _Node, evictions: tuple[placement.Eviction, ...]) -> set[str]:
        """Drain and unload ``evictions`` (already ``UNLOADING``); the models that could not be.

        If any is still busy after ``eviction.grace_s``, none is unloaded: all go
        back to ``LOADED`` so that the caller can plan again without the busy ones.
        """
        if not evictions:
            return set()
        names = [ev.model for ev in evictions]
        try:
            busy = await self._drain(rec, names)
            if busy:
                self._release(rec, names)
                return busy
            return {ev.model for ev in evictions if await self._unload(rec, ev.model, ev.reason)}
        except BaseException:  # cancelled: whatever was not unloaded serves again
            self._release(rec, names)
            raise

    async def _drain(self, rec: _Node, names: Iterable[str]) -> set[str]:
        """Wait up to ``eviction.grace_s`` for ``names`` to have no requests in flight on
        ``rec``; the ones that still have some."""
        inflight = rec.handle.model_inflight
        grace = self.cfg.eviction.grace_s
        await _until(lambda: not any(inflight.get(m) for m in names), grace)
        busy = {m for m in names if inflight.get(m)}
        if busy:
            log.warning(
                "not unloading %s from %s: requests still in flight after %g s",
                ", ".join(sorted(busy)),
                rec.name,
                grace,
            )
        return busy

    def _release(
        self, rec: _Node, names: Iterable[str], to: ModelState = ModelState.LOADED
    ) -> None:
        """Give up evicting ``names`` where still ``UNLOADING`` (the next poll confirms ``to``)."""
        for m in names:
            if rec.models.get(m) is ModelState.UNLOADING:
                rec.set_model(m, to)
        self._publish()

    async def _unload(self, rec: _Node, model: str, reason: str) -> str:
        """Unload one drained model; ``""`` when done, else what went wrong."""
        try:
            answer = await self.nodes.lifecycle(
                rec.handle, "unload", model, self._lifecycle_timeout
            )
        except HTTP_ERRORS as exc:
            answer = Lifecycle("error", describe(exc))
        if answer.status == "unloaded":
            rec.set_model(model, ModelState.UNLOADED)
            rec.cycles += 1
            self._publish()
            log.info("evicted %s from %s (%s)", model, rec.name, reason)
            self.events.model_evicted(rec.name, model, reason)
            return ""
        problem = f"{answer.status}: {answer.error}" if answer.error else answer.status
        log.warning("unloading %s from %s failed (%s)", model, rec.name, problem)
        rec.set_model(model, ModelState.from_node(answer.status) or ModelState.LOADED)
        self._publish()
        self._poll_soon(rec.name)
        return problem

    async def _reload(self, rec: _Node, model: str) -> str | None:
        """Reload ``model`` (``UNLOADED`` on the node); ``None`` once loaded, the error if OOM."""
        started = time.monotonic()
        try:
            answer = await self.nodes.lifecycle(
                rec.handle, "reload", model, self._lifecycle_timeout
            )
        except TimeoutError:
            self._load_event(rec, model, "timeout", started)
            limit = self.cfg.gateway.queue_timeout_s
            raise Unavailable(
                f"loading {model} on {rec.name} took longer than {limit:g} s",
                retry_after=self._retry_after,
            ) from None
        except HTTP_ERRORS as exc:
            self._load_event(rec, model, "error", started)
            raise Unavailable(f"loading {model} on {rec.name} failed: {describe(exc)}") from None
        if answer.status == "loaded":
            rec.set_model(model, ModelState.LOADED)
            rec.handle.last_used[model] = time.monotonic()  # not the next LRU victim right away
            self._publish()
            self._load_event(rec, model, "ok", started)
            return None
        if answer.status == "reloading":  # someone else's load got there first
            rec.set_model(model, ModelState.RELOADING)
            self._publish()
            await self._wait_loaded(rec, model)
            return None
        if answer.status == "internal_error" and is_oom(answer.error):
            self._load_event(rec, model, "oom", started)
            return answer.error or "out of memory"
        self._load_event(rec, model, "error", started)
        raise Unavailable(
            f"{rec.name} could not load {model}: {answer.status} {answer.error or ''}".strip()
        )

    def _load_event(self, rec: _Node, model: str, result: str, started: float) -> None:
        seconds = time.monotonic() - started
        if result == "ok":
            log.info("loaded %s on %s in %.1f s", model, rec.name, seconds)
        else:
            log.warning(
                "loading %s on %s failed after %.1f s: %s", model, rec.name, seconds, result
            )
        self.events.model_load(rec.name, model, result, seconds)

    async def _wait_loaded(self, rec: _Node, model: str) -> None:
        """Wait while the node loads ``model`` by itself, checking it directly.

        Returns once it is no longer loading (loaded, or not: the caller looks again).
        """
        every = min(self.cfg.poll.interval_s, _LOAD_CHECK_MAX_S)
        limit = self.cfg.gateway.queue_timeout_s
        deadline = time.monotonic() + limit
        while rec.models.get(model) is ModelState.RELOADING:
            if time.monotonic() >= deadline:
                raise Unavailable(
                    f"{model} has been reloading on {rec.name} for over {limit:g} s; "
                    "if it is stuck, unload it (cortex admin API)",
                    retry_after=self._retry_after,
                )
            await asyncio.sleep(every)
            await self._poll([rec])

    # --- polling ----------------------------------------------------------------

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_full = loop.time() + self.cfg.poll.interval_s
        while True:
            delay = next_full - loop.time()
            if delay > 0 and not self._soon:
                try:
                    async with asyncio.timeout(delay):
                        await self._wake.wait()
                except TimeoutError:
                    pass
            self._wake.clear()
            if loop.time() >= next_full:
                names = set(self._nodes)
                next_full = loop.time() + self.cfg.poll.interval_s
            else:
                names = self._soon
            self._soon = set()
            try:
                await self._poll([r for n, r in self._nodes.items() if n in names])
                self._maintain()
            except Exception:
                log.exception("supervisor loop iteration failed")

    def _poll_soon(self, name: str) -> None:
        self._soon.add(name)
        self._wake.set()

    async def _poll(self, recs: list[_Node]) -> None:
        recs = [r for r in recs if r.state.pollable]
        results = await asyncio.gather(*(self._poll_node(r) for r in recs))
        for rec, result in zip(recs, results, strict=True):
            self._apply(rec, result)
        self._publish()

    async def _poll_node(self, rec: _Node) -> PollResult:
        """``GET /v1/models`` and ``GET /metrics`` at once, each within ``poll.timeout_s``."""
        epoch = rec.epoch
        node, timeout = rec.handle, self.cfg.poll.timeout_s
        result, metrics, gpu = await asyncio.gather(
            self.nodes.models(node, timeout),
            self.nodes.metrics(node, timeout),
            self.nodes.gpu(node, timeout),
        )
        result.running, result.waiting = metrics
        result.epoch = epoch
        result.gpu = gpu
        return result

    def _apply(self, rec: _Node, result: PollResult) -> None:
        before = rec.state
        ok = result.models is not None
        held = time.monotonic() < rec.held_until
        rec.state, rec.failures = placement.after_poll(
            rec.state, ok, rec.failures, self.cfg.poll.down_after, held=held
        )
        rec.running, rec.waiting = result.running, result.waiting
        rec.gpu = result.gpu
        if result.models is not None:
            rec.error = rec.hold_reason if held else ""
            if result.epoch == rec.epoch:
                rec.models = placement.merge_models(rec.models, result.models)
        else:
            rec.error = result.error
        if rec.state is before:
            return
        if rec.state is NodeState.UP:
            # back from down: maybe a newer mistral.rs now, so probe /v1/messages again
            rec.handle.messages_native = None
            log.info("node %s is up (%d models)", rec.name, len(rec.models))
        elif rec.state is NodeState.DOWN:
            log.warning("node %s is down: %s", rec.name, rec.error)

    # --- publishing ---------------------------------------------------------------

    def _view(self, rec: _Node) -> NodeView:
        sizes = self._policy.sizes
        return NodeView(
            handle=rec.handle,
            state=rec.state,
            # configured, else what the agent measured: placement needs a capacity
            vram_mb=rec.handle.config.vram_mb or (rec.gpu[1] if rec.gpu else 0),
            models=dict(rec.models),
            pinned=rec.pinned,
            cycles=rec.cycles,
            running=rec.running,
            waiting=rec.waiting,
            error=rec.error,
            used_mb=sum(sizes.get(m, 0) for m, s in rec.models.items() if s.resident),
            gpu_used_mb=rec.gpu[0] if rec.gpu else None,
            gpu_total_mb=rec.gpu[1] if rec.gpu else None,
        )

    def _publish(self, *, force: bool = False) -> None:
        """Publish a new snapshot if anything changed (always with ``force``)."""
        views = {name: self._view(rec) for name, rec in self._nodes.items()}
        old = self.snapshot
        if not force and views == old.nodes:
            return
        self.snapshot = build_snapshot(
            old.version + 1, views, self.cfg.models, self.cfg.model_map, self._created
        )
        self._changed.set()
        self._changed = asyncio.Event()
        self.events.fleet_changed(self.snapshot)

    # --- defrag restarts ------------------------------------------------------------

    def _maintain(self) -> None:
        after = self.cfg.eviction.defrag_after_cycles
        for rec in self._nodes.values():
            if rec.name in self._restarts or not placement.defrag_due(self._view(rec), after):
                continue
            if not rec.handle.config.agent:
                if not rec.warned_no_agent:
                    log.warning(
                        "node %s has had %d load/unload cycles but has no agent to restart it "
                        "(nodes[].agent); VRAM may fragment",
                        rec.name,
                        rec.cycles,
                    )
                    rec.warned_no_agent = True
                rec.cycles = 0
                continue
            task = asyncio.create_task(self._restart(rec), name=f"cortex-restart:{rec.name}")
            self._restarts[rec.name] = task
            task.add_done_callback(partial(self._restart_done, rec.name))
        self._publish()

    def _restart_done(self, name: str, task: asyncio.Task[None]) -> None:
        if self._restarts.get(name) is task:
            del self._restarts[name]
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("restart of node %s failed unexpectedly: %r", name, exc)

    async def _restart(self, rec: _Node) -> None:
        """Drain the node, have its agent restart mistralrs, wait for it to answer again."""
        grace = self.cfg.eviction.grace_s
        log.info(
            "node %s: %d load/unload cycles, draining for a defrag restart", rec.name, rec.cycles
        )
        rec.state = NodeState.DRAINING
        self._publish()
        if not await _until(lambda: rec.handle.inflight == 0, grace):
            log.warning(
                "node %s still has %d request(s) in flight after %g s; restarting anyway",
                rec.name,
                rec.handle.inflight,
                grace,
            )
        rec.state = NodeState.RESTARTING
        self._publish()
        try:
            seconds = await self.nodes.restart(rec.handle, self.cfg.agent.restart_timeout_s)
        except (*HTTP_ERRORS, AgentError) as exc:
            log.warning("defrag restart of node %s failed: %s", rec.name, describe(exc))
            rec.state = NodeState.DOWN  # one good poll brings it back
            rec.error = f"restart failed: {describe(exc)}"
            rec.cycles = 0  # try again after as many cycles, not at every poll
            self._publish()
            self._poll_soon(rec.name)
            return
        if not await self._await_back(rec):
            log.warning("node %s did not answer again after its restart", rec.name)
            return
        log.info("node %s restarted by its agent in %.1f s", rec.name, seconds)
        self.events.node_restart(rec.name)

    async def _await_back(self, rec: _Node) -> bool:
        """Poll the restarted node until it answers (up with a fresh catalogue) or time is up."""
        every = min(self.cfg.poll.interval_s, _LOAD_CHECK_MAX_S)
        deadline = time.monotonic() + self.cfg.agent.restart_timeout_s
        while True:
            result = await self._poll_node(rec)
            if result.models is not None:
                break
            if time.monotonic() >= deadline:
                rec.state, rec.error = NodeState.DOWN, f"not back after its restart: {result.error}"
                self._publish()
                return False
            await asyncio.sleep(every)
        rec.models = result.models
        rec.epoch += 1
        rec.state, rec.failures, rec.cycles = NodeState.UP, 0, 0
        rec.error, rec.running, rec.waiting = "", result.running, result.waiting
        self._publish()
        return True

    # --- admin operations ---------------------------------------------------------

    async def load(self, model_id: str, node: str | None = None) -> str:
        """Load ``model_id`` (on ``node``, or wherever placement says); the node's name."""
        model_id = self._resolve(model_id)
        targets = self._targets(model_id, node)
        exclude = frozenset(self._nodes) - {t.name for t in targets}
        handle = await self._ensure(model_id, exclude, patient=False)
        return handle.name

    async def unload(self, model_id: str, node: str | None = None) -> list[str]:
        """Unload ``model_id`` from ``node`` (or every node); the nodes it was unloaded from.

        Its requests get ``eviction.grace_s`` to finish; if some are still in
        flight then, nothing is unloaded and :class:`Unavailable` is raised.
        """
        model_id = self._resolve(model_id)
        recs = self._targets(model_id, node)
        if any(r.models[model_id] in placement.CORTEX_OWNED for r in recs):
            raise Unavailable(
                f"{model_id} is being loaded or unloaded right now", retry_after=self._retry_after
            )
        # `reloading` too: unloading is the way out of the reload-on-loaded bug
        recs = [r for r in recs if r.models[model_id] in _UNLOADABLE]
        before = {r.name: r.models[model_id] for r in recs}
        for rec in recs:
            rec.set_model(model_id, ModelState.UNLOADING)
        self._publish()
        try:
            busy = [r.name for r in recs if await self._drain(r, (model_id,))]
            if busy:
                raise Unavailable(
                    f"{model_id} still has requests in flight on {', '.join(busy)} "
                    f"after {self.cfg.eviction.grace_s:g} s; not unloading",
                    retry_after=self._retry_after,
                )
            problems = {r.name: await self._unload(r, model_id, "admin") for r in recs}
        except BaseException:
            for rec in recs:
                self._release(rec, (model_id,), to=before[rec.name])
            raise
        failed = [f"{name} ({why})" for name, why in problems.items() if why]
        if failed:
            raise Unavailable(f"could not unload {model_id} from {', '.join(failed)}")
        return list(problems)

    def pin(self, model_id: str, node: str | None = None) -> list[str]:
        """Never evict ``model_id`` from ``node`` (or any node listing it); the nodes."""
        return self._set_pin(model_id, node, pinned=True)

    def unpin(self, model_id: str, node: str | None = None) -> list[str]:
        """Let ``model_id`` be evicted again from ``node`` (or any node); the nodes."""
        return self._set_pin(model_id, node, pinned=False)

    def _set_pin(self, model_id: str, node: str | None, *, pinned: bool) -> list[str]:
        model_id = self._resolve(model_id)
        recs = self._targets(model_id, node)
        for rec in recs:
            if pinned:
                rec.pins_added.add(model_id)
                rec.pins_removed.discard(model_id)
            else:
                rec.pins_removed.add(model_id)
                rec.pins_added.discard(model_id)
        self._publish()
        names = [r.name for r in recs]
        log.info("%s %s on %s", "pinned" if pinned else "unpinned", model_id, ", ".join(names))
        return names

    def _resolve(self, name: str) -> str:
        return self.snapshot.resolve(name) or name

    def _targets(self, model_id: str, node: str | None) -> list[_Node]:
        """The nodes an admin operation on ``model_id`` applies to: ``node`` or all listing it."""
        if node is not None:
            rec = self._nodes.get(node)
            if rec is None:
                raise NotFound(f"no node named {node!r}")
            if model_id not in rec.models:
                raise ModelNotFound(f"node {node} does not serve {model_id}")
            return [rec]
        recs = [r for r in self._nodes.values() if model_id in r.models]
        if not recs:
            raise ModelNotFound(f"The model `{model_id}` does not exist on any node of this fleet")
        return recs

    def fleet(self) -> dict[str, Any]:
        """The fleet as ``GET /admin/fleet`` shows it (and ``cortex status`` renders it)."""
        now = time.monotonic()
        snap = self.snapshot
        return {
            "version": snap.version,
            "nodes": [_node_info(view, self._policy.sizes, now) for view in snap.nodes.values()],
            "loading": [{"node": node, "model": model} for node, model in self._loads],
        }


_UNLOADABLE = frozenset({ModelState.LOADED, ModelState.RELOADING})


def _in_a_row(stalls: int) -> str:
    return "1 stall" if stalls == 1 else f"{stalls} stalls in a row"


def _node_info(view: NodeView, sizes: Mapping[str, int], now: float) -> dict[str, Any]:
    handle = view.handle
    models = []
    for model_id in sorted(view.models):
        used = handle.last_used.get(model_id)
        models.append(
            {
                "id": model_id,
                "status": view.models[model_id].value,
                "pinned": model_id in view.pinned,
                "last_used_s": None if used is None else round(now - used, 1),
                "inflight": handle.model_inflight.get(model_id, 0),
                "vram_mb": sizes.get(model_id, 0),
            }
        )
    return {
        "name": view.name,
        "url": handle.base_url,
        "state": view.state.value,
        "vram_total_mb": view.vram_mb,
        "vram_used_mb": view.used_mb,
        "gpu_used_mb": view.gpu_used_mb,
        "gpu_total_mb": view.gpu_total_mb,
        "inflight": handle.inflight,
        "running": view.running,
        "waiting": view.waiting,
        "cycles": view.cycles,
        "error": view.error,
        "models": models,
    }


def _policy(cfg: Config) -> placement.Policy:
    sizes = {m.id: m.vram_mb for m in cfg.models if m.vram_mb}
    priorities = {m.id: m.priority for m in cfg.models if m.priority}
    return placement.Policy(sizes, priorities, cfg.eviction.strategy)


async def _join(task: asyncio.Task[None]) -> None:
    """Wait for a shared load; its failure is raised anew in each waiter.

    A load cancelled under us (its node left the config) is not our failure:
    the caller just looks again.
    """
    await asyncio.wait({task})
    if task.cancelled():
        return
    exc = task.exception()
    if isinstance(exc, CortexError):
        raise type(exc)(exc.message, code=exc.code, param=exc.param, retry_after=exc.retry_after)
    if exc is not None:
        raise Unavailable(f"loading failed: {describe(exc)}")


async def _until(done: Callable[[], bool], within_s: float) -> bool:
    """Wait until ``done()`` (checked every few ms), for at most ``within_s``; whether it is."""
    deadline = time.monotonic() + within_s
    while not done():
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(_DRAIN_CHECK_S)
    return True
