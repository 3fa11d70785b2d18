"""cortex.logs: the two line formats, the access line, and what never gets logged."""

from __future__ import annotations

import dataclasses
import io
import logging
import re
from collections.abc import Iterator

import orjson
import pytest

from cortex import logs
from cortex.metrics import Metrics, RequestRecord

ISO_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
ACCESS_KEYS = [
    "request_id",
    "client",
    "dialect",
    "endpoint",
    "model",
    "node",
    "status",
    "stream",
    "prompt_tokens",
    "completion_tokens",
    "estimated",
    "ttft_ms",
    "latency_ms",
    "queue_ms",
    "load_ms",
    "error",
]


@pytest.fixture(autouse=True)
def restore_cortex_logger() -> Iterator[None]:
    logger = logging.getLogger("cortex")
    saved = (logger.handlers[:], logger.level, logger.propagate)
    yield
    logger.handlers[:], logger.level, logger.propagate = saved


def record(**kw: object) -> RequestRecord:
    fields: dict[str, object] = {
        "request_id": "req-7",
        "client": "10.0.0.9",
        "model": "m1",
        "node": "a",
        "endpoint": "chat",
        "status": 200,
        "stream": True,
        "started": 100.0,
        "ended": 102.5,
        "upstream_sent": 100.001,
        "first_token": 100.25,
        "queue_wait_s": 0.0105,
        "prompt_tokens": 12,
        "completion_tokens": 34,
    }
    fields.update(kw)
    return RequestRecord(**fields)  # type: ignore[arg-type]


def test_json_access_lines() -> None:
    out = io.StringIO()
    logs.setup("info", "json", stream=out)
    logs.access(record())
    logs.access(record(request_id="req-8", first_token=0.0, completion_tokens=None, error="Boom"))
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    first, second = (orjson.loads(line) for line in lines)
    assert ISO_MS.match(first.pop("time"))
    assert first == {
        "level": "info",
        "logger": "cortex.access",
        "msg": "request",
        "request_id": "req-7",
        "client": "10.0.0.9",
        "dialect": "openai",
        "endpoint": "chat",
        "model": "m1",
        "node": "a",
        "status": 200,
        "stream": True,
        "prompt_tokens": 12,
        "completion_tokens": 34,
        "estimated": False,
        "ttft_ms": 250.0,
        "latency_ms": 2500.0,
        "queue_ms": 10.5,
        "load_ms": 0.0,
        "error": "",
    }
    assert second["ttft_ms"] is None
    assert second["completion_tokens"] is None
    assert second["error"] == "Boom"


def test_text_access_lines() -> None:
    out = io.StringIO()
    logs.setup("info", "text", stream=out)
    logs.access(record())
    logs.access(record(model="", node="", error='bad "thing"\nsecond line', status=502))
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    time, level, name, msg, *pairs = lines[0].split(" ")
    assert ISO_MS.match(time)
    assert (level, name, msg) == ("INFO", "cortex.access", "request")
    assert [p.split("=", 1)[0] for p in pairs] == ACCESS_KEYS
    fields = dict(p.split("=", 1) for p in pairs)
    assert fields["request_id"] == "req-7"
    assert fields["ttft_ms"] == "250.0"
    assert fields["stream"] == "true"
    assert fields["error"] == "-"
    # Unknown values read "-"; awkward ones are quoted and stay on their line.
    assert " model=- node=- status=502 " in lines[1]
    assert lines[1].endswith(' error="bad \\"thing\\"\\nsecond line"')


def test_plain_messages_and_exceptions() -> None:
    out = io.StringIO()
    logs.setup("debug", "json", stream=out)
    log = logging.getLogger("cortex.test")
    log.debug("hello %s", "there", extra={"fields": {"node": "a"}})
    try:
        raise ValueError("nope")
    except ValueError:
        log.exception("failed")
    first, second = (orjson.loads(line) for line in out.getvalue().splitlines())
    assert (first["level"], first["msg"], first["node"]) == ("debug", "hello there", "a")
    assert second["level"] == "error"
    assert "ValueError: nope" in second["exc"]

    out = io.StringIO()
    logs.setup("info", "text", stream=out)
    log.info("ready", extra={"fields": {"port": 8000}})
    assert out.getvalue().endswith(" INFO cortex.test ready port=8000\n")


def test_level_filters_access_lines() -> None:
    out = io.StringIO()
    logs.setup("warning", "text", stream=out)
    logs.access(record())
    assert out.getvalue() == ""


def test_setup_replaces_its_handler() -> None:
    first, second = io.StringIO(), io.StringIO()
    logs.setup("info", "text", stream=first)
    logs.setup("INFO", "json", stream=second)
    logs.access(record())
    assert first.getvalue() == ""
    assert len(second.getvalue().splitlines()) == 1
    assert logging.getLogger("cortex").propagate is False


def test_setup_rejects_unknown_options() -> None:
    with pytest.raises(ValueError, match="log level 'loud'"):
        logs.setup("loud")
    with pytest.raises(ValueError, match="log format 'xml'"):
        logs.setup("info", "xml")  # type: ignore[arg-type]


def test_metrics_record_writes_one_access_line() -> None:
    out = io.StringIO()
    logs.setup("info", "json", stream=out)
    Metrics().record(record())
    (line,) = out.getvalue().splitlines()
    assert orjson.loads(line)["request_id"] == "req-7"


def test_nothing_secret_can_reach_the_access_log() -> None:
    # The access line is built from these fields only; a new field must be reviewed here.
    names = [f.name for f in dataclasses.fields(RequestRecord)]
    assert not [n for n in names if re.search(r"key|auth|secret|password|bearer|header", n)]
    assert list(logs.access_fields(record())) == ACCESS_KEYS
    out = io.StringIO()
    logs.setup("debug", "json", stream=out)
    logs.access(record())
    assert not re.search(r"(?i)authorization|api.?key|bearer|sk-", out.getvalue())
