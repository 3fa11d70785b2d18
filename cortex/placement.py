"""Fleet policy: where a request goes, where a model gets loaded, what a poll means.

Pure functions over a :class:`~cortex.fleet.Snapshot`: no I/O, no event loop.
The supervisor asks, then carries the answer out (*decide, then do I/O*).

Sizes come from ``[[models]].vram_mb``; an unknown size (0) is assumed to fit,
and so is anything on a node whose ``vram_mb`` is unknown (0). When that
optimism is wrong the node answers out-of-memory, and :func:`next_eviction`
names what to evict before the next try.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

from cortex.fleet import ModelState, NodeHandle, NodeState, NodeView, Snapshot

Strategy = Literal["lru", "priority"]
NO_NODES: frozenset[str] = frozenset()
# The longest a node is held out for first-byte stalls. Its polls were good all
# along, so nothing but a request tells cortex that it is well again (a lazy load
# that ended, an operator's restart): a longer hold mostly idles a good node, and
# after 5 min of holds the log and `cortex_node_up` have told someone.
STALL_HOLD_MAX_S = 300.0
# Model states that only cortex sets and ends (a load or an eviction under way).
CORTEX_OWNED = frozenset({ModelState.LOADING, ModelState.UNLOADING})


@dataclass(frozen=True, slots=True)
class Policy:
    """What placement takes from the config: ``[[models]]`` sizes in MB and eviction
    priorities (models left out: 0), and ``eviction.strategy``."""

    sizes: Mapping[str, int]
    priorities: Mapping[str, int]
    strategy: Strategy


@dataclass(frozen=True, slots=True)
class Eviction:
    """One model to unload from the plan's node, in order."""

    model: str
    reason: Strategy  # why it was chosen: reported as the eviction's reason
    drain: bool  # it has requests in flight: wait for them (up to grace_s) first
    size_mb: int  # 0 = unknown


@dataclass(frozen=True, slots=True)
class LoadPlan:
    """Load ``model`` on ``node`` after unloading ``evictions`` in order.

    ``reload`` is false when the node is loading it already (status
    ``reloading``, or cortex's own load): then the only thing to do is wait.
    """

    node: str
    model: str
    evictions: tuple[Eviction, ...]
    reload: bool


@dataclass(frozen=True, slots=True)
class Unplaceable:
    """No node can take the model; ``reason`` is meant for a human.

    ``transient`` means waiting may help (a node is down, another load or an
    eviction is under way); otherwise asking again will not change the answer.
    """

    model: str
    reason: str
    transient: bool


def choose_loaded(
    snapshot: Snapshot, model_id: str, exclude: frozenset[str] = NO_NODES
) -> NodeHandle | None:
    """The node to send a request for ``model_id`` to, among those where it is loaded.

    Fewest requests in flight wins; a tie goes to the node with the most free VRAM.
    A node back from a hold-out for stalls gets one request at a time (a probe)
    while it has stalls in a row, unless no other node can take the request.
    """
    routes = snapshot.routes.get(model_id)
    if not routes:
        return None
    if len(routes) == 1:
        only = routes[0]
        return None if only.name in exclude else only
    best: NodeHandle | None = None
    best_free = 0
    probing: NodeHandle | None = None
    for handle in routes:
        if handle.name in exclude:
            continue
        if handle.stalls and handle.probes:  # its probe is under way
            if probing is None or handle.inflight < probing.inflight:
                probing = handle
            continue
        if best is None or handle.inflight < best.inflight:
            best, best_free = handle, snapshot.nodes[handle.name].free_mb
        elif handle.inflight == best.inflight:
            free = snapshot.nodes[handle.name].free_mb
            if free > best_free:
                best, best_free = handle, free
    return best if best is not None else probing


def plan_load(
    snapshot: Snapshot, model_id: str, policy: Policy, *, exclude: frozenset[str] = NO_NODES
) -> LoadPlan | Unplaceable:
    """Where to load ``model_id``, which is not loaded on any usable node.

    A node already loading it wins; otherwise the node needing the fewest
    evictions (then the fewest drain waits, then the most VRAM left over,
    then config order).
    """
    best: tuple[tuple[int, int, int], LoadPlan] | None = None
    problems: list[str] = []
    transient = False
    for view in snapshot.nodes.values():
        if model_id not in view.models or view.name in exclude:
            continue
        found = _plan_on(view, model_id, policy)
        if isinstance(found, Unplaceable):
            problems.append(found.reason)
            transient = transient or found.transient
            continue
        cost = _cost(view, found, policy.sizes)
        if best is None or cost < best[0]:
            best = (cost, found)
    if best is not None:
        return best[1]
    if not problems:
        return Unplaceable(model_id, _nowhere(snapshot, model_id, exclude), transient=False)
    return Unplaceable(model_id, f"{model_id} cannot be loaded: {'; '.join(problems)}", transient)


