"""Subprocesses of a benchmark: start pinned, wait for health, sample /proc, always stop.

A :class:`Procs` owns every process it started and stops them all (SIGTERM, then
SIGKILL) when its ``with`` block ends, whatever ended it: an error, Ctrl-C or a
SIGTERM to the harness (see :func:`interrupt_on_signals`).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, TracebackType

_PR_SET_PDEATHSIG = 1
_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def interrupt_on_signals() -> None:
    """Ctrl-C and SIGTERM both raise KeyboardInterrupt, so every ``finally`` stops its processes.

    SIGINT is set explicitly: a harness started in the background by a shell
    inherits it ignored.
    """

    def _interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass(frozen=True)
class Layout:
    """Which CPUs each role runs on; empty sets mean "not pinned"."""

    client: frozenset[int] = frozenset()
    node: frozenset[int] = frozenset()
    proxy: frozenset[int] = frozenset()

    @classmethod
    def choose(cls, pin: bool) -> Layout:
        cpus = sorted(os.sched_getaffinity(0))
        if not pin or len(cpus) < 2:
            return cls()
        first, last = frozenset(cpus[:1]), frozenset(cpus[1:])
        return cls(client=first, node=first, proxy=last)

    def describe(self) -> str:
        if not self.proxy:
            return "not pinned (--no-pin, or fewer than 2 CPUs)"
        return (
            f"load generator + harness + emulated node -> CPU {_cpus(self.client)}; "
            f"proxy under test (cortex / nginx / peers) -> CPU {_cpus(self.proxy)}"
        )


def _cpus(cpus: frozenset[int]) -> str:
    return ",".join(str(c) for c in sorted(cpus))


def pinned(argv: Sequence[str], cpus: frozenset[int]) -> list[str]:
    """``argv`` under ``taskset`` so that every thread it ever starts stays on ``cpus``."""
    if not cpus or shutil.which("taskset") is None:
        return list(argv)
    return ["taskset", "-c", _cpus(cpus), *argv]


def pin_self(cpus: frozenset[int]) -> None:
    if cpus:
        os.sched_setaffinity(0, cpus)


@dataclass
class Proc:
    """One started process, its log file, and how to read its CPU time and memory."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, lines: int = 15) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def tree(self) -> list[int]:
        """This process and all its descendants (nginx workers, uvicorn workers)."""
        return [self.pid, *_descendants(self.pid)]

    def stop(self, grace_s: float = 5.0) -> None:
        if self.popen.poll() is not None:
            return
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(grace_s)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(5.0)


def _die_with_parent() -> None:
    """In the child: get SIGTERM if the harness dies without stopping us (kill -9)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class ProcessDied(RuntimeError):
    """A process exited or never got ready; the message ends with its log's last lines."""

    def brief(self) -> str:
        lines = [ln.strip() for ln in str(self).splitlines() if ln.strip()]
        return " | ".join([lines[0], *lines[1:][-3:]]) if lines else "?"


@dataclass
class Procs:
    """The processes of one scenario, stopped in reverse start order on exit."""

    workdir: Path
    started: list[Proc] = field(default_factory=list)

    def __enter__(self) -> Procs:
        self.workdir.mkdir(parents=True, exist_ok=True)
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop_all()

    def start(
        self,
        name: str,
        argv: Sequence[str],
        cpus: frozenset[int] = frozenset(),
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> Proc:
        log = self.workdir / f"{name}.log"
        with log.open("wb") as out:
            popen = subprocess.Popen(
                pinned(argv, cpus),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **(env or {})},
                cwd=cwd,
                start_new_session=True,  # Ctrl-C in the terminal reaches the harness only
                preexec_fn=_die_with_parent,
            )
        proc = Proc(name, popen, log)
        self.started.append(proc)
        return proc

    def stop(self, proc: Proc) -> None:
        proc.stop()
        if proc in self.started:
            self.started.remove(proc)

    def stop_all(self) -> None:
        while self.started:
            proc = self.started.pop()
            try:
                proc.stop()
            except BaseException:  # keep stopping the others, even on a second Ctrl-C
                with contextlib.suppress(OSError):
                    proc.popen.kill()
                raise


