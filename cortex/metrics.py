"""Prometheus metrics: one record per request, the fleet's events, the scrape port.

The proxy hands :meth:`Metrics.record` one :class:`RequestRecord` when a
request ends (a stream counts its tokens in local ints and reports once, at
its end). The supervisor reports through the :class:`~cortex.fleet.FleetEvents`
methods. Gauges that describe the fleet (node up, in-flight, VRAM, loaded
models) are computed at scrape time from the last snapshot, so the request
path never touches them.

Series (base units: seconds, bytes; ``code`` is the status class, "2xx"):

=========================================  ==========  ============================
cortex_requests_total                      counter     model, node, endpoint, code
cortex_request_errors_total                counter     model, node, endpoint, error
cortex_request_duration_seconds            histogram   model, node, endpoint
cortex_time_to_first_token_seconds         histogram   model, node
cortex_node_time_to_first_token_seconds    histogram   model, node
cortex_tokens_per_second                   histogram   model, node
cortex_queue_wait_seconds                  histogram   model
cortex_model_load_wait_seconds             histogram   model
cortex_overhead_seconds                    histogram   (none)
cortex_prompt_tokens_total                 counter     model, node
cortex_completion_tokens_total             counter     model, node, estimated
cortex_inflight_requests                   gauge       node
cortex_queued_requests                     gauge       model
cortex_node_up                             gauge       node
cortex_node_vram_used_bytes                gauge       node
cortex_node_vram_total_bytes               gauge       node
cortex_node_gpu_memory_used_bytes          gauge       node
cortex_node_gpu_memory_total_bytes         gauge       node
cortex_model_loaded                        gauge       node, model
cortex_model_loads_total                   counter     node, model, result
cortex_model_load_duration_seconds         histogram   node, model
cortex_model_evictions_total               counter     node, model, reason
cortex_node_restarts_total                 counter     node
=========================================  ==========  ============================

aioprometheus holds and renders the series. It writes label values verbatim,
so they are escaped here, once, when a series' labels are first built. It has
no child handles either: each of its calls turns a label dict into a JSON
key, and its histograms' ``observe`` bumps every bucket at or above the value.
So the request path only counts, in plain Python: counters in a dict keyed by
label tuples, histograms in a per-series list of (non-cumulative) bucket
counts, found by ``bisect``. :meth:`Metrics.render` folds them into the
collectors before it writes a scrape, so a scrape sees every request recorded
before it. :meth:`Metrics.record` then costs about 2 us for a streamed chat
request (plus 6-7 us for the access line).
"""

from __future__ import annotations

import re
from bisect import bisect_left
from collections.abc import Mapping
from dataclasses import dataclass
from itertools import accumulate
from ssl import SSLContext
from typing import NamedTuple

from aiohttp import hdrs, web
from aioprometheus.collectors import Collector, Counter, Gauge, Histogram, Registry
from aioprometheus.histogram import Histogram as _Buckets
from aioprometheus.renderer import render as _render

from cortex import logs
from cortex.fleet import EMPTY, ModelState, NodeState, Snapshot


@dataclass(slots=True)
class RequestRecord:
    """What one request did; built by the proxy, handed to :meth:`Metrics.record` once.

    Times are ``time.monotonic()`` stamps; 0.0 means "never happened".
    """

    request_id: str
    client: str  # peer address
    model: str  # fleet model id ("" if never resolved)
    node: str  # "" if none
    endpoint: str  # chat | completions | embeddings | responses | messages | count_tokens | models | other
    status: int  # HTTP status sent to the client (200 for streams that then failed: see `error`)
    stream: bool
    started: float  # request arrival
    ended: float
    upstream_sent: float = 0.0  # when cortex sent the request upstream
    first_byte: float = 0.0  # first upstream byte
    first_token: float = 0.0  # first content token seen by the tap
    queue_wait_s: float = 0.0  # waiting in cortex for a slot or a drain
    load_wait_s: float = 0.0  # waiting in cortex for a model load
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    estimated: bool = False  # completion tokens counted from chunks, not reported by the node
    error: str = ""  # short error class name when it failed ("" = ok)
    dialect: str = "openai"  # or "anthropic"


