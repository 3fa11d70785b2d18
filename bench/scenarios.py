"""The wrk scenarios: overhead (one request at a time), relay (64 connections), anthropic.

The streams sweep, the soak and the peers live in their own modules.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from bench import profile
from bench.measure import Series, rounds, sane, start_proxies, wrk_runner
from bench.procs import Procs
from bench.report import Check, Outcome, Table, fmt, median, ratio
from bench.settings import Settings
from bench.stack import NodeSpec, Target, request_body, start_cortex, start_node

CHAT = "/v1/chat/completions"
MESSAGES = "/v1/messages"
ANSWER_TOKENS = 100
OVERHEAD_TOKENS = 16
# `--instant` writes a whole answer in one write: that relay is the one with targets.
# CHUNKED_NODE writes the 100 tokens one by one as fast as it can, as mistral.rs does;
# on 2 cores the node (sharing its core with wrk) is then the bottleneck for every
# target, so that variant is shown for the proxies' CPU time per request only.
CHUNKED_NODE = NodeSpec(ANSWER_TOKENS, instant=False, tok_per_s=1_000_000)
INSTANT_NODE = NodeSpec(ANSWER_TOKENS, instant=True)
ANTHROPIC_HEADERS = {"anthropic-version": "2023-06-01"}


# --- overhead ----------------------------------------------------------------------


def overhead(s: Settings) -> Outcome:
    """One non-streaming request at a time: what a proxy adds to the latency."""
    out = Outcome("overhead")
    with Procs(s.workdir / "overhead") as procs:
        node = start_node(procs, INSTANT_NODE, s.layout)
        targets = start_proxies(procs, node, s, out)
        series = measure_overhead(s, targets, node, out)
    table, added = overhead_table(series)
    out.tables.append(table)
    out.data["rounds"] = dump(series)
    cortex = added.get("cortex", float("nan"))
    value = f"{fmt(cortex, 3)} ms"
    out.checks += [
        Check("cortex added p50 latency (first milestone)", value, "<= 0.5 ms", cortex <= 0.5),
        Check("cortex added p50 latency (final)", value, "<= 0.3 ms", cortex <= 0.3),
    ]
    return out


def measure_overhead(
    s: Settings, targets: Sequence[Target], node: Target, out: Outcome, count: int = 0
) -> dict[str, Series]:
    body = request_body(OVERHEAD_TOKENS, stream=False)
    targets = sane(targets, CHAT, body, 0, out)
    run = wrk_runner(s, [(CHAT, body)], connections=1, seconds=s.overhead_seconds)
    return rounds(s, targets, node, run, count or s.overhead_rounds, "overhead")


def overhead_table(series: dict[str, Series]) -> tuple[Table, dict[str, float]]:
    """Latency per target and the median over rounds of (target - direct) round medians."""
    table = Table(
        f"overhead: 1 connection, non-streaming, {OVERHEAD_TOKENS}-token answers, "
        f"{len(series['direct'].samples)} interleaved rounds",
        ["target", "req/s", "p50 ms", "p99 ms", "added p50 ms", "added (min..max of rounds)"],
    )
    base = [x.result.p50_ms for x in series["direct"].samples]
    added: dict[str, float] = {}
    for name, x in series.items():
        diffs = [a.result.p50_ms - b for a, b in zip(x.samples, base, strict=False)]
        added[name] = median(diffs)
        spread = f"{min(diffs):.3f}..{max(diffs):.3f}" if name != "direct" else "baseline"
        table.add(
            name,
            fmt(x.med(lambda r: r.rps), 0),
            x.med(lambda r: r.p50_ms),
            x.med(lambda r: r.p99_ms),
            added[name] if name != "direct" else "-",
            spread,
            digits=3,
        )
    table.notes.append(
        "p50/p99: median over rounds of each round's wrk percentile; added p50: median over rounds "
        "of (target p50 - direct p50) in the same round"
    )
    return table, added


# --- relay -------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    label: str
    path: str
    body: bytes
    stream_tokens: int  # 0: not a stream


def relay_variants(node: NodeSpec) -> list[Variant]:
    sse = Variant(
        "sse, 100 writes" if not node.instant else "sse, 1 write",
        CHAT,
        request_body(ANSWER_TOKENS, stream=True),
        ANSWER_TOKENS,
    )
    if not node.instant:
        return [sse]
    plain = Variant("json", CHAT, request_body(ANSWER_TOKENS, stream=False), 0)
    return [sse, plain]


def relay(s: Settings) -> Outcome:
    """64 connections of 100-token answers as fast as possible: direct, nginx, cortex."""
    out = Outcome("relay")
    table = relay_table(s)
    for spec in (CHUNKED_NODE, INSTANT_NODE):
        with Procs(s.workdir / f"relay-{'instant' if spec.instant else 'chunked'}") as procs:
            node = start_node(procs, spec, s.layout)
            targets = start_proxies(procs, node, s, out)
            for v in relay_variants(spec):
                series = measure_relay(s, targets, node, v, out)
                add_relay_rows(table, v.label, series)
                out.data[v.label] = dump(series)
                if spec.instant:  # the relay; see CHUNKED_NODE for the other
                    out.checks += relay_checks(v.label, series)
            cortex = next((t for t in targets if t.name == "cortex"), None)
            if s.profile and cortex is not None:
                out.tables += profile_relay(s, cortex, relay_variants(spec)[0])
    out.tables.insert(0, table)
    return out


def measure_relay(
    s: Settings, targets: Sequence[Target], node: Target, v: Variant, out: Outcome
) -> dict[str, Series]:
    ok = sane(targets, v.path, v.body, v.stream_tokens, out)
    run = wrk_runner(s, [(v.path, v.body)], connections=s.connections, seconds=s.seconds)
    return rounds(s, ok, node, run, s.rounds, f"relay {v.label}")


def relay_table(s: Settings) -> Table:
    table = Table(
        f"relay: {s.connections} connections, {ANSWER_TOKENS}-token answers, "
        f"{s.rounds} interleaved rounds of {s.seconds:g} s (medians)",
        [
            "variant",
            "target",
            "req/s",
            "x direct",
            "x nginx",
            "p50 ms",
            "p99 ms",
            "errors",
            "proxy CPU%",
            "proxy CPU us/req",
            "others on proxy CPU%",
            "node core busy%",
            "saturated",
        ],
    )
    table.notes += [
        "proxy CPU us/req = the proxy's CPU time per request (comparable even when the node "
        "is the bottleneck)",
        "others on proxy CPU% = what other processes (other people's tests) took of the proxy's "
        "core; node core busy% = the core shared by the node and wrk, whoever used it",
        "saturated = the core that was >= 95% busy: 'node' means the node + wrk core bounds "
        "every target, so req/s ratios say little there and us/req tells the proxies apart",
    ]
    return table


def add_relay_rows(table: Table, label: str, series: dict[str, Series]) -> None:
    rps = {name: x.med(lambda r: r.rps) for name, x in series.items()}
    for name, x in series.items():
        node_core, proxy_core = x.node("core_pct"), x.proxy("core_pct")
        saturated = [n for n, pct in (("node", node_core), ("proxy", proxy_core)) if pct >= 95]
        table.add(
            label,
            name,
            fmt(rps[name], 0),
            ratio(rps[name], rps.get("direct", float("nan"))),
            ratio(rps[name], rps.get("nginx", float("nan"))),
            x.med(lambda r: r.p50_ms),
            x.med(lambda r: r.p99_ms),
            x.errors,
            fmt(x.proxy("cpu_pct"), 0),
            fmt(x.cpu_us_per_request, 0),
            fmt(x.proxy("others_pct"), 0),
            fmt(node_core, 0),
            "+".join(saturated) or "-",
        )


def relay_checks(label: str, series: dict[str, Series]) -> list[Check]:
    if "nginx" not in series:
        return []
    rps = {name: x.med(lambda r: r.rps) for name, x in series.items()}
    r = ratio(rps.get("cortex", float("nan")), rps["nginx"])
    value = f"{fmt(r)} x nginx"
    return [
        Check(
            f"relay {label}: cortex req/s (first milestone)", value, ">= 0.35 x nginx", r >= 0.35
        ),
        Check(f"relay {label}: cortex req/s (final)", value, ">= 0.5 x nginx", r >= 0.5),
    ]


def profile_relay(s: Settings, cortex: Target, v: Variant) -> list[Table]:
    """py-spy on cortex under one relay variant, after its measured rounds."""
    assert cortex.proc is not None
    seconds = max(10.0, 2 * s.seconds)
    run = wrk_runner(s, [(v.path, v.body)], connections=s.connections, seconds=seconds)
    print(f"  profiling cortex under '{v.label}' for {seconds:g} s with py-spy ...", flush=True)
    name = "relay-" + v.label.replace(", ", "-").replace(" ", "")
    return profile.record(cortex.proc.pid, seconds, s, lambda: run(cortex), name, v.label)


# --- anthropic -----------------------------------------------------------------------


def anthropic(s: Settings) -> Outcome:
    """The translated ``/v1/messages`` stream against the OpenAI passthrough, through cortex."""
    out = Outcome("anthropic")
    body = request_body(ANSWER_TOKENS, stream=True)
    with Procs(s.workdir / "anthropic") as procs:
        node = start_node(procs, CHUNKED_NODE, s.layout)
        cortex = start_cortex(procs, node, s.layout)
        endpoints = {"openai passthrough": CHAT, "anthropic translated": MESSAGES}
        targets = [
            t
            for name, path in endpoints.items()
            if sane([t := Target(name, cortex.base, cortex.proc)], path, body, ANSWER_TOKENS, out)
        ]
        runners = {
            name: wrk_runner(s, [(path, body)], s.connections, s.seconds, ANTHROPIC_HEADERS)
            for name, path in endpoints.items()
        }
        series = rounds(s, targets, node, lambda t: runners[t.name](t), s.rounds, "anthropic")
    table = Table(
        f"anthropic: cortex, {s.connections} connections, {ANSWER_TOKENS}-token streams "
        f"(100 node writes each), {s.rounds} interleaved rounds of {s.seconds:g} s",
        [
            "endpoint",
            "req/s",
            "x openai",
            "p50 ms",
            "p99 ms",
            "errors",
            "cortex CPU%",
            "CPU us/req",
        ],
    )
    base = series.get("openai passthrough")
    base_rps = base.med(lambda r: r.rps) if base else float("nan")
    for name, x in series.items():
        rps = x.med(lambda r: r.rps)
        table.add(
            name,
            fmt(rps, 0),
            ratio(rps, base_rps),
            x.med(lambda r: r.p50_ms),
            x.med(lambda r: r.p99_ms),
            x.errors,
            fmt(x.proxy("cpu_pct"), 0),
            fmt(x.cpu_us_per_request, 0),
        )
    out.tables.append(table)
    out.data["rounds"] = dump(series)
    trans = series.get("anthropic translated")
    r = ratio(trans.med(lambda r: r.rps), base_rps) if trans else float("nan")
    out.checks.append(
        Check("/v1/messages stream req/s", f"{fmt(r)} x openai", ">= 0.6 x openai", r >= 0.6)
    )
    return out


def dump(series: dict[str, Series]) -> dict[str, list[dict[str, object]]]:
    return {
        name: [
            {
                "wrk": smp.result.__dict__,
                "rps": smp.result.rps,
                "proxy": smp.proxy.__dict__ if smp.proxy else None,
                "node": smp.node.__dict__ if smp.node else None,
            }
            for smp in x.samples
        ]
        for name, x in series.items()
    }
