"""Placement policy, synchronously: no event loop, no I/O."""

from __future__ import annotations

from collections.abc import Mapping

import pytest

from cortex.config import Node
from cortex.fleet import (
    ModelState,
    NodeHandle,
    NodeState,
    NodeView,
    Snapshot,
    begin,
    build_snapshot,
)
from cortex.placement import (
    STALL_HOLD_MAX_S,
    Eviction,
    LoadPlan,
    Policy,
    Strategy,
    Unplaceable,
    after_poll,
    after_stall,
    choose_loaded,
    defrag_due,
    merge_models,
    next_eviction,
    plan_load,
    plan_room,
)

L, U, R = ModelState.LOADED, ModelState.UNLOADED, ModelState.RELOADING
UP, DOWN, UNKNOWN = NodeState.UP, NodeState.DOWN, NodeState.UNKNOWN
SIZES = {"big": 20000, "mid": 10000, "small": 4000, "tiny": 2000, "new": 8000}
LRU = Policy(SIZES, {}, "lru")


def node(
    name: str,
    models: Mapping[str, ModelState],
    *,
    vram: int = 24000,
    pinned: frozenset[str] = frozenset(),
    state: NodeState = NodeState.UP,
    used: Mapping[str, float] | None = None,
    busy: Mapping[str, int] | None = None,
    sizes: Mapping[str, int] = SIZES,
) -> NodeView:
    handle = NodeHandle.from_config(Node(name=name, endpoint=f"http://{name}:8080", vram_mb=vram))
    handle.last_used.update(used or {})
    for model, n in (busy or {}).items():
        for _ in range(n):
            begin(handle, model)
    used_mb = sum(sizes.get(m, 0) for m, s in models.items() if s.resident)
    return NodeView(handle, state, vram, dict(models), pinned, used_mb=used_mb)


def fleet(*views: NodeView) -> Snapshot:
    return build_snapshot(1, {v.name: v for v in views})


def plan(
    snap: Snapshot,
    model: str,
    *,
    priorities: Mapping[str, int] | None = None,
    strategy: Strategy = "lru",
    exclude: frozenset[str] = frozenset(),
) -> LoadPlan | Unplaceable:
    return plan_load(snap, model, Policy(SIZES, priorities or {}, strategy), exclude=exclude)


# --- choose_loaded -----------------------------------------------------------


def test_routes_to_the_node_where_the_model_is_loaded() -> None:
    a = node("a", {"small": L})
    b = node("b", {"small": U, "tiny": L})
    snap = fleet(a, b)
    assert choose_loaded(snap, "small") is a.handle
    assert choose_loaded(snap, "tiny") is b.handle
    assert choose_loaded(snap, "unknown") is None


def test_least_inflight_wins_then_most_free_vram() -> None:
    a = node("a", {"small": L, "mid": L}, busy={"small": 2})
    b = node("b", {"small": L, "big": L}, busy={"small": 1})
    c = node("c", {"small": L}, busy={"small": 1})
    snap = fleet(a, b, c)
    assert choose_loaded(snap, "small") is c.handle  # b and c tie on 1; c has 20000 MB free
    begin(c.handle, "small")
    assert choose_loaded(snap, "small") is b.handle


def test_excluded_nodes_are_not_chosen() -> None:
    a = node("a", {"small": L})
    b = node("b", {"small": L}, busy={"small": 5})
    snap = fleet(a, b)
    assert choose_loaded(snap, "small", frozenset({"a"})) is b.handle
    assert choose_loaded(snap, "small", frozenset({"a", "b"})) is None
    assert choose_loaded(fleet(a), "small", frozenset({"a"})) is None


def test_a_node_back_from_a_stall_hold_gets_one_probe_at_a_time() -> None:
    a = node("a", {"small": L})
    b = node("b", {"small": L}, busy={"small": 3})
    snap = fleet(a, b)
    a.handle.stalls = 2  # back from a hold-out
    assert choose_loaded(snap, "small") is a.handle  # the probe
    a.handle.probes = 1
    begin(a.handle, "small")
    assert choose_loaded(snap, "small") is b.handle  # while the probe is under way
    # no other node can take it: the node on probation serves (nothing waits in vain)
    assert choose_loaded(snap, "small", frozenset({"b"})) is a.handle
    b.handle.stalls, b.handle.probes = 1, 1
    assert choose_loaded(snap, "small") is a.handle  # both probing: the less busy one
    for _ in range(4):
        begin(a.handle, "small")
    assert choose_loaded(snap, "small") is b.handle  # (5 in flight on a, 3 on b)
    a.handle.stalls = 0  # the probe got its first byte; its stream may still run
    assert choose_loaded(snap, "small") is a.handle


