"""cortex.metrics: exact values read back from real scrapes (rendered and over HTTP)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import aiohttp
import pytest
from aioprometheus.collectors import Histogram, Registry
from aioprometheus.renderer import render

from cortex import fleet
from cortex.config import Node
from cortex.fleet import ModelState, NodeHandle, NodeState, NodeView, Snapshot
from cortex.metrics import LOAD_BUCKETS, Metrics, RequestRecord, Sample, parse

DASHBOARD = Path(__file__).parent.parent / "deploy" / "grafana" / "cortex-dashboard.json"
MIB = 1024 * 1024


def rec(**kw: object) -> RequestRecord:
    """A finished streamed chat request on m1@a, overridable field by field.

    Times are exact binary fractions so sums compare exactly: 0.25 s of cortex
    overhead + queue, first token 1 s after arrival, 2 s of generation.
    """
    fields: dict[str, object] = {
        "request_id": "req-1",
        "client": "10.0.0.9",
        "model": "m1",
        "node": "a",
        "endpoint": "chat",
        "status": 200,
        "stream": True,
        "started": 100.0,
        "ended": 103.0,
        "upstream_sent": 100.25,
        "first_byte": 100.5,
        "first_token": 101.0,
        "queue_wait_s": 0.125,
        "prompt_tokens": 10,
        "completion_tokens": 100,
    }
    fields.update(kw)
    return RequestRecord(**fields)  # type: ignore[arg-type]


def view(handle: NodeHandle, models: dict[str, ModelState], **kw: object) -> NodeView:
    args: dict[str, object] = {"state": NodeState.UP, "vram_mb": 24000, "pinned": frozenset()}
    args.update(kw)
    return NodeView(handle=handle, models=models, **args)  # type: ignore[arg-type]


def snapshot(*views: NodeView) -> Snapshot:
    return Snapshot(
        version=1,
        nodes={v.name: v for v in views},
        routes={},
        names={},
        model_map={},
        models_body=b"",
    )


def handle(name: str) -> NodeHandle:
    return NodeHandle.from_config(Node(name=name, endpoint=f"http://{name}:8080"))


def series(samples: list[Sample], name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {tuple(sorted(s.labels.items())): s.value for s in samples if s.name == name}


def test_request_counters_and_histograms() -> None:
    m = Metrics()
    m.record(rec())
    m.record(rec(request_id="req-2", estimated=True, completion_tokens=50))
    m.record(
        rec(
            request_id="req-3",
            status=502,
            error="UpstreamError",
            first_token=0.0,
            completion_tokens=None,
        )
    )
    samples = parse(m.render(None)[0])

    assert series(samples, "cortex_requests_total") == {
        (("code", "2xx"), ("endpoint", "chat"), ("model", "m1"), ("node", "a")): 2,
        (("code", "5xx"), ("endpoint", "chat"), ("model", "m1"), ("node", "a")): 1,
    }
    assert series(samples, "cortex_request_errors_total") == {
        (("endpoint", "chat"), ("error", "UpstreamError"), ("model", "m1"), ("node", "a")): 1
    }
    assert m.sample("cortex_request_duration_seconds_count", model="m1") == 3
    assert m.sample("cortex_request_duration_seconds_sum", model="m1") == 9.0
    assert m.sample("cortex_request_duration_seconds_bucket", le="2.5") == 0
    assert m.sample("cortex_request_duration_seconds_bucket", le=5) == 3
    # TTFT only for the two requests that produced a token.
    assert m.sample("cortex_time_to_first_token_seconds_count", model="m1", node="a") == 2
    assert m.sample("cortex_time_to_first_token_seconds_sum") == 2.0
    assert m.sample("cortex_time_to_first_token_seconds_bucket", le="0.5") == 0
    assert m.sample("cortex_time_to_first_token_seconds_bucket", le="1.0") == 2
    assert m.sample("cortex_node_time_to_first_token_seconds_sum") == 2 * 0.75
    # 100 and 50 tokens over 2 s: 50 and 25 tok/s.
    assert m.sample("cortex_tokens_per_second_sum", model="m1") == 75.0
    assert m.sample("cortex_tokens_per_second_bucket", le=20) == 0
    assert m.sample("cortex_tokens_per_second_bucket", le=30) == 1
    assert m.sample("cortex_tokens_per_second_bucket", le="+Inf") == 2
    assert m.sample("cortex_prompt_tokens_total", model="m1", node="a") == 30
    assert m.sample("cortex_completion_tokens_total", estimated="false") == 100
    assert m.sample("cortex_completion_tokens_total", estimated="true") == 50
    # Overhead: 0.25 s before upstream minus 0.125 s queued, for all three.
    assert m.sample("cortex_overhead_seconds_count") == 3
    assert m.sample("cortex_overhead_seconds_sum") == 3 * 0.125
    assert m.sample("cortex_queue_wait_seconds_sum", model="m1") == 3 * 0.125
    # Nobody waited for a load: that histogram has no series at all.
    assert series(samples, "cortex_model_load_wait_seconds_count") == {}


def test_request_edge_cases() -> None:
    m = Metrics()
    # Refused before routing: no model, no node, never sent upstream.
    m.record(
        rec(
            model="",
            node="",
            endpoint="other",
            status=404,
            upstream_sent=0.0,
            first_token=0.0,
            queue_wait_s=0.0,
            prompt_tokens=None,
            completion_tokens=None,
        )
    )
    # Disconnected client, unknown status; the clock rounding a wait past the send time.
    m.record(rec(status=0, load_wait_s=0.375, queue_wait_s=0.0, ended=101.0, completion_tokens=0))
    assert m.sample("cortex_requests_total", model="", node="", code="4xx") == 1
    assert m.sample("cortex_requests_total", code="other") == 1
    assert m.sample("cortex_overhead_seconds_count") == 1
    assert m.sample("cortex_overhead_seconds_sum") == 0.0  # clamped, not negative
    assert m.sample("cortex_model_load_wait_seconds_sum", model="m1") == 0.375
    assert m.sample("cortex_tokens_per_second_count") == 0  # no tokens, no rate
    assert m.sample("cortex_time_to_first_token_seconds_count") == 1


def test_histograms_render_as_aioprometheus_observes() -> None:
    """Buckets counted apart and folded in at a scrape read as aioprometheus' own
    ``observe`` would have them (bounds inclusive, cumulative, +Inf, sum, count), and
    every scrape sees all that came before it."""
    m = Metrics()
    registry = Registry()
    name = "cortex_model_load_duration_seconds"
    reference = Histogram(name, "", registry=registry, buckets=LOAD_BUCKETS)
    for seconds in ([20, 0.5, 0.0, 0.75, 600.0], [600.5, 1e9, 20.0, 19.999, 45, 0.25]):
        for s in seconds:
            m.model_load("a", "m1", "ok", s)
            reference.observe({"node": "a", "model": "m1"}, s)
        ours = [x for x in parse(m.render(None)[0]) if x.name.startswith(name)]
        assert ours == parse(render(registry, [])[0])


def test_fleet_events_and_gauges() -> None:
    m = Metrics()
    a, b = handle("a"), handle("b")
    m.set_model_sizes({"m1": 8000, "m2": 12000, "m3": 30000})
    m.fleet_changed(
        snapshot(
            view(a, {"m1": ModelState.LOADED, "m2": ModelState.LOADING, "m3": ModelState.UNLOADED}),
            view(b, {"m1": ModelState.UNLOADED}, state=NodeState.DOWN, vram_mb=0),
        )
    )
    m.model_load("a", "m2", "ok", 12.0)
    m.model_load("a", "m2", "failed", 3.0)
    m.model_evicted("a", "m3", "lru")
    m.node_restart("b")
    m.node_restart("b")
    m.queued("m1", 3)
    m.queued("m1", -1)

    assert m.sample("cortex_model_loads_total", node="a", model="m2", result="ok") == 1
    assert m.sample("cortex_model_loads_total", result="failed") == 1
    assert m.sample("cortex_model_load_duration_seconds_count", node="a", model="m2") == 2
    assert m.sample("cortex_model_load_duration_seconds_sum") == 15.0
    assert m.sample("cortex_model_load_duration_seconds_bucket", le=5) == 1
    assert m.sample("cortex_model_evictions_total", node="a", model="m3", reason="lru") == 1
    assert m.sample("cortex_node_restarts_total", node="b") == 2
    assert m.sample("cortex_queued_requests", model="m1") == 2
    assert m.sample("cortex_node_up", node="a") == 1
    assert m.sample("cortex_node_up", node="b") == 0
    assert m.sample("cortex_node_vram_used_bytes", node="a") == (8000 + 12000) * MIB
    assert m.sample("cortex_node_vram_used_bytes", node="b") == 0
    assert m.sample("cortex_node_vram_total_bytes", node="a") == 24000 * MIB
    samples = parse(m.render(None)[0])
    assert series(samples, "cortex_node_vram_total_bytes") == {(("node", "a"),): 24000 * MIB}
    assert series(samples, "cortex_model_loaded") == {
        (("model", "m1"), ("node", "a")): 1,
        (("model", "m2"), ("node", "a")): 0,
        (("model", "m3"), ("node", "a")): 0,
        (("model", "m1"), ("node", "b")): 0,
    }

    # A node leaving the fleet takes its gauges with it.
    m.fleet_changed(snapshot(view(a, {"m1": ModelState.LOADED})))
    samples = parse(m.render(None)[0])
    assert set(series(samples, "cortex_node_up")) == {(("node", "a"),)}
    assert set(series(samples, "cortex_model_loaded")) == {(("model", "m1"), ("node", "a"))}
    assert m.sample("cortex_node_restarts_total", node="b") == 2  # counters stay


def test_inflight_is_read_from_handles_at_scrape_time() -> None:
    m = Metrics()
    a, b = handle("a"), handle("b")
    m.fleet_changed(snapshot(view(a, {}), view(b, {})))
    assert m.sample("cortex_inflight_requests", node="a") == 0
    fleet.begin(a, "m1")
    fleet.begin(a, "m2")
    fleet.begin(b, "m1")
    assert m.sample("cortex_inflight_requests", node="a") == 2
    assert m.sample("cortex_inflight_requests", node="b") == 1
    fleet.end(a, "m1")
    assert m.sample("cortex_inflight_requests", node="a") == 1


def test_labels_stay_low_cardinality() -> None:
    m = Metrics()
    m.record(rec())
    before = len(parse(m.render(None)[0]))
    for i in range(50):
        m.record(rec(request_id=f"req-unique-{i}", client=f"10.1.0.{i}", status=200 + i % 3))
    body = m.render(None)[0].decode()
    samples = parse(body)
    assert len(samples) == before
    assert "req-unique" not in body
    assert "10.1.0." not in body
    allowed = {"model", "node", "endpoint", "code", "error", "estimated", "le", "result", "reason"}
    assert {k for s in samples for k in s.labels} <= allowed


def test_label_values_are_escaped() -> None:
    m = Metrics()
    odd = 'we"ird\\model\nx'
    m.record(rec(model=odd))
    body = m.render(None)[0]
    assert b'model="we\\"ird\\\\model\\nx"' in body
    assert m.sample("cortex_requests_total", model=odd) == 1


def test_sample_helper() -> None:
    m = Metrics()
    with pytest.raises(KeyError):
        m.sample("cortex_no_such_metric")
    assert m.sample("cortex_requests_total") == 0.0  # a known metric, no series yet
    m.record(rec())
    assert m.sample("cortex_requests_total") == 1
    assert m.sample("cortex_requests_total", model="m2") == 0
    assert m.sample("cortex_request_duration_seconds_bucket", le=5) == 1
    assert m.sample("cortex_request_duration_seconds_bucket", le="5.0") == 1


def test_render_content_type() -> None:
    body, content_type = Metrics().render("application/openmetrics-text; version=1.0.0")
    assert content_type == "text/plain; version=0.0.4; charset=utf-8"
    assert b"# TYPE cortex_requests_total counter" in body


async def test_metrics_port_serves_only_metrics() -> None:
    m = Metrics()
    m.record(rec())
    await m.start("127.0.0.1", 0)
    try:
        base = f"http://127.0.0.1:{m.bound_port}"
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{base}/metrics") as resp:
                assert resp.status == 200
                assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
                samples = parse(await resp.read())
            assert series(samples, "cortex_requests_total") == {
                (("code", "2xx"), ("endpoint", "chat"), ("model", "m1"), ("node", "a")): 1
            }
            assert series(samples, "cortex_time_to_first_token_seconds_sum") == {
                (("model", "m1"), ("node", "a")): 1.0
            }
            async with session.head(f"{base}/metrics") as resp:
                assert resp.status == 200
            for method, path in [
                ("GET", "/"),
                ("GET", "/metrics/"),
                ("GET", "/v1/models"),
                ("POST", "/metrics"),
                ("DELETE", "/metrics"),
            ]:
                async with session.request(method, base + path) as resp:
                    assert resp.status == 404, (method, path)
    finally:
        await m.stop()
    await m.stop()  # idempotent


async def test_start_twice_is_refused() -> None:
    m = Metrics()
    await m.start("127.0.0.1", 0)
    try:
        with pytest.raises(RuntimeError):
            await m.start("127.0.0.1", 0)
    finally:
        await m.stop()


def busy_metrics() -> Metrics:
    """Every series family populated, as after some real traffic."""
    m = Metrics()
    a = handle("a")
    m.set_model_sizes({"m1": 8000})
    m.fleet_changed(snapshot(view(a, {"m1": ModelState.LOADED, "m2": ModelState.UNLOADED})))
    fleet.begin(a, "m1")
    m.record(rec())
    m.record(rec(load_wait_s=0.0625, estimated=True))
    m.record(rec(status=500, error="NodeError", first_token=0.0))
    m.model_load("a", "m1", "ok", 20.0)
    m.model_evicted("a", "m2", "lru")
    m.node_restart("a")
    m.queued("m1", 1)
    return m


@pytest.mark.external
def test_promtool_accepts_the_scrape() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian/Ubuntu package: prometheus)")
    m = busy_metrics()
    m.record(rec(model='odd "model" \\ name\n'))
    body, _ = m.render(None)
    done = subprocess.run(
        [promtool, "check", "metrics"], input=body, capture_output=True, timeout=30, check=False
    )
    assert done.returncode == 0, done.stdout.decode() + done.stderr.decode()


# --- the Grafana dashboard ------------------------------------------------------

_METRIC = re.compile(r"\bcortex_[a-zA-Z0-9_:]+")


def dashboard_queries() -> list[str]:
    """Every PromQL expression in the dashboard: panel targets and variable queries."""
    found: list[str] = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("expr", "definition") and isinstance(value, str):
                    found.append(value)
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(json.loads(DASHBOARD.read_text()))
    return found


def test_dashboard_metrics_exist() -> None:
    queries = dashboard_queries()
    assert len(queries) > 20
    scraped = {s.name for s in parse(busy_metrics().render(None)[0])}
    for query in queries:
        names = set(_METRIC.findall(query))
        assert names, f"no cortex metric in {query!r}"
        assert names <= scraped, f"{query!r} uses {sorted(names - scraped)}"


def test_dashboard_imports_cleanly() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert [i["name"] for i in dash["__inputs"]] == ["DS_PROMETHEUS"]
    assert dash["schemaVersion"] >= 39
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dash["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]


@pytest.mark.external
def test_dashboard_queries_parse(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian/Ubuntu package: prometheus)")
    rules = []
    for i, query in enumerate(q for q in dashboard_queries() if not q.startswith("label_values")):
        expr = (
            query.replace("$__rate_interval", "5m").replace("$model", ".*").replace("$node", ".*")
        )
        rules.append({"record": f"cortex:dashboard_{i}", "expr": expr})
    path = tmp_path / "rules.yml"
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))  # JSON is YAML
    done = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, timeout=30, check=False
    )
    assert done.returncode == 0, done.stdout.decode() + done.stderr.decode()
