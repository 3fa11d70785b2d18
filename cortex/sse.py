"""Pure SSE helpers: the per-chunk tap of the hot path, and a frame splitter.

:class:`Tap` watches an OpenAI-style stream (or an Anthropic one, when a node
serves ``/v1/messages`` natively) without copying it: it stamps the first
token, counts frames, and decodes with msgspec only the lines that carry
``usage`` or an ``error``. Chunks may split lines anywhere; only an unfinished
last line is carried over to the next chunk.

:class:`DataSplitter` is for code that must read every event (the Anthropic
translator): it returns each complete ``data:`` payload.
"""

from __future__ import annotations

import re
import time

import msgspec

DONE_FRAME = b"data: [DONE]\n\n"

# The first frame that carries generated text, reasoning or a tool call.
_FIRST_TOKEN = re.compile(
    rb'"(?:content|reasoning_content|text|partial_json|thinking)":\s*"[^"]|"tool_calls":\s*\[\{'
)
_USAGE = re.compile(rb'"usage":\s*\{')


class Usage(msgspec.Struct, omit_defaults=True):
    """Token counts, OpenAI (prompt/completion) or Anthropic (input/output) names."""

    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None


class _UsageLine(msgspec.Struct):
    usage: Usage | None = None


class _AnthropicDelta(msgspec.Struct):
    """Anthropic's ``message_start`` nests usage one level down."""

    message: _UsageLine | None = None
    usage: Usage | None = None


_decode_usage_line = msgspec.json.Decoder(_AnthropicDelta).decode


class Tap:
    """Watches one stream's chunks; read its fields when the stream ends."""

    __slots__ = (
        "_tail",
        "completion_tokens",
        "done",
        "error",
        "first_token_at",
        "frames",
        "prompt_tokens",
    )

    def __init__(self) -> None:
        self._tail = b""
        self.first_token_at = 0.0
        self.frames = 0
        self.done = False
        self.error = False
        self.prompt_tokens: int | None = None
        self.completion_tokens: int | None = None

    def feed(self, chunk: bytes) -> None:
        """Account for one chunk as it is forwarded (the chunk is not kept)."""
        end = chunk.rfind(b"\n") + 1
        if self._tail:
            whole = self._tail + chunk[:end] if end else b""
            self._tail = chunk[end:] if end else self._tail + chunk
        elif end == len(chunk):
            whole = chunk
        else:
            whole = chunk[:end]
            self._tail = chunk[end:]
        if whole:
            self._scan(whole)

    def _scan(self, lines: bytes) -> None:
        self.frames += lines.count(b"data:")
        if not self.first_token_at and _FIRST_TOKEN.search(lines):
            self.first_token_at = time.monotonic()
        if _USAGE.search(lines):
            self._read_usage(lines)
        if b'{"error"' in lines or b"event: error" in lines:
            self.error = True
        if b"data: [DONE]" in lines or b"event: message_stop" in lines:
            self.done = True

    def _read_usage(self, lines: bytes) -> None:
        for line in lines.split(b"\n"):
            if not line.startswith(b"data:") or not _USAGE.search(line):
                continue
            try:
                found = _decode_usage_line(line[5:])
            except msgspec.DecodeError:
                continue
            usage = found.usage or (found.message.usage if found.message else None)
            if usage is not None:
                self._merge(usage)

    def _merge(self, usage: Usage) -> None:
        prompt = usage.prompt_tokens if usage.prompt_tokens is not None else usage.input_tokens
        completion = (
            usage.completion_tokens if usage.completion_tokens is not None else usage.output_tokens
        )
        if prompt is not None:
            self.prompt_tokens = prompt
        if completion is not None:
            self.completion_tokens = completion

    @property
    def content_frames(self) -> int:
        """Frames other than the ``[DONE]`` terminator: an estimate of tokens."""
        return self.frames - 1 if self.done and self.frames else self.frames


class DataSplitter:
    """Splits a byte stream into complete SSE events, at any chunk boundary.

    :meth:`feed` returns ``(event, data)`` pairs: ``event`` is the ``event:``
    field (``b""`` when absent) and ``data`` the joined ``data:`` lines.
    Comment lines (keep-alives) are dropped.
    """

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, chunk: bytes) -> list[tuple[bytes, bytes]]:
        buf = self._buf + chunk if self._buf else chunk
        if b"\r" in buf:
            buf = buf.replace(b"\r\n", b"\n")
        blocks = buf.split(b"\n\n")
        self._buf = blocks.pop()
        return [ev for ev in map(_parse_block, blocks) if ev is not None]

    def flush(self) -> list[tuple[bytes, bytes]]:
        """Events left when the stream ends without a final blank line."""
        rest, self._buf = self._buf, b""
        ev = _parse_block(rest)
        return [ev] if ev is not None else []


def _parse_block(block: bytes) -> tuple[bytes, bytes] | None:
    event = b""
    data: list[bytes] = []
    for line in block.split(b"\n"):
        if line.startswith(b"data:"):
            data.append(line[6:] if line[5:6] == b" " else line[5:])
        elif line.startswith(b"event:"):
            event = line[6:].strip()
    if not data:
        return None
    return event, b"\n".join(data)