def test_down_nodes_and_unloading_models_get_no_requests() -> None:
    a = node("a", {"small": L}, state=NodeState.DOWN)
    b = node("b", {"small": ModelState.UNLOADING})
    c = node("c", {"small": L}, state=NodeState.DRAINING)
    snap = fleet(a, b, c)
    assert choose_loaded(snap, "small") is None
    assert snap.routes["small"] == ()


# --- plan_load: fits or not --------------------------------------------------


def test_loads_without_eviction_where_it_fits() -> None:
    a = node("a", {"new": U, "big": L})  # 4000 free: 8000 does not fit
    b = node("b", {"new": U, "mid": L})  # 14000 free
    assert plan(fleet(a, b), "new") == LoadPlan("b", "new", (), reload=True)


def test_prefers_fewest_evictions_then_most_room_left() -> None:
    a = node("a", {"new": U, "small": L, "tiny": L}, vram=12000)  # 6000 free
    b = node("b", {"new": U, "mid": L}, vram=16000)  # 6000 free
    c = node("c", {"new": U, "small": L}, vram=16000)  # 12000 free
    assert plan(fleet(a, b, c), "new") == LoadPlan("c", "new", (), reload=True)
    # nowhere fits as it is: a needs one eviction (small), b one (mid) but ends with more room
    c2 = node("c", {"new": U, "mid": L, "small": L}, vram=16000)
    found = plan(fleet(a, b, c2), "new")
    assert isinstance(found, LoadPlan)
    assert found.node == "b"
    assert [e.model for e in found.evictions] == ["mid"]


def test_unknown_sizes_and_unknown_vram_are_assumed_to_fit() -> None:
    a = node("a", {"mystery": U, "big": L}, vram=20000)
    assert plan(fleet(a), "mystery") == LoadPlan("a", "mystery", (), reload=True)
    b = node("b", {"new": U, "big": L, "mid": L}, vram=0)
    assert plan(fleet(b), "new") == LoadPlan("b", "new", (), reload=True)


def test_waits_for_a_load_under_way_instead_of_reloading() -> None:
    a = node("a", {"new": ModelState.RELOADING})
    b = node("b", {"new": U})
    assert plan(fleet(a, b), "new") == LoadPlan("a", "new", (), reload=False)
    c = node("c", {"new": ModelState.LOADING})
    assert plan(fleet(b, c), "new") == LoadPlan("c", "new", (), reload=False)


def test_excluded_nodes_are_not_planned() -> None:
    a = node("a", {"new": U})
    b = node("b", {"new": U, "big": L})
    found = plan(fleet(a, b), "new", exclude=frozenset({"a"}))
    assert isinstance(found, LoadPlan)
    assert found.node == "b"
    gone = plan(fleet(a), "new", exclude=frozenset({"a"}))
    assert gone == Unplaceable("new", "new is served only by a, which just failed", False)


# --- evictions ---------------------------------------------------------------


def test_lru_evicts_the_least_recently_used_never_used_first() -> None:
    models = {"new": U, "small": L, "tiny": L, "mid": L}  # 16000 of 22000 used: 2000 short
    a = node("a", models, vram=22000, used={"small": 5.0, "mid": 9.0, "tiny": 7.0})
    found = plan(fleet(a), "new")
    assert isinstance(found, LoadPlan)
    assert [e.model for e in found.evictions] == ["small"]  # the oldest, and enough
    never = node("a", models, vram=22000, used={"small": 5.0, "mid": 9.0})
    found = plan(fleet(never), "new")
    assert isinstance(found, LoadPlan)
    assert [e.model for e in found.evictions] == ["tiny"]  # never used: the oldest of all


def test_evicts_no_more_than_needed() -> None:
    # tiny (oldest) alone frees too little; mid alone is enough: tiny is put back
    models = {"new": U, "tiny": L, "mid": L, "small": L}  # 16000 of 20000 used: 4000 short
    a = node("a", models, vram=20000, used={"tiny": 1, "mid": 2, "small": 3})
    found = plan(fleet(a), "new")
    assert isinstance(found, LoadPlan)
    assert [e.model for e in found.evictions] == ["mid"]


def test_never_evicts_pinned_models() -> None:
    a = node(
        "a",
        {"new": U, "small": L, "mid": L, "tiny": L},
        vram=20000,
        pinned=frozenset({"small"}),
        used={"small": 1, "mid": 2, "tiny": 3},
    )
    found = plan(fleet(a), "new")
    assert isinstance(found, LoadPlan)
    assert [e.model for e in found.evictions] == ["mid"]


