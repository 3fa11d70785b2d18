"""Where cortex spends its CPU under load: py-spy records a flame graph (SVG) and raw stacks,
summarised here as the top functions by own ("self") and inclusive time.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from bench.procs import pinned
from bench.report import RESULTS, Table
from bench.settings import Settings

RATE_HZ = 200
TOP = 20
_ROOT = str(Path(__file__).resolve().parents[1]) + "/"
_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*)\)$")


def py_spy() -> str | None:
    local = Path(sys.executable).parent / "py-spy"
    return str(local) if local.is_file() else shutil.which("py-spy")


def record(
    pid: int, seconds: float, s: Settings, load: Callable[[], object], name: str, label: str
) -> list[Table]:
    """Sample ``pid`` while ``load()`` runs; write ``<name>-<stamp>.svg/.txt``; summarise."""
    binary = py_spy()
    if binary is None:
        return [Table("profile: py-spy is not installed (pip install py-spy)", ["-"])]
    RESULTS.mkdir(parents=True, exist_ok=True)
    svg, raw = RESULTS / f"{name}-{s.stamp}.svg", RESULTS / f"{name}-{s.stamp}.txt"
    base = [binary, "record", "--pid", str(pid), "--duration", f"{seconds:.0f}"]
    base += ["--rate", str(RATE_HZ), "--nonblocking"]
    spies = [
        subprocess.Popen(
            pinned(argv, s.layout.client), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        for argv in (
            [*base, "--format", "flamegraph", "-o", str(svg)],
            [*base, "--format", "raw", "--nolineno", "-o", str(raw)],
        )
    ]
    try:
        load()
    finally:
        for spy in spies:
            spy.wait(seconds + 30)
    if not raw.is_file():
        err = spies[1].stderr.read().decode(errors="replace") if spies[1].stderr else ""
        return [Table(f"profile: py-spy failed: {err.strip()[-300:]}", ["-"])]
    if svg.is_file():
        shutil.copyfile(svg, RESULTS / f"{name}-latest.svg")
    return summarise(raw.read_text(), seconds, label, f"{svg.name} / {raw.name}")


def summarise(text: str, seconds: float, label: str, files: str = "") -> list[Table]:
    """Top functions by own and inclusive time, and own time by file, in % of busy samples.

    Frames up to the event loop's ``run`` (click, runpy, ``cortex serve``) are cut off;
    a sample with nothing above the loop is time in uvloop's own C code (polling,
    socket reads and writes, scheduling callbacks), shown as ``EVENT_LOOP``.
    """
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    by_file: Counter[str] = Counter()
    total = 0
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = _above_loop([_name(f) for f in stack.split(";")])
        total += n
        own[frames[-1][0]] += n
        by_file[frames[-1][1]] += n
        for func in {f for f, _ in frames}:
            incl[func] += n
    if not total:
        return [Table("profile: no samples (was cortex busy?)", ["-"])]
    busy = 100.0 * total / (seconds * RATE_HZ)
    head = f"cortex under relay '{label}', {total} samples in {seconds:g} s (busy ~{busy:.0f}%)"
    tables = [
        _top(f"profile, own time (% of busy samples): {head}", own, total),
        _top("profile, inclusive time (a function and all it calls)", incl, total),
        _top("profile, own time by file", by_file, total, "file"),
    ]
    if files:
        tables[-1].notes.append(f"flame graph and raw stacks: bench/results/{files}")
    return tables


EVENT_LOOP = ("EVENT_LOOP (uvloop C code: epoll, socket I/O, callbacks)", "uvloop")
_LOOP_FRAMES = ("run (uvloop/__init__.py)", "Runner.run (asyncio/runners.py)")


def _above_loop(frames: list[tuple[str, str]]) -> list[tuple[str, str]]:
    cut = max((i for i, (f, _) in enumerate(frames) if f in _LOOP_FRAMES), default=-1)
    return frames[cut + 1 :] or [EVENT_LOOP]


def _top(title: str, counts: Counter[str], total: int, what: str = "function") -> Table:
    table = Table(title, [what, "%", "samples"])
    for name, n in counts.most_common(TOP):
        table.add(name, 100.0 * n / total, n, digits=1)
    return table


def _name(frame: str) -> tuple[str, str]:
    """``"write (/x/site-packages/aiohttp/http_writer.py)"`` -> (``"write (aiohttp/http_writer.py)"``, file)."""
    m = _FRAME.match(frame)
    if m is None:
        return frame, frame
    path = m.group("file")
    for marker in ("site-packages/", "/lib/python3.", _ROOT):
        if marker in path:
            path = path.split(marker, 1)[1]
            path = path.split("/", 1)[1] if marker == "/lib/python3." else path
            break
    return f"{m.group('func')} ({path})", path
