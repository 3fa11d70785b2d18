"""What each API dialect (chat, completions, responses, messages) hands the pipeline."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import orjson
from aiohttp import web

from cortex.sim.answer import Answer
from cortex.sim.config import SimModel

DONE = b"data: [DONE]\n\n"
KEEPALIVE = b":\n\n"
"""axum's default keep-alive: an empty SSE comment."""

FAULT_MESSAGE = "simulated engine failure (cortex sim fault error_after_chunks)"
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}


@dataclass(frozen=True, slots=True)
class Reply:
    """Per-answer constants: the node's counter id, the timestamp and the model."""

    id: str
    created: int
    model: SimModel


@dataclass(frozen=True, slots=True)
class SseBody:
    """A rendered stream, before faults are applied.

    `costs[i]` is how many tokens are generated before `frames[i]` is due;
    `done` ends a healthy stream (may be empty); `error` replaces the rest of the
    stream when a fault injects a mid-stream error.
    """

    frames: list[bytes]
    costs: list[int]
    done: bytes
    error: bytes


class Dialect(Protocol):
    """How one API renders answers and errors; the statuses are for errors before the first byte."""

    unknown_model_status: int
    invalid_status: int

    def stream(self, answer: Answer, reply: Reply) -> SseBody: ...

    def body(self, answer: Answer, reply: Reply) -> bytes: ...

    def error(self, status: int, message: str) -> web.Response: ...


def message_error(status: int, message: str) -> web.Response:
    """mistral.rs errors: `{"message": ...}`, not OpenAI's envelope."""
    return web.Response(
        status=status, body=orjson.dumps({"message": message}), content_type="application/json"
    )


def openai_stream_error(message: str) -> bytes:
    error = {"message": message, "type": "server_error", "param": None, "code": None}
    return b"data: " + orjson.dumps({"error": error}) + b"\n\n" + DONE


OPENAI_STREAM_ERROR = openai_stream_error(FAULT_MESSAGE)


def event(kind: str, payload: object) -> bytes:
    """One SSE frame with an `event:` line (Anthropic and Responses streams)."""
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"