def plan_room(
    view: NodeView, model_id: str, policy: Policy, *, spare: Iterable[str] = ()
) -> tuple[Eviction, ...] | Unplaceable:
    """What to evict from ``view``'s node so that ``model_id`` fits there.

    Never a pinned model, one that is not plainly loaded (loading, being
    evicted) or one in ``spare`` (e.g. it would not drain in time). Busy
    models may be chosen, marked ``drain``. Takes candidates in eviction
    order until the model fits, then puts back any the last one made
    unnecessary, so no more models are evicted than needed.
    """
    sizes = policy.sizes
    size = sizes.get(model_id, 0)
    if not size or not view.vram_mb:
        return ()
    used = _resident_mb(view, model_id, sizes)
    need = size - (view.vram_mb - used)
    if need <= 0:
        return ()
    chosen: list[Eviction] = []
    freed = 0
    for ev in _candidates(view, model_id, policy, spare):
        if ev.size_mb:
            chosen.append(ev)
            freed += ev.size_mb
            if freed >= need:
                break
    if freed < need:
        return _no_room(view, model_id, size, used, freed, sizes)
    for ev in list(chosen[:-1]):
        if freed - ev.size_mb >= need:
            chosen.remove(ev)
            freed -= ev.size_mb
    return tuple(chosen)


def next_eviction(
    view: NodeView, model_id: str, policy: Policy, *, spare: Iterable[str] = ()
) -> Eviction | None:
    """The next model to evict after loading ``model_id`` ran out of memory anyway.

    Sizes are not trusted here (the node just proved them wrong), so models of
    unknown size count too. ``None`` when nothing is left to evict.
    """
    found = _candidates(view, model_id, policy, spare)
    return found[0] if found else None


def defrag_due(view: NodeView, after_cycles: int) -> bool:
    """Whether ``view``'s node has cycled enough models to want a fresh process.

    Only an up node with no load or eviction under way (0 disables).
    """
    return (
        after_cycles > 0
        and view.cycles >= after_cycles
        and view.state is NodeState.UP
        and not any(s in CORTEX_OWNED for s in view.models.values())
    )


def merge_models(
    ours: Mapping[str, ModelState], reported: Mapping[str, ModelState]
) -> dict[str, ModelState]:
    """A node's catalogue after a poll: the node's word, except where cortex is acting.

    A load or an eviction cortex has under way keeps its state until it ends;
    a model the node no longer lists is gone (the node restarted with another list).
    """
    out = {}
    for model, state in reported.items():
        mine = ours.get(model)
        out[model] = mine if mine in CORTEX_OWNED else state
    return out


def after_poll(
    state: NodeState, ok: bool, failures: int, down_after: int, *, held: bool = False
) -> tuple[NodeState, int]:
    """A node's state and failed-polls-in-a-row count after one poll.

    Down after ``down_after`` failures in a row, up again after one good poll,
    unless it is ``held`` out for stalls (see :func:`after_stall`): then it stays
    down until a good poll after the hold. A draining or restarting node is in
    the hands of its restart, not the poll.
    """
    if ok:
        if state not in _POLL_OWNED:
            return state, 0
        return (NodeState.DOWN if held else NodeState.UP), 0
    failures += 1
    if state in _POLL_OWNED and failures >= down_after:
        return NodeState.DOWN, failures
    return state, failures


def after_stall(
    state: NodeState,
    stalls: int,
    held_at: float,
    sent: float,
    now: float,
    base_s: float,
    max_s: float = STALL_HOLD_MAX_S,
) -> tuple[int, float]:
    """A node's first-byte stalls in a row, and how long from ``now`` to hold it out
    of routing, after a request to it sent at ``sent`` got no first byte (0 s: the
    stall is not counted).

    ``base_s`` for the first stall, doubling with each one in a row, at most ``max_s``.
    A request sent before the latest hold began (``held_at``) is not counted: it is
    no new chance the node had since (the first-byte timeout is usually far longer
    than a hold, so such requests keep timing out after it); nor is one of a node
    in the hands of a restart.
    """
    if state not in _POLL_OWNED or sent <= held_at:
        return stalls, 0.0
    stalls += 1
    # the exponent is bounded: a node may stall for days, and 2.0**1024 overflows
    return stalls, min(base_s * 2.0 ** min(stalls - 1, 64), max_s)


