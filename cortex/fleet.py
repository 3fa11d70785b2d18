"""Fleet state: node and model state machines, and the immutable routing snapshot.

The supervisor is the only writer of fleet state: it builds a new
:class:`Snapshot` whenever something changes and publishes it by assigning one
attribute. The request path reads that attribute once per request and does
dict lookups on it; it never awaits the supervisor when a model is loaded.

The one thing the request path writes is its own accounting on
:class:`NodeHandle` (in-flight counts and last-use times), through
:func:`begin` and :func:`end`. Those are plain ints and floats touched from the
one event loop, so no lock is needed. ``NodeHandle.stalls`` is the supervisor's
(set when a node is held out for stalls): the request path only reads it, and
reports a first byte to the supervisor only from a node where it is not 0; it
counts its requests to such a node in ``NodeHandle.probes``.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from cortex.config import Model, Node, map_model


class NodeState(enum.Enum):
    """Where a node is in its life, as cortex sees it."""

    UNKNOWN = "unknown"  # configured, not polled yet
    UP = "up"
    DOWN = "down"  # `poll.down_after` polls failed in a row
    DRAINING = "draining"  # no new requests: about to restart (defrag)
    RESTARTING = "restarting"  # its agent is restarting mistralrs

    @property
    def routable(self) -> bool:
        return self is NodeState.UP

    @property
    def pollable(self) -> bool:
        return self is not NodeState.RESTARTING


class ModelState(enum.Enum):
    """A model on one node. The first three are what nodes report."""

    LOADED = "loaded"
    UNLOADED = "unloaded"
    RELOADING = "reloading"  # the node is loading it (lazy or not by cortex)
    LOADING = "loading"  # cortex asked the node to load it
    UNLOADING = "unloading"  # cortex is evicting it: no new requests

    @classmethod
    def from_node(cls, status: str | None) -> ModelState | None:
        """The state a node's ``status`` string means; ``None`` for anything else."""
        return _NODE_STATUS.get(status or "")

    @property
    def routable(self) -> bool:
        return self is ModelState.LOADED

    @property
    def resident(self) -> bool:
        """Occupies (or is about to occupy) VRAM on its node."""
        return self is not ModelState.UNLOADED

    @property
    def public(self) -> str:
        """The status shown to clients: the node's own vocabulary."""
        return _PUBLIC[self]


_NODE_STATUS = {
    "loaded": ModelState.LOADED,
    "unloaded": ModelState.UNLOADED,
    "reloading": ModelState.RELOADING,
}
_PUBLIC = {
    ModelState.LOADED: "loaded",
    ModelState.UNLOADED: "unloaded",
    ModelState.RELOADING: "reloading",
    ModelState.LOADING: "reloading",
    ModelState.UNLOADING: "loaded",
}


@dataclass(slots=True, eq=False)
class NodeHandle:
    """One configured node: its address, plus the request path's accounting.

    Lives as long as the node is configured (a config reload keeps handles of
    unchanged nodes, so in-flight counts survive it).
    """

    name: str
    base_url: str  # no trailing slash: "http://gpu-large.internal:8080"
    config: Node
    inflight: int = 0
    model_inflight: dict[str, int] = field(default_factory=dict)
    last_used: dict[str, float] = field(default_factory=dict)  # model -> time.monotonic()
    # `anthropic = "auto"` nodes: does it serve /v1/messages? None until a request finds out.
    messages_native: bool | None = None
    stalls: int = 0  # first-byte stalls in a row; written by the supervisor only
    probes: int = 0  # requests in flight sent while `stalls` was not 0 (request path)

    @classmethod
    def from_config(cls, node: Node) -> NodeHandle:
        return cls(name=node.name, base_url=node.endpoint.rstrip("/"), config=node)


def begin(node: NodeHandle, model: str) -> None:
    """A request for ``model`` starts on ``node``."""
    node.inflight += 1
    node.model_inflight[model] = node.model_inflight.get(model, 0) + 1


def end(node: NodeHandle, model: str) -> None:
    """That request ended (any way). Also stamps the model's last use for LRU."""
    node.inflight -= 1
    left = node.model_inflight.get(model, 1) - 1
    if left:
        node.model_inflight[model] = left
    else:
        node.model_inflight.pop(model, None)
    node.last_used[model] = time.monotonic()


