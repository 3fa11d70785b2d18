"""``python -m cortex ...`` as a real process, its output read line by line as it comes.

For what only a process shows: signals, exit codes, sd_notify, the console.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
from collections.abc import Mapping
from pathlib import Path


class Cortex:
    """One ``cortex`` process; stdout and stderr merged into :attr:`lines`."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self._seen = 0
        self._more = asyncio.Event()
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def spawn(
        cls, *args: str, env: Mapping[str, str] | None = None, cwd: Path | None = None
    ) -> Cortex:
        """Start ``python -m cortex ARGS`` with no CORTEX_* or NOTIFY_SOCKET inherited."""
        clean = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("CORTEX_") and k != "NOTIFY_SOCKET"
        }
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "cortex",
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env={**clean, **(env or {})},
            cwd=cwd,
        )
        return cls(proc)

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        async for raw in self.proc.stdout:
            self.lines.append(raw.decode(errors="replace").rstrip("\n"))
            self._more.set()
        self._more.set()

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    async def expect(self, pattern: str, within: float = 10.0) -> re.Match[str]:
        """The next line (after the last one matched) that matches ``pattern``."""
        regex = re.compile(pattern)
        try:
            async with asyncio.timeout(within):
                while True:
                    for i in range(self._seen, len(self.lines)):
                        m = regex.search(self.lines[i])
                        if m:
                            self._seen = i + 1
                            return m
                    if self._reader.done():
                        break
                    self._more.clear()
                    await self._more.wait()
        except TimeoutError:
            pass
        raise AssertionError(f"no line matching {pattern!r}; output so far:\n{self.output}")

    async def url(self) -> str:
        """The API's base URL, from the gateway's "listening on" line."""
        m = await self.expect(r"cortex listening on (https?://\S+)")
        return m.group(1)

    def send(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    async def exit_code(self, within: float) -> int:
        """Wait for the process to end (and its output to be read); fail after ``within`` s."""
        try:
            async with asyncio.timeout(within):
                code = await self.proc.wait()
                await self._reader
        except TimeoutError:
            raise AssertionError(
                f"still running after {within} s; output:\n{self.output}"
            ) from None
        return code

    async def close(self) -> None:
        """Kill it if it still runs, and reap it."""
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
        await self.proc.wait()
        await self._reader