def test_busy_models_go_last_and_are_marked_for_draining() -> None:
    a = node(
        "a",
        {"new": U, "small": L, "tiny": L, "mid": L},
        vram=22000,
        used={"small": 1, "tiny": 2, "mid": 3},
        busy={"small": 1},
    )
    found = plan(fleet(a), "new")
    assert isinstance(found, LoadPlan)
    assert [(e.model, e.drain) for e in found.evictions] == [("tiny", False)]
    only_busy = node("a", {"new": U, "mid": L}, vram=16000, busy={"mid": 2})
    found = plan(fleet(only_busy), "new")
    assert isinstance(found, LoadPlan)
    assert found.evictions == (Eviction("mid", "lru", drain=True, size_mb=10000),)


def test_priority_strategy_evicts_lowest_priority_then_lru() -> None:
    models = {"new": U, "small": L, "tiny": L, "mid": L}
    a = node("a", models, vram=20000, used={"small": 1, "tiny": 2, "mid": 3})
    prio = {"small": 5, "tiny": 1, "mid": 1}
    found = plan(fleet(a), "new", priorities=prio, strategy="priority")
    assert isinstance(found, LoadPlan)
    # tiny and mid share the lowest priority; tiny is older but mid alone is enough
    assert [(e.model, e.reason) for e in found.evictions] == [("mid", "priority")]
    found = plan(fleet(a), "new", priorities={"small": 0, "tiny": 3, "mid": 3}, strategy="priority")
    assert isinstance(found, LoadPlan)
    assert [e.model for e in found.evictions] == ["small"]  # lru alone would also take small
    found = plan(fleet(a), "new", priorities={"small": 9, "tiny": 9, "mid": 0}, strategy="priority")
    assert isinstance(found, LoadPlan)
    assert [e.model for e in found.evictions] == ["mid"]  # the most recent, but the least important


def test_models_being_loaded_or_evicted_are_not_evicted() -> None:
    a = node("a", {"new": U, "mid": ModelState.LOADING, "small": ModelState.UNLOADING}, vram=20000)
    found = plan(fleet(a), "new")
    assert isinstance(found, Unplaceable)
    assert found.transient
    assert "6000 MB free and only 0 MB it may evict now" in found.reason


# --- reasons -----------------------------------------------------------------


def test_too_big_for_every_node_says_so() -> None:
    a = node("gpu-small", {"big": U}, vram=12288)
    found = plan(fleet(a), "big")
    assert found == Unplaceable(
        "big", "big cannot be loaded: big needs 20000 MB; gpu-small has 12288 MB", False
    )


def test_pinned_models_in_the_way_say_so() -> None:
    a = node("gpu-small", {"mid": U, "new": L}, vram=12288, pinned=frozenset({"new"}))
    found = plan(fleet(a), "mid")
    assert isinstance(found, Unplaceable)
    assert not found.transient
    assert "mid needs 10000 MB; gpu-small has 12288 MB with 8000 MB pinned" in found.reason


def test_down_nodes_are_a_transient_reason() -> None:
    a = node("a", {"new": U}, state=NodeState.DOWN)
    b = node("b", {"new": U}, state=NodeState.RESTARTING)
    found = plan(fleet(a, b), "new")
    assert found == Unplaceable("new", "new cannot be loaded: a is down; b is restarting", True)
    assert plan(fleet(a), "ghost") == Unplaceable("ghost", "ghost is not served by any node", False)


def test_unloading_target_is_a_transient_reason() -> None:
    a = node("a", {"new": ModelState.UNLOADING})
    found = plan(fleet(a), "new")
    assert isinstance(found, Unplaceable)
    assert found.transient


# --- plan_room / next_eviction ----------------------------------------------


def test_plan_room_spares_models_that_would_not_drain() -> None:
    a = node("a", {"new": L, "small": L, "mid": L}, vram=16000, used={"small": 1, "mid": 2})
    # the model being loaded is resident, but does not count against itself
    room = plan_room(a, "new", LRU)
    assert isinstance(room, tuple)
    assert [e.model for e in room] == ["mid"]
    spared = plan_room(a, "new", LRU, spare={"mid"})
    assert isinstance(spared, Unplaceable)


def test_next_eviction_ignores_sizes() -> None:
    a = node("a", {"new": U, "x": L, "y": L, "small": L}, used={"x": 5, "y": 1, "small": 9})

    def nxt(*spare: str) -> Eviction | None:
        return next_eviction(a, "new", LRU, spare=spare)

    assert nxt() == Eviction("y", "lru", drain=False, size_mb=0)
    assert nxt("y", "x") == Eviction("small", "lru", drain=False, size_mb=4000)
    assert nxt("y", "x", "small") is None


