"""One error hierarchy for cortex, and its two wire dialects.

Every failure a client can see is a :class:`CortexError` subclass carrying an
HTTP status and an OpenAI error type. :func:`body` renders it as OpenAI
(``{"error": {...}}``) or Anthropic (``{"type": "error", "error": {...}}``)
JSON; :func:`sse_frame` renders it as the event a stream ends with once its
headers are already sent. Node errors (mistral.rs answers ``{"message": ...}``
with 422 or 500) are translated once, here, by :func:`from_node`.
"""

from __future__ import annotations

import enum
from typing import ClassVar

import orjson


class Dialect(enum.Enum):
    """The API dialect a client speaks; errors are answered in it."""

    OPENAI = "openai"
    ANTHROPIC = "anthropic"


class CortexError(Exception):
    """Base of every error a client may receive."""

    status: ClassVar[int] = 500
    openai_type: ClassVar[str] = "server_error"
    default_code: ClassVar[str | None] = None

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code if code is not None else self.default_code
        self.param = param
        self.retry_after = retry_after


class BadRequest(CortexError):
    status = 400
    openai_type = "invalid_request_error"


class Unauthorized(CortexError):
    status = 401
    openai_type = "authentication_error"
    default_code = "invalid_api_key"


class Forbidden(CortexError):
    status = 403
    openai_type = "permission_error"


class NotFound(CortexError):
    status = 404
    openai_type = "invalid_request_error"
    default_code = "not_found"


class ModelNotFound(NotFound):
    default_code = "model_not_found"


class MethodNotAllowed(CortexError):
    status = 405
    openai_type = "invalid_request_error"


class PayloadTooLarge(CortexError):
    status = 413
    openai_type = "invalid_request_error"
    default_code = "request_too_large"


class UnsupportedMediaType(CortexError):
    status = 415
    openai_type = "invalid_request_error"


class NodeError(CortexError):
    """A node answered with an internal error of its own."""

    status = 500
    openai_type = "server_error"


class BadGateway(CortexError):
    """No node could be reached, or one broke the protocol."""

    status = 502
    openai_type = "server_error"
    default_code = "bad_gateway"


class Unavailable(CortexError):
    """No capacity right now: queue timeout, no node up, model cannot be placed."""

    status = 503
    openai_type = "server_error"
    default_code = "unavailable"


class GatewayTimeout(CortexError):
    status = 504
    openai_type = "server_error"
    default_code = "timeout"


class StreamCut(CortexError):
    """A stream ended without its terminator: the node dropped the sequence."""

    status = 502
    openai_type = "server_error"
    default_code = "stream_truncated"


_ANTHROPIC_BY_STATUS: dict[int, tuple[int, str]] = {
    400: (400, "invalid_request_error"),
    401: (401, "authentication_error"),
    403: (403, "permission_error"),
    404: (404, "not_found_error"),
    405: (405, "invalid_request_error"),
    413: (413, "request_too_large"),
    415: (400, "invalid_request_error"),
    429: (429, "rate_limit_error"),
    503: (529, "overloaded_error"),
}


def anthropic_status(err: CortexError) -> tuple[int, str]:
    """The HTTP status and error type Anthropic clients expect for ``err``."""
    return _ANTHROPIC_BY_STATUS.get(err.status, (500, "api_error"))


def status_for(err: CortexError, dialect: Dialect) -> int:
    if dialect is Dialect.ANTHROPIC:
        return anthropic_status(err)[0]
    return err.status


def payload(err: CortexError, dialect: Dialect) -> dict[str, object]:
    """The error envelope as a dict, in ``dialect``."""
    if dialect is Dialect.ANTHROPIC:
        return {
            "type": "error",
            "error": {"type": anthropic_status(err)[1], "message": err.message},
        }
    return {
        "error": {
            "message": err.message,
            "type": err.openai_type,
            "param": err.param,
            "code": err.code,
        }
    }


def body(err: CortexError, dialect: Dialect) -> bytes:
    """The error envelope as JSON bytes, in ``dialect``."""
    return orjson.dumps(payload(err, dialect))


def sse_frame(err: CortexError, dialect: Dialect) -> bytes:
    """The SSE event that ends a stream whose headers were already sent."""
    data = body(err, dialect)
    if dialect is Dialect.ANTHROPIC:
        return b"event: error\ndata: " + data + b"\n\n"
    return b"data: " + data + b"\n\n"


def headers_for(err: CortexError) -> dict[str, str]:
    if err.retry_after is None:
        return {}
    return {"Retry-After": str(max(1, round(err.retry_after)))}


def from_node(status: int, raw: bytes) -> CortexError:
    """Translate a node's own error answer (``{"message": ...}``) into a cortex error."""
    message = _node_message(raw) or f"node answered HTTP {status}"
    if status == 422 or status == 400:
        return BadRequest(message)
    if status == 404:
        return NotFound(message)
    if status == 413:
        return PayloadTooLarge(message)
    if "is not available" in message:
        return ModelNotFound(message)
    if "is being reloaded" in message:
        return Unavailable(message, retry_after=1.0)
    if status == 503 or status == 429:
        return Unavailable(message, retry_after=1.0)
    return NodeError(message)


def _node_message(raw: bytes) -> str:
    try:
        decoded = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return raw.decode("utf-8", "replace").strip()[:500]
    if isinstance(decoded, dict):
        msg = decoded.get("message")
        if isinstance(msg, str):
            return msg
        inner = decoded.get("error")
        if isinstance(inner, dict) and isinstance(inner.get("message"), str):
            return str(inner["message"])
        if isinstance(inner, str):
            return inner
    return raw.decode("utf-8", "replace").strip()[:500]
