"""Interleaved rounds: every target measured once per round, in a rotating order.

Noise from whatever else runs on the machine then hits every target alike, and
a figure is only ever compared with the baseline of the same run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from bench import wrk
from bench.procs import ProcessDied, Procs, Usage, measure
from bench.report import Outcome, median
from bench.settings import Settings
from bench.stack import Target, check_stream, post, start_cortex, start_nginx


@dataclass
class Sample:
    """One wrk run against one target, with what the proxy and the node used meanwhile."""

    result: wrk.WrkResult
    proxy: Usage | None
    node: Usage | None


@dataclass
class Series:
    """All rounds of one target."""

    target: str
    samples: list[Sample] = field(default_factory=list)

    def med(self, pick: Callable[[wrk.WrkResult], float]) -> float:
        return median(pick(s.result) for s in self.samples)

    def proxy(self, field: str) -> float:
        """Median over rounds of one :class:`Usage` field of the proxy (nan for direct)."""
        return median(getattr(s.proxy, field) for s in self.samples if s.proxy is not None)

    def node(self, field: str) -> float:
        return median(getattr(s.node, field) for s in self.samples if s.node is not None)

    @property
    def cpu_us_per_request(self) -> float:
        """Proxy CPU time per request: comparable even when the node is the bottleneck."""
        return median(
            1e4 * s.proxy.cpu_pct / s.result.rps
            for s in self.samples
            if s.proxy is not None and s.result.rps
        )

    @property
    def errors(self) -> int:
        return sum(s.result.errors for s in self.samples)


def start_proxies(
    procs: Procs, node: Target, s: Settings, out: Outcome, with_nginx: bool = True
) -> list[Target]:
    """The node (as ``direct``), nginx when installed, cortex when it starts."""
    targets = [node]
    starters = [("nginx", start_nginx)] if with_nginx else []
    for name, start in [*starters, ("cortex", start_cortex)]:
        try:
            target = start(procs, node, s.layout)
        except ProcessDied as exc:
            note(out, f"{name} did not start, left out: {exc.brief()}")
            continue
        if target is None:
            note(out, f"{name} is not installed, left out")
            continue
        targets.append(target)
    return targets


def note(out: Outcome, text: str) -> None:
    print(f"  note: {text}", flush=True)
    out.data.setdefault("notes", []).append(text)


def sane(
    targets: Sequence[Target], path: str, body: bytes, stream_tokens: int, out: Outcome
) -> list[Target]:
    """The targets that answer one request correctly (a broken fast proxy must not win)."""
    kept = []
    for t in targets:
        if stream_tokens:
            problem = check_stream(t, path, body, stream_tokens)
        else:
            status, raw = post(t, path, body, timeout_s=30.0)
            problem = None if status == 200 else f"HTTP {status}: {raw[:200]!r}"
        if problem is None:
            kept.append(t)
        else:
            note(out, f"{t.name} {path}: wrong answer, left out: {problem}")
    return kept


def rounds(
    s: Settings,
    targets: Sequence[Target],
    node: Target,
    run: Callable[[Target], wrk.WrkResult],
    count: int,
    label: str,
) -> dict[str, Series]:
    """``count`` rounds of ``run`` over every target, rotating who goes first."""
    series = {t.name: Series(t.name) for t in targets}
    for r in range(count):
        k = r % len(targets)
        for t in [*targets[k:], *targets[:k]]:
            proxy = t.proc if t is not node else None
            with measure(proxy, s.layout.proxy) as pu, measure(node.proc, s.layout.node) as nu:
                result = run(t)
            sample = Sample(result, pu[0] if pu else None, nu[0] if nu else None)
            series[t.name].samples.append(sample)
        summary = "  ".join(f"{n} {x.samples[-1].result.rps:,.0f}/s" for n, x in series.items())
        print(f"  {label} round {r + 1}/{count}: {summary}", flush=True)
    return series


def wrk_runner(
    s: Settings,
    requests: Sequence[tuple[str, bytes]],
    connections: int,
    seconds: float,
    extra_headers: dict[str, str] | None = None,
) -> Callable[[Target], wrk.WrkResult]:
    def run(t: Target) -> wrk.WrkResult:
        headers = {**t.headers, **(extra_headers or {})}
        return wrk.run(
            t.base,
            requests,
            connections=connections,
            seconds=seconds,
            headers=headers,
            cpus=s.layout.client,
        )

    return run