def wait_until(
    proc: Proc, ready: Callable[[], bool], timeout_s: float = 30.0, what: str = "ready"
) -> None:
    """Poll ``ready()`` until it is true; fail with the process's log if it died or timed out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not proc.alive():
            raise ProcessDied(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.tail()}")
        if ready():
            return
        time.sleep(0.1)
    raise ProcessDied(f"{proc.name} not {what} after {timeout_s:g} s:\n{proc.tail()}")


def http_ok(url: str, timeout_s: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            return 200 <= int(resp.status) < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


# --- /proc sampling ------------------------------------------------------------


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        stat = _read(f"/proc/{entry}/stat")
        if stat:
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    out: list[int] = []
    todo = list(children.get(pid, []))
    while todo:
        child = todo.pop()
        out.append(child)
        todo.extend(children.get(child, []))
    return out


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU time of ``pids`` (all their threads), in seconds."""
    total = 0
    for pid in pids:
        stat = _read(f"/proc/{pid}/stat")
        if stat:
            fields = stat.rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total / _TICKS


def rss_mb(pids: Sequence[int]) -> float:
    total = 0
    for pid in pids:
        statm = _read(f"/proc/{pid}/statm").split()
        if statm:
            total += int(statm[1]) * _PAGE
    return total / 2**20


def _status_kb(pid: int, key: str) -> int:
    for line in _read(f"/proc/{pid}/status").splitlines():
        if line.startswith(key):
            return int(line.split()[1])
    return 0


def reset_peak(pids: Sequence[int]) -> None:
    """Reset VmHWM (peak RSS) so the next :func:`peak_rss_mb` covers one run only."""
    for pid in pids:
        with contextlib.suppress(OSError), open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")


def peak_rss_mb(pids: Sequence[int]) -> float:
    return sum(_status_kb(pid, "VmHWM:") for pid in pids) / 1024


def core_ticks(cpus: frozenset[int]) -> tuple[int, int]:
    """(busy, total) jiffies of ``cpus`` so far, from /proc/stat."""
    busy = total = 0
    for line in _read("/proc/stat").splitlines():
        name, *fields = line.split()
        if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in cpus:
            continue
        ticks = [int(f) for f in fields[:8]]
        idle = ticks[3] + ticks[4]  # idle + iowait
        busy += sum(ticks) - idle
        total += sum(ticks)
    return busy, total


@dataclass
class Usage:
    """CPU and memory a process tree used over one measured run.

    ``core_pct`` is how busy the CPUs it is pinned to were, whoever used them:
    ``core_pct - cpu_pct`` is what other processes (other people's tests) took.
    """

    cpu_pct: float
    rss_mb: float
    peak_rss_mb: float
    core_pct: float = float("nan")

    @property
    def others_pct(self) -> float:
        return self.core_pct - self.cpu_pct


@contextlib.contextmanager
def measure(proc: Proc | None, cpus: frozenset[int] = frozenset()) -> Iterator[list[Usage]]:
    """Measure ``proc``'s CPU% and peak RSS over the ``with`` block; yields a 1-item list."""
    out: list[Usage] = []
    if proc is None:
        yield out
        return
    pids = proc.tree()
    reset_peak(pids)
    cpu0, t0, core0 = cpu_seconds(pids), time.monotonic(), core_ticks(cpus)
    yield out
    wall = max(time.monotonic() - t0, 1e-9)
    cpu = cpu_seconds(pids) - cpu0
    busy, total = (b - a for a, b in zip(core0, core_ticks(cpus), strict=True))
    core = 100.0 * len(cpus) * busy / total if total else float("nan")
    out.append(Usage(100.0 * cpu / wall, rss_mb(pids), peak_rss_mb(pids), core))