# Bucket bounds (seconds unless named otherwise); aioprometheus appends +Inf.
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60)
LATENCY_BUCKETS = (*TTFT_BUCKETS, 120, 300, 600)
OVERHEAD_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)
TOKENS_PER_SECOND_BUCKETS = (
    1, 2.5, 5, 10, 15, 20, 30, 40, 50, 75, 100, 150, 200, 300, 500, 1000, 2500, 5000,
)  # fmt: skip
LOAD_BUCKETS = (0.5, 1, 2.5, 5, 10, 20, 30, 45, 60, 90, 120, 180, 300, 600)

# aiohttp cuts a connection that sends no complete request for this long: the only bound
# on a client trickling its headers (slowloris). Scrapers just reconnect after it.
METRICS_IDLE_S = 10.0
_MIB = 1024 * 1024  # config sizes (`vram_mb`) are MiB, as nvidia-smi counts them
_STATUS_CLASS = {s: f"{s // 100}xx" for s in range(100, 600)}
_ESTIMATED = ("false", "true")
_UP = frozenset({NodeState.UP, NodeState.DRAINING})  # answering polls, serving what it has
_LOADED = frozenset({ModelState.LOADED, ModelState.UNLOADING})  # weights in VRAM, usable

Key = tuple[str, ...]


def _escape(value: str) -> str:
    """A label value as the text format needs it (aioprometheus does not escape)."""
    if "\\" in value or '"' in value or "\n" in value:
        return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return value


class _Family:
    """An aioprometheus collector plus a cache of its (escaped) label dicts."""

    __slots__ = ("_labels", "_names", "metric")

    def __init__(self, metric: Collector, names: Key) -> None:
        self.metric = metric
        self._names = names
        self._labels: dict[Key, dict[str, str]] = {}

    def labels(self, key: Key) -> dict[str, str]:
        labels = self._labels.get(key)
        if labels is None:
            labels = {n: _escape(v) for n, v in zip(self._names, key, strict=True)}
            self._labels[key] = labels
        return labels


class _Counter(_Family):
    """Counts in a plain dict; :meth:`publish` copies them into the collector.

    ``Counter.add`` costs two label-dict-to-JSON conversions (3 us); a dict
    update costs 0.1 us, and a scrape publishes each series once.
    """

    __slots__ = ("_counts",)
    metric: Counter

    def __init__(self, metric: Counter, names: Key) -> None:
        super().__init__(metric, names)
        self._counts: dict[Key, float] = {}

    def inc(self, key: Key, amount: float = 1) -> None:
        self._counts[key] = self._counts.get(key, 0) + amount

    def publish(self) -> None:
        for key, value in self._counts.items():
            self.metric.set(self.labels(key), value)


class _Gauge(_Family):
    __slots__ = ()
    metric: Gauge

    def set(self, key: Key, value: float) -> None:
        self.metric.set(self.labels(key), value)

    def add(self, key: Key, delta: float) -> None:
        self.metric.add(self.labels(key), delta)

    def clear(self) -> None:
        self.metric.values.clear()


class _Series:
    """One histogram series: bucket counts (not cumulative) and sum, kept apart
    from the aioprometheus histogram that :meth:`publish` folds them into."""

    __slots__ = ("_out", "counts", "sum")

    def __init__(self, out: _Buckets) -> None:
        self._out = out
        self.counts = [0] * len(out.buckets)
        self.sum = 0.0

    def publish(self) -> None:
        out = self._out
        cumulative = list(accumulate(self.counts))
        out.buckets = dict(zip(out.buckets, cumulative, strict=True))
        out.observations = cumulative[-1]
        out.sum = self.sum


class _Histogram(_Family):
    """Counts each series in a :class:`_Series`; :meth:`publish` folds them in.

    aioprometheus' ``observe`` adds 1 to every bucket at or above the value, a
    dict update each (1-1.5 us for 15-20 buckets); here it is one ``bisect``
    and one list update, and a scrape adds the counts up.
    """

    __slots__ = ("_bounds", "_series")
    metric: Histogram

    def __init__(self, metric: Histogram, names: Key) -> None:
        super().__init__(metric, names)
        # aioprometheus' own bounds (floats, +Inf appended): a value's bucket is
        # the first bound >= it, as its ``value <= upper_bound`` counts.
        self._bounds = tuple(_Buckets(*metric.upper_bounds).buckets)
        self._series: dict[Key, _Series] = {}

    def observe(self, key: Key, value: float) -> None:
        series = self._series.get(key)
        if series is None:
            series = self._add(key)
        series.counts[bisect_left(self._bounds, value)] += 1
        series.sum += value

    def _add(self, key: Key) -> _Series:
        out = _Buckets(*self.metric.upper_bounds)
        self.metric.set_value(self.labels(key), out)  # in the scrape from now on
        series = self._series[key] = _Series(out)
        return series

    def publish(self) -> None:
        for series in self._series.values():
            series.publish()


