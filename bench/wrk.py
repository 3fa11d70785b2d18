"""Throughput and latency with wrk: a generated Lua script POSTs the bodies, ``done()`` prints JSON.

wrk is a C event loop that spends a few microseconds per request, so the
proxy or the node saturates long before it does.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.procs import pinned

_MARK = "WRKJSON "

_DONE = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '%s{"requests":%d,"duration_us":%d,"bytes":%d,"connect":%d,"read":%d,"write":%d,' ..
    '"status":%d,"timeout":%d,"p50":%.1f,"p90":%.1f,"p99":%.1f,"p999":%.1f,"mean":%.1f,' ..
    '"max":%.1f}\\n',
    "{mark}", summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write,
    e.status, e.timeout, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency:percentile(99.9), latency.mean, latency.max))
end
"""


@dataclass(frozen=True)
class WrkResult:
    """One wrk run; latencies in milliseconds, ``errors`` = socket errors + non-2xx/3xx."""

    requests: int
    seconds: float
    errors: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    p999_ms: float
    mean_ms: float
    max_ms: float

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def available() -> bool:
    return shutil.which("wrk") is not None


def lua_script(requests: Sequence[tuple[str, bytes]], headers: dict[str, str]) -> str:
    """POST each ``(path, body)`` in turn (one of them: always the same request)."""
    lines = ['wrk.method = "POST"', 'wrk.headers["Content-Type"] = "application/json"']
    lines += [f"wrk.headers[ {_lua_str(k)} ] = {_lua_str(v)}" for k, v in headers.items()]
    formatted = ", ".join(
        f"wrk.format(nil, {_lua_str(path)}, nil, {_lua_str(body.decode())})"
        for path, body in requests
    )
    lines += [  # formatted in init(): wrk sets the Host header just before calling it
        "local reqs, n, i = {}, 0, 0",
        f"init = function(args) reqs = {{ {formatted} }}; n = #reqs end",
        "request = function() i = i % n + 1; return reqs[i] end",
    ]
    return "\n".join(lines) + _DONE.replace("{mark}", _MARK)


def _lua_str(text: str) -> str:
    if "]==]" in text:
        raise ValueError("cannot quote this string for Lua")
    return f"[==[{text}]==]"


def run(
    base_url: str,
    requests: Sequence[tuple[str, bytes]],
    *,
    connections: int,
    seconds: float,
    headers: dict[str, str] | None = None,
    cpus: frozenset[int] = frozenset(),
    threads: int = 1,
    timeout_s: float = 30.0,
) -> WrkResult:
    """Run wrk against ``base_url`` for ``seconds`` with ``connections`` keep-alive connections."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(lua_script(requests, headers or {}))
        script = Path(f.name)
    argv = ["wrk", "-t", str(min(threads, connections)), "-c", str(connections)]
    argv += ["-d", f"{max(seconds, 1):.0f}s", "--timeout", f"{timeout_s:.0f}s"]
    argv += ["-s", str(script), base_url]
    try:
        done = subprocess.run(
            pinned(argv, cpus), capture_output=True, text=True, timeout=seconds + timeout_s + 30
        )
    finally:
        script.unlink(missing_ok=True)
    return parse(done.stdout, done.stderr)


def parse(stdout: str, stderr: str = "") -> WrkResult:
    line = next((ln for ln in stdout.splitlines() if ln.startswith(_MARK)), None)
    if line is None or ".lua:" in stderr:
        raise RuntimeError(f"wrk printed no result:\n{stdout[-2000:]}\n{stderr[-2000:]}")
    d = json.loads(line[len(_MARK) :])
    errors = sum(d[k] for k in ("connect", "read", "write", "status", "timeout"))
    ms = {k: d[k] / 1000.0 for k in ("p50", "p90", "p99", "p999", "mean", "max")}
    return WrkResult(
        requests=d["requests"],
        seconds=d["duration_us"] / 1e6,
        errors=errors,
        p50_ms=ms["p50"],
        p90_ms=ms["p90"],
        p99_ms=ms["p99"],
        p999_ms=ms["p999"],
        mean_ms=ms["mean"],
        max_ms=ms["max"],
    )
