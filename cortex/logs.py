"""Logging: the ``cortex`` logger to stderr, as text or JSON lines, and the access log.

Structured fields ride on a record as ``extra={"fields": {...}}``: the JSON
formatter merges them into the line's object, the text formatter appends
them as ``key=value`` pairs (values quoted when they hold spaces, quotes or
control characters, so one record is always one line). :func:`access` writes
one such line per request on ``cortex.access``; :class:`RequestRecord` holds
no credentials, and only its fields are logged.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from typing import IO, TYPE_CHECKING, Literal

import orjson

if TYPE_CHECKING:
    from cortex.metrics import RequestRecord

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
    logger = logging.getLogger("cortex")
    for old in [h for h in logger.handlers if isinstance(h, _Handler)]:
        logger.removeHandler(old)
    handler = _Handler(sys.stderr if stream is None else stream)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    logger.addHandler(handler)
    logger.setLevel(value)
    logger.propagate = False


class _Handler(logging.StreamHandler[IO[str]]):
    """The handler :func:`setup` installs (so a second call can find it)."""


def access(rec: RequestRecord) -> None:
    """One INFO line on ``cortex.access`` for a finished request."""
    if ACCESS.isEnabledFor(logging.INFO):
        ACCESS.info("request", extra={"fields": access_fields(rec)})


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


# Printable ASCII but space, '"', '=' and '\\': left bare; anything else is JSON-quoted,
# so a value can neither split the line nor fake another field.
_BARE = re.compile(r"[!#-<>-\[\]-~]+")


def _text_value(value: object) -> str:
    if value is None or value == "":
        return "-"
    if value is True or value is False:
        return "true" if value else "false"
    text = str(value)
    return text if _BARE.fullmatch(text) else orjson.dumps(text).decode()