class Metrics:
    """Every cortex metric; also the :class:`~cortex.fleet.FleetEvents` sink."""

    def __init__(self) -> None:
        self.registry = Registry()
        self.bound_port = 0
        self._runner: web.ServerRunner | None = None
        self._snapshot = EMPTY
        self._sizes: Mapping[str, int] = {}
        self._tallies: list[_Counter | _Histogram] = []  # counted here, published at a scrape
        self._define_request_metrics()
        self._define_fleet_metrics()

    def _define_request_metrics(self) -> None:
        c, h = self._counter, self._histogram
        mne = ("model", "node", "endpoint")
        self._requests = c(
            "cortex_requests_total", "Requests answered, by status class.", (*mne, "code")
        )
        self._errors = c(
            "cortex_request_errors_total",
            "Requests that failed, by error class (streams that failed after a 200 included).",
            (*mne, "error"),
        )
        self._duration = h(
            "cortex_request_duration_seconds",
            "Time from request arrival to its end.",
            mne,
            LATENCY_BUCKETS,
        )
        self._ttft = h(
            "cortex_time_to_first_token_seconds",
            "Time from request arrival to the first content token (what the client saw).",
            ("model", "node"),
            TTFT_BUCKETS,
        )
        self._node_ttft = h(
            "cortex_node_time_to_first_token_seconds",
            "Time from sending a request upstream to its first content token (the node's own).",
            ("model", "node"),
            TTFT_BUCKETS,
        )
        self._tps = h(
            "cortex_tokens_per_second",
            "Completion tokens per second after the first token, per streamed request.",
            ("model", "node"),
            TOKENS_PER_SECOND_BUCKETS,
        )
        self._queue_wait = h(
            "cortex_queue_wait_seconds",
            "Time requests that waited spent queued in cortex for a slot (others not observed).",
            ("model",),
            LATENCY_BUCKETS,
        )
        self._load_wait = h(
            "cortex_model_load_wait_seconds",
            "Time requests that waited spent waiting for a model load (others not observed).",
            ("model",),
            LATENCY_BUCKETS,
        )
        self._overhead = h(
            "cortex_overhead_seconds",
            "Time cortex itself added before sending a request upstream, waits excluded.",
            (),
            OVERHEAD_BUCKETS,
        )
        self._prompt = c(
            "cortex_prompt_tokens_total", "Prompt tokens reported by nodes.", ("model", "node")
        )
        self._completion = c(
            "cortex_completion_tokens_total",
            'Completion tokens; estimated="true" when counted from stream chunks.',
            ("model", "node", "estimated"),
        )

    def _define_fleet_metrics(self) -> None:
        c, g, h = self._counter, self._gauge, self._histogram
        self._inflight = g("cortex_inflight_requests", "Requests in flight on a node.", ("node",))
        self._queued = g(
            "cortex_queued_requests", "Requests queued in cortex for a model.", ("model",)
        )
        self._node_up = g(
            "cortex_node_up", "1 when the node answers polls (up or draining).", ("node",)
        )
        self._vram_used = g(
            "cortex_node_vram_used_bytes",
            "Configured sizes of the models resident (or loading) on a node.",
            ("node",),
        )
        self._vram_total = g(
            "cortex_node_vram_total_bytes", "Configured VRAM of a node.", ("node",)
        )
        self._gpu_used = g(
            "cortex_node_gpu_memory_used_bytes",
            "GPU memory in use on a node, measured by its agent (nvidia-smi).",
            ("node",),
        )
        self._gpu_total = g(
            "cortex_node_gpu_memory_total_bytes",
            "GPU memory of a node, measured by its agent (nvidia-smi).",
            ("node",),
        )
        self._loaded = g(
            "cortex_model_loaded",
            "1 when the model is loaded on the node, else 0.",
            ("node", "model"),
        )
        self._loads = c(
            "cortex_model_loads_total", "Model loads, by result.", ("node", "model", "result")
        )
        self._load_duration = h(
            "cortex_model_load_duration_seconds",
            "Duration of model load attempts, whatever their result.",
            ("node", "model"),
            LOAD_BUCKETS,
        )
        self._evictions = c(
            "cortex_model_evictions_total",
            "Models evicted, by reason.",
            ("node", "model", "reason"),
        )
        self._restarts = c(
            "cortex_node_restarts_total", "Restarts of a node's inference server.", ("node",)
        )

    def _counter(self, name: str, doc: str, labels: Key) -> _Counter:
        counter = _Counter(Counter(name, doc, registry=self.registry), labels)
        self._tallies.append(counter)
        return counter

    def _gauge(self, name: str, doc: str, labels: Key) -> _Gauge:
        return _Gauge(Gauge(name, doc, registry=self.registry), labels)

    def _histogram(
        self, name: str, doc: str, labels: Key, buckets: tuple[float, ...]
    ) -> _Histogram:
        metric = Histogram(name, doc, registry=self.registry, buckets=buckets)
        histogram = _Histogram(metric, labels)
        self._tallies.append(histogram)
        return histogram

    # --- the request path ----------------------------------------------------

    def record(self, rec: RequestRecord) -> None:
        """Account for one finished request and write its access log line."""
        model, node = rec.model, rec.node
        mn = (model, node)
        mne = (model, node, rec.endpoint)
        self._requests.inc((*mne, _STATUS_CLASS.get(rec.status, "other")))
        self._duration.observe(mne, rec.ended - rec.started)
        if rec.error:
            self._errors.inc((*mne, rec.error))
        if rec.first_token:
            self._observe_tokens(rec, mn)
        if rec.upstream_sent:
            own = rec.upstream_sent - rec.started - rec.queue_wait_s - rec.load_wait_s
            self._overhead.observe((), max(own, 0.0))
        if rec.queue_wait_s > 0:
            self._queue_wait.observe((model,), rec.queue_wait_s)
        if rec.load_wait_s > 0:
            self._load_wait.observe((model,), rec.load_wait_s)
        if rec.prompt_tokens:
            self._prompt.inc(mn, rec.prompt_tokens)
        if rec.completion_tokens:
            self._completion.inc((model, node, _ESTIMATED[rec.estimated]), rec.completion_tokens)
        logs.access(rec)

    def _observe_tokens(self, rec: RequestRecord, mn: Key) -> None:
        self._ttft.observe(mn, rec.first_token - rec.started)
        if rec.upstream_sent:
            self._node_ttft.observe(mn, rec.first_token - rec.upstream_sent)
        # A whole (non-streamed) answer arrives at once: its "first token" is the
        # answer, and what follows is reading the body, not generating.
        generating = rec.ended - rec.first_token
        if rec.stream and rec.completion_tokens and generating > 0:
            self._tps.observe(mn, rec.completion_tokens / generating)

    # --- fleet events ----------------------------------------------------------

    def model_load(self, node: str, model: str, result: str, seconds: float) -> None:
        self._loads.inc((node, model, result))
        self._load_duration.observe((node, model), seconds)

    def model_evicted(self, node: str, model: str, reason: str) -> None:
        self._evictions.inc((node, model, reason))

    def node_restart(self, node: str) -> None:
        self._restarts.inc((node,))

    def fleet_changed(self, snapshot: Snapshot) -> None:
        self._snapshot = snapshot

    def queued(self, model: str, delta: int) -> None:
        self._queued.add((model,), delta)

    def set_model_sizes(self, sizes: Mapping[str, int]) -> None:
        """Model id -> configured ``vram_mb``, for ``cortex_node_vram_used_bytes``.

        Call at start and on every config reload (``[[models]]`` ``vram_mb``);
        models without a size count as 0.
        """
        self._sizes = dict(sizes)

    # --- the scrape ----------------------------------------------------------------

    def render(self, accept: str | None = None) -> tuple[bytes, str]:
        """The scrape body and its content type (Prometheus text format 0.0.4)."""
        for tally in self._tallies:
            tally.publish()
        self._refresh_fleet_gauges()
        body, headers = _render(self.registry, [accept] if accept else [])
        return body, headers["Content-Type"]

    def _refresh_fleet_gauges(self) -> None:
        gauges = (
            self._node_up,
            self._inflight,
            self._vram_used,
            self._vram_total,
            self._gpu_used,
            self._gpu_total,
            self._loaded,
        )
        for gauge in gauges:
            gauge.clear()  # drops nodes and models that left the fleet
        sizes = self._sizes
        for name, view in self._snapshot.nodes.items():
            key = (name,)
            self._node_up.set(key, 1 if view.state in _UP else 0)
            self._inflight.set(key, view.handle.inflight)
            used = sum(sizes.get(m, 0) for m, state in view.models.items() if state.resident)
            self._vram_used.set(key, used * _MIB)
            if view.vram_mb:
                self._vram_total.set(key, view.vram_mb * _MIB)
            if view.gpu_used_mb is not None and view.gpu_total_mb is not None:
                self._gpu_used.set(key, view.gpu_used_mb * _MIB)
                self._gpu_total.set(key, view.gpu_total_mb * _MIB)
            for model, state in view.models.items():
                self._loaded.set((name, model), 1 if state in _LOADED else 0)

    def sample(self, name: str, **labels: str | float) -> float:
        """The sum of the scraped samples of ``name`` whose labels include ``labels``.

        For tests and tools: ``sample("cortex_requests_total", model="m", code="2xx")``;
        ``le`` compares as a number. 0.0 when no series matches; KeyError for an
        unknown metric name.
        """
        if name not in self._names():
            raise KeyError(f"no metric named {name!r}")
        body, _ = self.render(None)
        return sum(s.value for s in parse(body) if s.name == name and _matches(s.labels, labels))

    def _names(self) -> set[str]:
        names = set()
        for collector in self.registry.get_all():
            names.add(collector.name)
            if isinstance(collector, Histogram):
                names.update(f"{collector.name}_{end}" for end in ("bucket", "sum", "count"))
        return names

    # --- the metrics port ------------------------------------------------------

    async def start(self, host: str, port: int, ssl: SSLContext | None = None) -> None:
        """Serve ``GET /metrics`` (and nothing else) on ``host:port``; port 0 picks one."""
        if self._runner is not None:
            raise RuntimeError("the metrics server is already running")
        server = web.Server(self._handle, access_log=None, keepalive_timeout=METRICS_IDLE_S)
        runner = web.ServerRunner(server, shutdown_timeout=1.0)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port, ssl_context=ssl).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.bound_port = runner.addresses[0][1]

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        if request.path != "/metrics" or request.method not in (hdrs.METH_GET, hdrs.METH_HEAD):
            return web.Response(status=404, text="404: Not Found")
        body, content_type = self.render(request.headers.get(hdrs.ACCEPT))
        return web.Response(body=body, headers={hdrs.CONTENT_TYPE: content_type})


