"""How long and how hard each scenario runs, decided once from the command line."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from bench.procs import Layout


@dataclass(frozen=True)
class Settings:
    quick: bool
    layout: Layout
    workdir: Path
    stamp: str
    profile: bool = False
    connections: int = 64  # wrk connections of relay, anthropic, soak
    rounds: int = 5  # interleaved rounds of relay and anthropic
    seconds: float = 5.0  # one wrk run of relay and anthropic
    overhead_rounds: int = 7
    overhead_seconds: float = 2.0
    peer_overhead_rounds: int = 7
    peer_chunked: bool = True  # peers also run the relay with 100 node writes per answer
    levels: tuple[int, ...] = (100, 250, 500, 1000)  # concurrent streams of the sweep
    stream_seconds: float = 8.0  # measured window of one streams run
    stream_rounds: int = 3
    stream_nginx: bool = True
    soak_requests: int = 1_000_000
    soak_sample_s: float = 10.0

    @classmethod
    def make(
        cls,
        *,
        quick: bool,
        layout: Layout,
        workdir: Path,
        stamp: str,
        profile: bool,
        soak_requests: int,
    ) -> Settings:
        full = cls(quick, layout, workdir, stamp, profile=profile, soak_requests=soak_requests)
        if not quick:
            return full
        return replace(
            full,
            rounds=2,
            seconds=2.0,
            overhead_seconds=1.0,
            peer_overhead_rounds=3,
            peer_chunked=False,
            levels=(100, 250),
            stream_seconds=3.0,
            stream_rounds=2,
            stream_nginx=False,
        )