_POLL_OWNED = frozenset({NodeState.UNKNOWN, NodeState.UP, NodeState.DOWN})


def _plan_on(view: NodeView, model_id: str, policy: Policy) -> LoadPlan | Unplaceable:
    if not view.state.routable:
        why = f" ({view.error})" if view.error else ""
        return Unplaceable(model_id, f"{view.name} is {view.state.value}{why}", transient=True)
    state = view.models[model_id]
    if state is ModelState.UNLOADING:
        return Unplaceable(
            model_id, f"{view.name} is unloading {model_id} right now", transient=True
        )
    if state is not ModelState.UNLOADED:  # loading, reloading or (just) loaded: wait for it
        return LoadPlan(view.name, model_id, (), reload=False)
    room = plan_room(view, model_id, policy)
    if isinstance(room, Unplaceable):
        return room
    return LoadPlan(view.name, model_id, room, reload=True)


def _cost(view: NodeView, plan: LoadPlan, sizes: Mapping[str, int]) -> tuple[int, int, int]:
    if not plan.reload:
        return (-1, 0, 0)
    freed = sum(ev.size_mb for ev in plan.evictions)
    left = view.vram_mb - _resident_mb(view, plan.model, sizes) + freed - sizes.get(plan.model, 0)
    drains = sum(ev.drain for ev in plan.evictions)
    return (len(plan.evictions), drains, -left if view.vram_mb else 0)


def _resident_mb(view: NodeView, model_id: str, sizes: Mapping[str, int]) -> int:
    return sum(
        sizes.get(m, 0) for m, state in view.models.items() if state.resident and m != model_id
    )


def _candidates(
    view: NodeView, model_id: str, policy: Policy, spare: Iterable[str]
) -> list[Eviction]:
    """Evictable models of ``view``'s node, the first to go first.

    A model with requests in flight is in use right now, so LRU ranks it as
    the most recent; never-used models are the oldest.
    """
    spared = set(spare)
    sizes, priorities, strategy = policy.sizes, policy.priorities, policy.strategy
    inflight = view.handle.model_inflight
    last_used = view.handle.last_used

    def rank(m: str) -> tuple[float, ...]:
        busy = inflight.get(m, 0) > 0
        age = last_used.get(m, -math.inf)
        if strategy == "priority":
            return (priorities.get(m, 0), busy, age)
        return (busy, age)

    evictable = [
        m
        for m, state in view.models.items()
        if state is ModelState.LOADED and m != model_id and m not in view.pinned and m not in spared
    ]
    evictable.sort(key=rank)
    return [Eviction(m, strategy, inflight.get(m, 0) > 0, sizes.get(m, 0)) for m in evictable]


def _no_room(
    view: NodeView, model_id: str, size: int, used: int, evictable: int, sizes: Mapping[str, int]
) -> Unplaceable:
    pinned = sum(
        sizes.get(m, 0)
        for m, state in view.models.items()
        if m in view.pinned and state.resident and m != model_id
    )
    if size > view.vram_mb:
        why = f"{model_id} needs {size} MB; {view.name} has {view.vram_mb} MB"
        return Unplaceable(model_id, why, transient=False)
    if size > view.vram_mb - pinned:
        why = (
            f"{model_id} needs {size} MB; {view.name} has {view.vram_mb} MB with {pinned} MB pinned"
        )
        return Unplaceable(model_id, why, transient=False)
    why = (
        f"{model_id} needs {size} MB; {view.name} has {view.vram_mb - used} MB free "
        f"and only {evictable} MB it may evict now"
    )
    return Unplaceable(model_id, why, transient=True)


def _nowhere(snapshot: Snapshot, model_id: str, exclude: frozenset[str]) -> str:
    skipped = [
        v.name for v in snapshot.nodes.values() if v.name in exclude and model_id in v.models
    ]
    if skipped:
        return f"{model_id} is served only by {', '.join(skipped)}, which just failed"
    return f"{model_id} is not served by any node"