# --- reading a scrape back ------------------------------------------------------


class Sample(NamedTuple):
    name: str
    labels: dict[str, str]  # unescaped
    value: float


_SAMPLE = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?[ \t]+(\S+)(?:[ \t]+-?\d+)?")
_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"\s*(?:,|$)')
_UNESCAPE = re.compile(r"\\(.)")


def parse(text: bytes | str) -> list[Sample]:
    """The samples of a Prometheus text-format scrape (comments skipped)."""
    if isinstance(text, bytes):
        text = text.decode()
    out = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.fullmatch(line)
        if m is None:
            raise ValueError(f"not a sample line: {line!r}")
        labels = _parse_labels(m[2] or "", line)
        out.append(Sample(m[1], labels, float(m[3])))
    return out


def _parse_labels(text: str, line: str) -> dict[str, str]:
    labels = {}
    pos = 0
    while pos < len(text):
        m = _LABEL.match(text, pos)
        if m is None:
            raise ValueError(f"bad labels in {line!r}")
        labels[m[1]] = _UNESCAPE.sub(_unescape, m[2])
        pos = m.end()
    return labels


def _unescape(m: re.Match[str]) -> str:
    return "\n" if m[1] == "n" else m[1]


def _matches(have: dict[str, str], want: dict[str, str | float]) -> bool:
    for key, value in want.items():
        got = have.get(key)
        if got is None or (float(got) != float(value) if key == "le" else got != value):
            return False
    return True
