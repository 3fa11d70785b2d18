"""A sim node as a process would be: listening, refusing, restarting, stopping."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from collections import Counter
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import msgspec
from aiohttp import web

from cortex.sim.admission import Admission
from cortex.sim.config import SimConfig, SimModel
from cortex.sim.faults import Faults, FaultsPatch
from cortex.sim.models import Registry
from cortex.sim.server import SimServer
from cortex.sim.state import NodeState

log = logging.getLogger("cortex.sim")

_SHUTDOWN_TIMEOUT_S = 1.0


class SimNode:
    """An emulated `mistralrs serve` node on a real socket.

    `faults` is mutable and read per request. `counters` counts requests per
    route path (e.g. `counters["/v1/models/reload"]`) and lifecycle events
    (`load`, `lazy_load`, `oom`, `abort`). A node starts once.
    """

    def __init__(self, cfg: SimConfig) -> None:
        self.config = cfg
        self.counters: Counter[str] = Counter()
        self._faults = Faults()
        self._state = NodeState(
            config=cfg,
            registry=Registry(cfg.models, cfg.vram_mb, self.counters),
            admission=Admission(cfg.max_seqs),
            faults=self._faults,
            counters=self.counters,
        )
        self.app: web.Application = SimServer(self._state, self).application()
        self.host = "127.0.0.1"
        self.port = 0
        self._runner: web.AppRunner | None = None
        self._listening: asyncio.Task[asyncio.Server] | None = None
        self._refuse_timer: asyncio.TimerHandle | None = None
        self._models_overridden = False

    @property
    def faults(self) -> Faults:
        return self._faults

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def models(self) -> list[str]:
        return self._state.registry.ids

    @property
    def running_sequences(self) -> int:
        """Sequences generating now (`mistralrs_sequences_running`)."""
        return self._state.admission.running

    @property
    def waiting_sequences(self) -> int:
        """Sequences queued beyond `max_seqs` (`mistralrs_sequences_waiting`)."""
        return self._state.admission.waiting

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        """Listen on host:port (0 picks a free port, then read `port`)."""
        if self._runner is not None:
            raise RuntimeError("this sim node is already started")
        self._runner = web.AppRunner(
            self.app,
            access_log=None,
            handler_cancellation=True,
            shutdown_timeout=_SHUTDOWN_TIMEOUT_S,
        )
        await self._runner.setup()
        self.host, self.port = host, port
        try:
            self._listen()
            assert self._listening is not None
            await self._listening
        except BaseException:
            runner, self._runner = self._runner, None
            await runner.cleanup()
            raise
        self._faults.bind(self._on_refuse)
        if self._faults.refuse:
            self._on_refuse(True)

    async def stop(self) -> None:
        """Stop like a process exits: close the socket and every connection."""
        runner, self._runner = self._runner, None
        if runner is None:
            return
        self._faults.bind(None)
        if self._refuse_timer is not None:
            self._refuse_timer.cancel()
        self._unlisten()
        self._state.registry.close()
        self._drop_connections(runner)
        await runner.cleanup()

    @contextlib.asynccontextmanager
    async def running(self, host: str = "127.0.0.1", port: int = 0) -> AsyncIterator[SimNode]:
        """`async with SimNode(cfg).running() as node:` starts and always stops the node."""
        await self.start(host, port)
        try:
            yield self
        finally:
            await self.stop()

    def replace_models(self, models: Sequence[SimModel] | None) -> None:
        """Restart the engine with another model list (None: the configured one).

        In-flight sequences are aborted. Raises ValueError if the loaded models
        exceed the VRAM budget or ids repeat.
        """
        chosen = list(self.config.models if models is None else models)
        ids = [m.id for m in chosen]
        if not chosen or len(set(ids)) != len(ids):
            raise ValueError(f"a model list needs unique ids and at least one model, got {ids}")
        registry = Registry(chosen, self.config.vram_mb, self.counters)
        self._state.registry.close()
        self._state.registry = registry
        self._models_overridden = models is not None

    def apply_faults(self, values: Mapping[str, Any] | FaultsPatch) -> None:
        """Set fault knobs from JSON-like values, as `POST /_sim/faults` takes them.

        Fields left out keep their value. Raises ValueError naming a bad field.
        """
        try:
            patch = (
                values if isinstance(values, FaultsPatch) else msgspec.convert(values, FaultsPatch)
            )
            models = patch.models_override
            if models is not msgspec.UNSET:
                self.replace_models(None if models is None else [SimModel.parse(m) for m in models])
        except msgspec.ValidationError as exc:
            raise ValueError(f"bad faults: {exc}") from None
        self._faults.apply(patch)
        if patch.refuse_for_s is not msgspec.UNSET:
            self.refuse_for(patch.refuse_for_s)

    def clear_faults(self) -> None:
        """Clear every fault and go back to the configured models."""
        self._faults.clear()
        if self._models_overridden:
            self.replace_models(None)

    def refuse_for(self, seconds: float) -> None:
        """Refuse connections now and listen again after `seconds`."""
        if self._refuse_timer is not None:
            self._refuse_timer.cancel()
        self._faults.refuse = True
        loop = asyncio.get_running_loop()
        self._refuse_timer = loop.call_later(seconds, setattr, self._faults, "refuse", False)

    def _on_refuse(self, refuse: bool) -> None:
        if self._runner is None:
            return
        if refuse:
            self._unlisten()
            self._drop_connections(self._runner)
        else:
            self._listen()

    def _listen(self) -> None:
        """Bind and listen at once (connections queue in the backlog), serve from the loop."""
        assert self._runner is not None and self._runner.server is not None
        sock = socket.create_server((self.host, self.port), backlog=1024)
        self.port = sock.getsockname()[1]
        loop = asyncio.get_running_loop()
        self._listening = loop.create_task(loop.create_server(self._runner.server, sock=sock))

    def _unlisten(self) -> None:
        listening, self._listening = self._listening, None
        if listening is None:
            return
        if listening.done():
            _close_server(listening)
        else:
            listening.add_done_callback(_close_server)

    @staticmethod
    def _drop_connections(runner: web.AppRunner) -> None:
        if runner.server is None:
            return
        for connection in runner.server.connections:
            connection.force_close()


def _close_server(listening: asyncio.Task[asyncio.Server]) -> None:
    if not listening.cancelled() and listening.exception() is None:
        listening.result().close()


async def serve_forever(
    cfg: SimConfig, host: str, port: int, faults: Mapping[str, Any] | None = None
) -> None:
    """Run a sim node until cancelled, SIGINT or SIGTERM (for `cortex sim`).

    `faults` are knobs to start with, as `SimNode.apply_faults` takes them.
    """
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGINT, signal.SIGTERM)
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    try:
        node = SimNode(cfg)
        node.apply_faults(faults or {})
        async with node.running(host, port):
            models = ", ".join(
                f"{m.id} ({'loaded' if m.loaded else 'unloaded'})" for m in cfg.models
            )
            log.info("sim node %r listening on %s serving %s", cfg.name, node.url, models)
            await stop.wait()
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
