"""Shared fixtures: emulated nodes and a real gateway in front of them, on loopback."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pytest

from cortex import config

if TYPE_CHECKING:
    from cortex.app import Gateway
    from cortex.sim import SimConfig, SimNode


@dataclass
class Fleet:
    """A running gateway and the emulated nodes behind it."""

    gateway: Gateway
    nodes: dict[str, SimNode]
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.gateway.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.gateway.metrics.bound_port}"

    async def wait_for(self, predicate: Callable[[], bool], within: float = 5.0) -> None:
        """Poll ``predicate`` until true (fleet state changes are asynchronous)."""
        deadline = asyncio.get_running_loop().time() + within
        while not predicate():
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError("condition not reached in time")
            await asyncio.sleep(0.02)


FleetFactory = Callable[..., Awaitable[Fleet]]


def gateway_config(nodes: dict[str, SimNode], /, **sections: Any) -> config.Config:
    """A config for a gateway on ephemeral loopback ports in front of ``nodes``."""
    raw: dict[str, Any] = {
        "gateway": {"listen": "127.0.0.1:0", "metrics_listen": "127.0.0.1:0"},
        "poll": {"interval_s": 0.2, "timeout_s": 0.5, "down_after": 2},
        "nodes": [
            {"name": name, "endpoint": node.url, "vram_mb": node.config.vram_mb}
            for name, node in nodes.items()
        ],
    }
    return with_sections(raw, sections)


def with_sections(raw: dict[str, Any], sections: dict[str, Any]) -> config.Config:
    """``raw`` with ``sections`` merged over it (tables key by key), decoded as a config."""
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    return config.decode(raw, "<test>")


@pytest.fixture
async def make_fleet() -> AsyncIterator[FleetFactory]:
    """Start emulated nodes and a gateway; everything stops at teardown.

    ``await make_fleet({"a": SimConfig(...), ...}, poll={...}, nodes=[...])``;
    keyword arguments are config sections merged over the defaults above. A
    ``nodes`` list replaces the generated one: use ``"{url:NAME}"`` as an
    endpoint to refer to node NAME's address.
    """
    # Imported here so that suites of modules still being written can run alone.
    from cortex.app import Gateway
    from cortex.sim import SimConfig, SimModel, SimNode

    started: list[Fleet] = []

    async def factory(sims: dict[str, SimConfig] | None = None, **sections: Any) -> Fleet:
        sims = (
            sims
            if sims is not None
            else {"node-a": SimConfig(models=[SimModel("m1")], instant=True)}
        )
        nodes = {name: SimNode(cfg) for name, cfg in sims.items()}
        for node in nodes.values():
            await node.start("127.0.0.1", 0)
        if "nodes" in sections:
            sections["nodes"] = [_fill_urls(n, nodes) for n in sections["nodes"]]
        gateway = Gateway(gateway_config(nodes, **sections))
        await gateway.start()
        fleet = Fleet(gateway, nodes)
        started.append(fleet)
        return fleet

    yield factory
    for fleet in started:
        await fleet.gateway.stop()
        for node in fleet.nodes.values():
            await node.stop()


def _fill_urls(node: dict[str, Any], nodes: dict[str, SimNode]) -> dict[str, Any]:
    endpoint = node.get("endpoint", "")
    if endpoint.startswith("{url:"):
        node = {**node, "endpoint": nodes[endpoint[5:-1]].url}
    return node


# --- what this process holds (leak checks) ------------------------------------------


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))