@pytest.mark.parametrize(
    ("cycles", "state", "models", "due"),
    [
        (5, NodeState.UP, {"a": L}, True),
        (4, NodeState.UP, {"a": L}, False),
        (5, NodeState.DOWN, {"a": L}, False),
        (5, NodeState.UP, {"a": ModelState.LOADING}, False),
        (5, NodeState.UP, {"a": ModelState.UNLOADING}, False),
    ],
)
def test_defrag_due(
    cycles: int, state: NodeState, models: dict[str, ModelState], due: bool
) -> None:
    view = node("n", models, state=state)
    view = NodeView(view.handle, state, 0, models, frozenset(), cycles=cycles)
    assert defrag_due(view, 5) is due
    assert defrag_due(view, 0) is False


# --- reconciling polls ------------------------------------------------------


def test_merge_keeps_what_cortex_is_doing_and_drops_what_the_node_dropped() -> None:
    ours = {"a": ModelState.LOADING, "b": ModelState.UNLOADING, "c": L, "gone": L}
    reported = {"a": R, "b": L, "c": U, "new": U}
    assert merge_models(ours, reported) == {
        "a": ModelState.LOADING,
        "b": ModelState.UNLOADING,
        "c": U,
        "new": U,
    }


def test_down_after_n_failures_up_after_one_success() -> None:
    state, failures = UP, 0
    state, failures = after_poll(state, False, failures, 3)
    state, failures = after_poll(state, False, failures, 3)
    assert (state, failures) == (UP, 2)
    state, failures = after_poll(state, False, failures, 3)
    assert (state, failures) == (DOWN, 3)
    assert after_poll(state, True, failures, 3) == (UP, 0)
    assert after_poll(UNKNOWN, False, 0, 1) == (DOWN, 1)
    # a restart in progress owns the node's state
    assert after_poll(NodeState.DRAINING, True, 0, 1) == (NodeState.DRAINING, 0)
    assert after_poll(NodeState.DRAINING, False, 5, 1) == (NodeState.DRAINING, 6)


# --- holding stalled nodes out ----------------------------------------------


def test_a_stall_holds_the_node_out_doubling_with_each_in_a_row_up_to_the_cap() -> None:
    stalls, held_at, sent = 0, 0.0, 100.0
    holds = []
    for _ in range(9):
        now = sent + 600  # no first byte for the request sent at `sent`
        stalls, hold = after_stall(UP, stalls, held_at, sent, now, 5.0)
        holds.append(hold)
        held_at = now
        sent = now + hold + 1.0  # the next request, once the node is back
    assert holds == [5, 10, 20, 40, 80, 160, 300, 300, 300]
    assert stalls == 9
    assert STALL_HOLD_MAX_S == 300
    assert after_stall(UP, 0, 0.0, 5.0, 10.0, 1.0, max_s=3.0) == (1, 1.0)
    assert after_stall(UP, 2, 0.0, 5.0, 10.0, 1.0, max_s=3.0) == (3, 3.0)


def test_a_stall_of_a_request_sent_before_the_latest_hold_is_not_counted() -> None:
    # held at 50 s: requests sent before keep timing out, during the hold and after it
    for now in (50.1, 56.0, 650.0):
        assert after_stall(DOWN, 3, 50.0, 49.9, now, 5.0) == (3, 0.0)
        assert after_stall(UP, 3, 50.0, 50.0, now, 5.0) == (3, 0.0)
    # one sent after it (the node came back) is a new stall
    assert after_stall(UP, 3, 50.0, 90.0, 690.0, 5.0) == (4, 40.0)
    # a node down for failed polls may stall too (a request sent before it went down)
    assert after_stall(DOWN, 0, 0.0, 10.0, 20.0, 5.0) == (1, 5.0)
    assert after_stall(UNKNOWN, 0, 0.0, 10.0, 20.0, 5.0) == (1, 5.0)
    # a restart in progress owns the node
    for state in (NodeState.DRAINING, NodeState.RESTARTING):
        assert after_stall(state, 2, 0.0, 10.0, 20.0, 5.0) == (2, 0.0)


def test_a_node_that_stalls_for_days_stays_at_the_cap() -> None:
    assert after_stall(UP, 5000, 0.0, 1e6, 2e6, 5.0) == (5001, STALL_HOLD_MAX_S)


def test_a_held_node_stays_down_through_good_polls() -> None:
    assert after_poll(DOWN, True, 0, 2, held=True) == (DOWN, 0)
    assert after_poll(UP, True, 0, 2, held=True) == (DOWN, 0)
    assert after_poll(DOWN, False, 0, 2, held=True) == (DOWN, 1)
    assert after_poll(DOWN, True, 3, 2, held=False) == (UP, 0)  # the hold is over
    # a restart in progress still owns the node's state
    assert after_poll(NodeState.RESTARTING, True, 0, 2, held=True) == (NodeState.RESTARTING, 0)
