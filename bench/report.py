"""Tables on stdout, JSON and PNG files under ``bench/results/``."""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def median(values: Iterable[float]) -> float:
    data = [v for v in values if not math.isnan(v)]
    return statistics.median(data) if data else float("nan")


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def fmt(value: object, digits: int = 2) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


@dataclass
class Check:
    """One target: ``what`` measured ``value``; ``ok`` says whether it met ``goal``."""

    what: str
    value: str
    goal: str
    ok: bool

    @property
    def verdict(self) -> str:
        return "PASS" if self.ok else "FAIL"


@dataclass
class Table:
    title: str
    columns: Sequence[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, *cells: object, digits: int = 2) -> None:
        self.rows.append([fmt(c, digits) for c in cells])

    def render(self) -> str:
        widths = [len(c) for c in self.columns]
        for row in self.rows:
            widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
        lines = [self.title, ""]
        head = [self.columns[0].ljust(widths[0])]
        head += [c.rjust(w) for c, w in zip(self.columns[1:], widths[1:], strict=True)]
        lines.append("  ".join(head))
        lines.append("  ".join("-" * w for w in widths))
        for row in self.rows:
            cells = [row[0].ljust(widths[0])]
            cells += [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]
            lines.append("  ".join(cells))
        lines += [f"  {note}" for note in self.notes]
        return "\n".join(lines)


def checks_table(title: str, checks: Sequence[Check]) -> Table:
    table = Table(title, ["target", "measured", "goal", "result"])
    for c in checks:
        table.rows.append([c.what, c.value, c.goal, c.verdict])
    return table


@dataclass
class Outcome:
    """What one scenario produced: tables to print, checks, and raw data for the JSON file."""

    name: str
    tables: list[Table] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    skipped: str = ""

    def print(self) -> None:
        print(f"\n=== {self.name} ===", flush=True)
        if self.skipped:
            print(f"skipped: {self.skipped}", flush=True)
            return
        for table in self.tables:
            print("\n" + table.render(), flush=True)
        if self.checks:
            print("\n" + checks_table(f"{self.name}: targets", self.checks).render(), flush=True)


def cortex_source() -> str:
    """The commit plus a hash of ``cortex/**/*.py`` as they are now: the tree is shared and
    edited while benchmarks run, so each scenario records which code it measured."""
    root = Path(__file__).resolve().parents[1]
    head = subprocess.run(
        ["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    digest = hashlib.sha1()
    for path in sorted((root / "cortex").rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return f"{head or '?'} + cortex/ tree {digest.hexdigest()[:10]}"


def machine() -> dict[str, Any]:
    load1, load5, _ = os.getloadavg()
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "cpus": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "loadavg_1m_5m_at_start": [round(load1, 2), round(load5, 2)],
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def write_json(stamp: str, run: dict[str, Any], outcomes: Sequence[Outcome]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    doc = {
        **run,
        "scenarios": {
            o.name: {
                "skipped": o.skipped,
                "checks": [c.__dict__ | {"result": c.verdict} for c in o.checks],
                "data": o.data,
            }
            for o in outcomes
        },
    }
    path = RESULTS / f"run-{stamp}.json"
    text = json.dumps(doc, indent=2, default=str)
    path.write_text(text)
    (RESULTS / "latest.json").write_text(text)
    return path


def plot_streams(
    stamp: str, levels: Sequence[int], series: dict[str, dict[str, list[float]]]
) -> Path | None:
    """streams/s and TTFT p50/p99 against concurrency, one line per target."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (rate_ax, ttft_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, s in series.items():
        rate_ax.plot(levels, s["streams_per_s"], marker="o", label=name)
        line = ttft_ax.plot(levels, s["ttft_p50"], marker="o", label=f"{name} p50")[0]
        ttft_ax.plot(
            levels, s["ttft_p99"], marker="x", ls="--", color=line.get_color(), label=f"{name} p99"
        )
    rate_ax.set(
        xlabel="concurrent streams", ylabel="streams / s", title="completed streams per second"
    )
    ttft_ax.set(xlabel="concurrent streams", ylabel="ms", title="time to first token")
    for ax in (rate_ax, ttft_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("streams: 64 tokens at 50 tok/s per stream (paced emulated node)")
    fig.tight_layout()
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"streams-{stamp}.png"
    fig.savefig(path, dpi=110)
    fig.savefig(RESULTS / "streams-latest.png", dpi=110)
    plt.close(fig)
    return path
