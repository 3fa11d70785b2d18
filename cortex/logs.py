"""Logging: the ``cortex`` logger to stderr, as text or JSON lines, and the access log.

Structured fields ride on a record as ``extra={"fields": {...}}``: the JSON
formatter merges them into the line's object, the text formatter appends
them as ``key=value`` pairs (values quoted when they hold spaces, quotes or
control characters, so one record is always one line). :func:`access` writes
one such line per request on ``cortex.access``; :class:`RequestRecord` holds
no credentials, and only its fields are logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import sys
import time
from collections.abc import Callable
from typing import IO, TYPE_CHECKING, Literal

import orjson

if TYPE_CHECKING:
    from cortex.metrics import RequestRecord

_CORTEX = logging.getLogger("cortex")
ACCESS = logging.getLogger("cortex.access")
LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}
Format = Literal["text", "json"]


def setup(level: str = "info", fmt: Format = "text", *, stream: IO[str] | None = None) -> None:
    """Send the ``cortex`` loggers to ``stream`` (stderr: journald reads it).

    Calling it again replaces the handler it installed before.
    """
    value = LEVELS.get(level.lower())
    if value is None:
        raise ValueError(f"log level {level!r}: expected one of {', '.join(LEVELS)}")
    if fmt not in ("text", "json"):
        raise ValueError(f"log format {fmt!r}: expected text or json")
    global _handler
    logger = logging.getLogger("cortex")
    for old in [h for h in logger.handlers if isinstance(h, _Handler)]:
        logger.removeHandler(old)
    handler = _Handler(sys.stderr if stream is None else stream)
    formatter = JsonFormatter() if fmt == "json" else TextFormatter()
    handler.setFormatter(formatter)
    logger.addHandler(handler)
    _handler = handler
    handler.access_line = formatter.access_line
    logger.setLevel(value)
    logger.propagate = False


class _Handler(logging.StreamHandler[IO[str]]):
    """The handler :func:`setup` installs (so a second call can find it).

    Inside a running event loop, lines are gathered and written once per loop
    iteration: one write for many access lines instead of a write and a flush
    each (measured: about a quarter of cortex's CPU per request at the relay
    benchmark's rate). Outside a loop, and on :meth:`flush`, they go out at once.
    """

    def __init__(self, stream: IO[str]) -> None:
        super().__init__(stream)
        self._pending: list[str] = []
        self._scheduled = False
        self.access_line: Callable[[RequestRecord], str] | None = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.add(self.format(record))
        except Exception:
            self.handleError(record)

    def add(self, line: str) -> None:
        """Queue one formatted line; it is written at the end of this loop iteration."""
        self._pending.append(line)
        if self._scheduled:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        self._scheduled = True
        loop.call_soon(self.flush)

    def flush(self) -> None:
        self._scheduled = False
        if self._pending:
            lines, self._pending = self._pending, []
            with contextlib.suppress(ValueError, OSError):  # stream closed at exit
                self.stream.write("\n".join(lines) + "\n")
        super().flush()


_handler: _Handler | None = None


def access(rec: RequestRecord) -> None:
    """One INFO line on ``cortex.access`` for a finished request.

    With the handler :func:`setup` installed, the line is formatted straight from
    the record, skipping ``LogRecord`` (the same text, at a fifth of the cost: it
    runs once per request); with any other handling, it goes through ``logging``.
    """
    if not ACCESS.isEnabledFor(logging.INFO):
        return
    handler = _handler
    line = handler.access_line if handler is not None else None
    if handler is None or line is None or ACCESS.handlers or handler not in _CORTEX.handlers:
        ACCESS.info("request", extra={"fields": access_fields(rec)})
        return
    handler.add(line(rec))


def access_fields(rec: RequestRecord) -> dict[str, object]:
    """The fields of an access line; times in milliseconds, ``None`` when unknown."""
    return {
        "request_id": rec.request_id,
        "client": rec.client,
        "dialect": rec.dialect,
        "endpoint": rec.endpoint,
        "model": rec.model,
        "node": rec.node,
        "status": rec.status,
        "stream": rec.stream,
        "prompt_tokens": rec.prompt_tokens,
        "completion_tokens": rec.completion_tokens,
        "estimated": rec.estimated,
        "ttft_ms": _ms(rec.first_token - rec.started) if rec.first_token else None,
        "latency_ms": _ms(rec.ended - rec.started),
        "queue_ms": _ms(rec.queue_wait_s),
        "load_ms": _ms(rec.load_wait_s),
        "error": rec.error,
    }


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


class _Clock:
    """ISO 8601 UTC timestamps with milliseconds; the seconds part is built once a second."""

    __slots__ = ("_prefix", "_second")

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def iso(self, created: float) -> str:
        second = int(created)
        if second != self._second:
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = second
        return f"{self._prefix}.{int((created - second) * 1000):03d}Z"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, msg, then the record's fields."""

    def __init__(self) -> None:
        super().__init__()
        self._clock = _Clock()

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "time": self._clock.iso(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if fields:
            out.update(fields)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=str).decode()

    def access_line(self, rec: RequestRecord) -> str:
        out: dict[str, object] = {
            "time": self._clock.iso(time.time()),
            "level": "info",
            "logger": ACCESS.name,
            "msg": "request",
        }
        out.update(access_fields(rec))
        return orjson.dumps(out).decode()


class TextFormatter(logging.Formatter):
    """``TIME LEVEL LOGGER MESSAGE key=value ...`` for people reading a terminal."""

    def __init__(self) -> None:
        super().__init__()
        self._clock = _Clock()

    def format(self, record: logging.LogRecord) -> str:
        line = f"{self._clock.iso(record.created)} {record.levelname} {record.name} {record.getMessage()}"
        fields = getattr(record, "fields", None)
        if fields:
            line += " " + " ".join(f"{k}={_text_value(v)}" for k, v in fields.items())
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line

    def access_line(self, rec: RequestRecord) -> str:
        """The same line :meth:`format` makes of :func:`access_fields`, built directly."""
        ttft = _ms(rec.first_token - rec.started) if rec.first_token else "-"
        return (
            f"{self._clock.iso(time.time())} INFO cortex.access request"
            f" request_id={_text_value(rec.request_id)} client={_label(rec.client)}"
            f" dialect={rec.dialect} endpoint={rec.endpoint} model={_label(rec.model)}"
            f" node={_label(rec.node)} status={rec.status}"
            f" stream={'true' if rec.stream else 'false'}"
            f" prompt_tokens={_text_value(rec.prompt_tokens)}"
            f" completion_tokens={_text_value(rec.completion_tokens)}"
            f" estimated={'true' if rec.estimated else 'false'} ttft_ms={ttft}"
            f" latency_ms={_ms(rec.ended - rec.started)} queue_ms={_ms(rec.queue_wait_s)}"
            f" load_ms={_ms(rec.load_wait_s)} error={_label(rec.error)}"
        )


# Printable ASCII but space, '"', '=' and '\\': left bare; anything else is JSON-quoted,
# so a value can neither split the line nor fake another field.
_BARE = re.compile(r"[!#-<>-\[\]-~]+")


_LABELS: dict[str, str] = {}
_MAX_LABELS = 1024


def _label(text: str) -> str:
    """:func:`_text_value` of a value that repeats (address, model, node, error), cached."""
    out = _LABELS.get(text)
    if out is None:
        if len(_LABELS) >= _MAX_LABELS:
            _LABELS.clear()
        out = _LABELS[text] = _text_value(text)
    return out


def _text_value(value: object) -> str:
    if value is None or value == "":
        return "-"
    if value is True or value is False:
        return "true" if value else "false"
    if type(value) is int or type(value) is float:
        return str(value)
    text = str(value)
    return text if _BARE.fullmatch(text) else orjson.dumps(text).decode()
