"""The soak: a million short requests through cortex, its RSS read every ``soak_sample_s``.

Requests alternate between a non-streaming and a streaming 16-token chat
completion. wrk runs in slices of ``soak_sample_s`` seconds until the request
count is reached (or a slice completes nothing); RSS is read between slices.
Memory is "flat" when it grows less than 5 % from the end of the warm-up (the
first 10 % of the requests) to the end.
"""

from __future__ import annotations

import time

from bench import wrk
from bench.procs import Procs, rss_mb
from bench.report import Check, Outcome, Table, fmt
from bench.settings import Settings
from bench.stack import NodeSpec, request_body, start_cortex, start_node

TOKENS = 16
WARMUP_FRACTION = 0.10
GROWTH_LIMIT_PCT = 5.0
CHAT = "/v1/chat/completions"


def soak(s: Settings) -> Outcome:
    out = Outcome("soak")
    reqs = [(CHAT, request_body(TOKENS, stream=False)), (CHAT, request_body(TOKENS, stream=True))]
    samples: list[tuple[int, float, float, int]] = []  # requests so far, s, RSS MB, errors
    with Procs(s.workdir / "soak") as procs:
        node = start_node(procs, NodeSpec(TOKENS), s.layout)
        cortex = start_cortex(procs, node, s.layout)
        assert cortex.proc is not None
        pids = cortex.proc.tree()
        t0, total, errors = time.monotonic(), 0, 0
        samples.append((0, 0.0, rss_mb(pids), 0))
        while total < s.soak_requests:
            r = wrk.run(
                cortex.base,
                reqs,
                connections=s.connections,
                seconds=s.soak_sample_s,
                cpus=s.layout.client,
            )
            total, errors = total + r.requests, errors + r.errors
            samples.append((total, time.monotonic() - t0, rss_mb(pids), errors))
            print(
                f"  soak: {total:,} requests, {r.rps:,.0f}/s, RSS {samples[-1][2]:.1f} MB, "
                f"errors {errors}",
                flush=True,
            )
            if r.requests == 0:
                out.data["stopped"] = "a slice completed no request"
                break
    out.data["samples"] = [
        {"requests": n, "seconds": t, "rss_mb": m, "errors": e} for n, t, m, e in samples
    ]
    out.tables.append(_table(s, samples))
    out.checks += _checks(samples)
    return out


def _warm(samples: list[tuple[int, float, float, int]]) -> tuple[int, float, float, int]:
    """The first sample past the warm-up (never the last one: growth needs two points)."""
    total = samples[-1][0]
    return next((x for x in samples[1:-1] if x[0] >= WARMUP_FRACTION * total), samples[0])


def _table(s: Settings, samples: list[tuple[int, float, float, int]]) -> Table:
    table = Table(
        f"soak: {s.connections} connections, alternating json / sse {TOKENS}-token requests, "
        f"cortex RSS every {s.soak_sample_s:g} s ({len(samples)} samples, at most 11 shown)",
        ["requests", "seconds", "RSS MB", "errors"],
    )
    step = max(1, (len(samples) - 1) // 9)
    shown = samples[::step]
    if shown[-1] is not samples[-1]:
        shown.append(samples[-1])
    for n, t, m, e in shown:
        table.add(n, t, m, e, digits=1)
    return table


def _checks(samples: list[tuple[int, float, float, int]]) -> list[Check]:
    warm, last = _warm(samples), samples[-1]
    growth = 100.0 * (last[2] - warm[2]) / warm[2] if warm[2] else float("nan")
    return [
        Check(
            "soak: cortex RSS growth after warm-up",
            f"{fmt(growth, 1)} % ({warm[2]:.1f} -> {last[2]:.1f} MB)",
            f"< {GROWTH_LIMIT_PCT:g} %",
            growth < GROWTH_LIMIT_PCT,
        ),
        Check("soak: errors", f"{last[3]:,} of {last[0]:,}", "0", last[3] == 0),
    ]
