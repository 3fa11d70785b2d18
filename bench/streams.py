"""The streams sweep: many concurrent paced streams, timed one by one.

A paced node sends 64 deltas 20 ms apart (50 tok/s), like a real model; the
per-stream client (:mod:`bench.streamclient`, its own process) measures TTFT
and inter-token gaps. Each concurrency level runs ``stream_rounds`` interleaved
rounds of every target; an added time is the median over rounds of (target -
direct) in the same round.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.measure import sane, start_proxies
from bench.procs import Procs, Usage, measure, pinned
from bench.report import Check, Outcome, Table, fmt, median, plot_streams, ratio
from bench.settings import Settings
from bench.stack import NodeSpec, Target, request_body, start_node

TOKENS = 64
TOK_PER_S = 50.0
RAMP_S = 1.5
TARGET_LEVEL = 250
PACED_NODE = NodeSpec(TOKENS, instant=False, tok_per_s=TOK_PER_S)
CHAT = "/v1/chat/completions"


Runs = dict[int, dict[str, list[dict[str, float]]]]
"""level -> target -> one flat record per round (see :func:`_flat`)."""


def streams(s: Settings) -> Outcome:
    out = Outcome("streams")
    body = request_body(TOKENS, stream=True)
    runs: Runs = {}
    with Procs(s.workdir / "streams") as procs:
        node = start_node(procs, PACED_NODE, s.layout)
        targets = start_proxies(procs, node, s, out, with_nginx=s.stream_nginx)
        targets = sane(targets, CHAT, body, TOKENS, out)
        body_file = procs.workdir / "stream-body.json"
        body_file.write_bytes(body)
        for level in s.levels:
            runs[level] = {t.name: [] for t in targets}
            for r in range(s.stream_rounds):
                k = r % len(targets)
                for t in [*targets[k:], *targets[:k]]:
                    runs[level][t.name].append(_flat(_run(s, t, node, level, body_file)))
                _progress(level, r, s.stream_rounds, runs[level])
    out.tables.append(_table(s, runs))
    out.checks += _checks(runs)
    out.data["levels"] = {str(k): v for k, v in runs.items()}
    png = plot_streams(s.stamp, list(s.levels), _series(s, runs))
    if png is not None:
        out.tables[-1].notes.append(f"plot: bench/results/{png.name} (and streams-latest.png)")
    return out


def _progress(
    level: int, r: int, rounds: int, by_target: dict[str, list[dict[str, float]]]
) -> None:
    cells = [
        f"{name} {x[-1]['streams_per_s']:.1f}/s TTFT p99 {x[-1]['ttft_p99']:.1f} ms "
        f"err {x[-1]['errors']:.0f}"
        for name, x in by_target.items()
    ]
    print(f"  streams {level} round {r + 1}/{rounds}: " + ";  ".join(cells), flush=True)


def _run(s: Settings, t: Target, node: Target, level: int, body_file: Path) -> dict[str, Any]:
    argv = [sys.executable, "-m", "bench.streamclient", "--url", t.url(CHAT)]
    argv += ["--body-file", str(body_file), "--streams", str(level)]
    argv += ["--seconds", f"{s.stream_seconds:g}", "--ramp", f"{RAMP_S:g}"]
    argv += [a for k, v in t.headers.items() for a in ("--header", f"{k}:{v}")]
    proxy = t.proc if t is not node else None
    with measure(proxy, s.layout.proxy) as pu, measure(node.proc, s.layout.node) as nu:
        done = subprocess.run(
            pinned(argv, s.layout.client),
            capture_output=True,
            text=True,
            timeout=RAMP_S + s.stream_seconds + 120,
        )
    if done.returncode != 0:
        raise RuntimeError(f"stream client failed:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout)
    result["proxy"] = _usage(pu)
    result["node"] = _usage(nu)
    return result


def _usage(u: list[Usage]) -> dict[str, float] | None:
    return {**u[0].__dict__, "others_pct": u[0].others_pct} if u else None


def _flat(r: dict[str, Any]) -> dict[str, float]:
    proxy, node = r.get("proxy") or {}, r.get("node") or {}
    return {
        "errors": r["errors"],
        "streams_per_s": r["streams_per_s"],
        "ttft_p50": r["ttft_ms"]["p50"],
        "ttft_p99": r["ttft_ms"]["p99"],
        "gap_p99": r["gap_ms"]["p99"],
        "cpu_pct": proxy.get("cpu_pct", math.nan),
        "peak_rss_mb": proxy.get("peak_rss_mb", math.nan),
        "others_pct": proxy.get("others_pct", math.nan),
        "node_core_pct": node.get("core_pct", math.nan),
    }


_ADDED = ("ttft_p50", "ttft_p99", "gap_p99")


def _summary(runs: list[dict[str, float]], base: list[dict[str, float]] | None) -> dict[str, float]:
    """Medians over rounds; errors summed, peak RSS the largest; ``+X`` from paired rounds."""
    out = {k: median(r[k] for r in runs) for k in runs[0]}
    out["errors"] = sum(r["errors"] for r in runs)
    out["peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs)
    for k in _ADDED:
        pairs = zip(runs, base or [], strict=False)
        out[f"+{k}"] = median(a[k] - b[k] for a, b in pairs) if base is not runs else math.nan
    out["x_direct"] = ratio(out["streams_per_s"], median(b["streams_per_s"] for b in base or []))
    return out


def _table(s: Settings, runs: Runs) -> Table:
    table = Table(
        f"streams: {TOKENS} deltas at {TOK_PER_S:g} tok/s per stream, {s.stream_rounds} "
        f"interleaved rounds of {s.stream_seconds:g} s (after a {RAMP_S:g} s ramp) per level "
        "(medians)",
        [
            "streams",
            "target",
            "errors",
            "streams/s",
            "x direct",
            "TTFT p50",
            "TTFT p99",
            "+TTFT p50",
            "+TTFT p99",
            "gap p99",
            "+gap p99",
            "proxy CPU%",
            "proxy peak RSS MB",
            "others on proxy CPU%",
            "node core busy%",
        ],
    )
    for level, by_target in runs.items():
        base = by_target.get("direct")
        for name, x in by_target.items():
            m = _summary(x, base)
            direct = name == "direct"
            table.add(
                level,
                name,
                int(m["errors"]),
                m["streams_per_s"],
                m["x_direct"],
                m["ttft_p50"],
                m["ttft_p99"],
                "-" if direct else m["+ttft_p50"],
                "-" if direct else m["+ttft_p99"],
                m["gap_p99"],
                "-" if direct else m["+gap_p99"],
                fmt(m["cpu_pct"], 0),
                fmt(m["peak_rss_mb"], 1),
                fmt(m["others_pct"], 0),
                fmt(m["node_core_pct"], 0),
            )
    table.notes += [
        "times in ms; TTFT = request written -> first data frame; gap = time between frames "
        "(frames read together count 0)",
        "+X = median over rounds of (target - direct) in the same round; proxy peak RSS = VmHWM, "
        "reset before each run; node core busy% = the core of the node + stream client",
    ]
    return table


def _checks(runs: Runs) -> list[Check]:
    at = runs.get(TARGET_LEVEL, {})
    if "cortex" not in at or "direct" not in at:
        why = "not run" if TARGET_LEVEL not in runs else "cortex or direct missing"
        return [Check(f"streams at {TARGET_LEVEL}", why, "measured", False)]
    m = _summary(at["cortex"], at["direct"])
    where = f"streams at {TARGET_LEVEL}: cortex"
    return [
        Check(f"{where} errors", str(int(m["errors"])), "0", m["errors"] == 0),
        Check(
            f"{where} streams/s",
            f"{fmt(m['x_direct'], 3)} x direct",
            ">= 0.95 x direct",
            m["x_direct"] >= 0.95,
        ),
        Check(
            f"{where} added TTFT p99",
            f"{fmt(m['+ttft_p99'], 3)} ms",
            "<= 1 ms",
            m["+ttft_p99"] <= 1.0,
        ),
        Check(
            f"{where} peak RSS",
            f"{fmt(m['peak_rss_mb'], 1)} MB",
            "<= 200 MB",
            m["peak_rss_mb"] <= 200,
        ),
    ]


def _series(s: Settings, runs: Runs) -> dict[str, dict[str, list[float]]]:
    names = sorted(
        {n for by_target in runs.values() for n in by_target}, key=lambda n: (n != "direct", n)
    )
    series = {}
    for name in names:
        rows = [
            _summary(runs[level][name], runs[level].get("direct")) if name in runs[level] else None
            for level in s.levels
        ]
        series[name] = {
            k: [r[k] if r else math.nan for r in rows]
            for k in ("streams_per_s", "ttft_p50", "ttft_p99")
        }
    return series