@dataclass(frozen=True, slots=True)
class NodeView:
    """A node as of one snapshot."""

    handle: NodeHandle
    state: NodeState
    vram_mb: int  # configured total (0 = unknown)
    models: Mapping[str, ModelState]  # every model the node lists (no `default`)
    pinned: frozenset[str]
    cycles: int = 0  # load/unload cycles since its last restart
    running: int | None = None  # from the node's /metrics, when it serves it
    waiting: int | None = None
    error: str = ""  # why the last poll failed, when it did
    used_mb: int = 0  # sizes of its resident models, as far as `[[models]]` tells
    gpu_used_mb: int | None = None  # measured by the node's agent (nvidia-smi), when it has one
    gpu_total_mb: int | None = None

    @property
    def name(self) -> str:
        return self.handle.name

    @property
    def free_mb(self) -> int:
        """VRAM not taken by resident models; 0 when the node's total is unknown."""
        return self.vram_mb - self.used_mb if self.vram_mb else 0


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything the request path needs, immutable; replaced wholesale on change.

    ``routes`` maps every model id to the up nodes where it is loaded and
    routable (empty tuple when listed but not loaded anywhere); a model id
    absent from ``routes`` is in no catalogue. ``names`` maps every name a
    client may use (ids, ``[[models]]`` aliases) to a model id; names that only
    match a ``model_map`` pattern are resolved by :meth:`resolve`.
    """

    version: int
    nodes: Mapping[str, NodeView]
    routes: Mapping[str, tuple[NodeHandle, ...]]
    names: Mapping[str, str]
    model_map: Mapping[str, str]
    models_body: bytes  # the /v1/models answer, encoded once per snapshot

    def resolve(self, name: str) -> str | None:
        """The model id a client's model name refers to, or ``None``."""
        found = self.names.get(name)
        if found is not None:
            return found
        target = map_model(self.model_map, name)
        if target is None:
            return None
        return self.names.get(target, target)


EMPTY = Snapshot(
    version=0,
    nodes={},
    routes={},
    names={},
    model_map={},
    models_body=b'{"object":"list","data":[]}',
)


def build_snapshot(
    version: int,
    nodes: Mapping[str, NodeView],
    models: Sequence[Model] = (),
    model_map: Mapping[str, str] | None = None,
    created: int = 0,
) -> Snapshot:
    """The snapshot of ``nodes`` (in config order), with names and catalogue from config.

    ``routes`` holds every model some node lists, even a down one, so that a
    request for a model whose node is down is told "unavailable", not "unknown".
    """
    listed: dict[str, list[NodeHandle]] = {}
    for view in nodes.values():
        up = view.state.routable
        for model_id, state in view.models.items():
            handles = listed.setdefault(model_id, [])
            if up and state.routable:
                handles.append(view.handle)
    names = {model_id: model_id for model_id in listed}
    for m in models:
        names.setdefault(m.id, m.id)
        for alias in m.aliases:
            names.setdefault(alias, m.id)
    mapping = dict(model_map or {})
    return Snapshot(
        version=version,
        nodes=dict(nodes),
        routes={model_id: tuple(handles) for model_id, handles in listed.items()},
        names=names,
        model_map=mapping,
        models_body=_models_body(nodes, models, mapping, created),
    )


def _models_body(
    nodes: Mapping[str, NodeView],
    models: Sequence[Model],
    model_map: Mapping[str, str],
    created: int,
) -> bytes:
    where: dict[str, dict[str, str]] = {}
    for view in nodes.values():
        if view.state.routable:
            for model_id, state in view.models.items():
                where.setdefault(model_id, {})[view.name] = state.public
    data: list[dict[str, Any]] = [
        _model_entry(model_id, created, {"nodes": where[model_id]}) for model_id in sorted(where)
    ]
    for m in models:
        if m.id in where:
            data += [_model_entry(alias, created, {"alias_of": m.id}) for alias in m.aliases]
    body: dict[str, Any] = {"object": "list", "data": data}
    if model_map:
        body["cortex"] = {"model_map": dict(model_map)}
    return orjson.dumps(body)


def _model_entry(model_id: str, created: int, extra: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": model_id,
        "object": "model",
        "created": created,
        "owned_by": "cortex",
        "cortex": extra,
    }


class FleetEvents(Protocol):
    """What the supervisor reports; the metrics layer implements it."""

    def model_load(self, node: str, model: str, result: str, seconds: float) -> None: ...
    def model_evicted(self, node: str, model: str, reason: str) -> None: ...
    def node_restart(self, node: str) -> None: ...
    def fleet_changed(self, snapshot: Snapshot) -> None: ...
    def queued(self, model: str, delta: int) -> None: ...


class NoEvents:
    """A :class:`FleetEvents` that records nothing (tests, tools)."""

    def model_load(self, node: str, model: str, result: str, seconds: float) -> None:
        pass

    def model_evicted(self, node: str, model: str, reason: str) -> None:
        pass

    def node_restart(self, node: str) -> None:
        pass

    def fleet_changed(self, snapshot: Snapshot) -> None:
        pass

    def queued(self, model: str, delta: int) -> None:
        pass
