"""Pure SSE helpers: the per-chunk tap of the hot path, and a frame splitter.

:class:`Tap` watches an OpenAI-style stream (or an Anthropic one, when a node
serves ``/v1/messages`` natively) without copying it: it stamps the first
token and counts frames as chunks pass, and at the end decodes with msgspec
only the lines that carry ``usage``. Chunks may split lines anywhere; only an
unfinished last line is carried over to the next chunk.

:class:`DataSplitter` is for code that must read every event (the Anthropic
translator): it returns each complete ``data:`` payload.
"""

from __future__ import annotations

import re
import time
from collections import deque

import msgspec

DONE_FRAME = b"data: [DONE]\n\n"

# The first frame that carries generated text, reasoning or a tool call.
_FIRST_TOKEN = re.compile(
    rb'"(?:content|reasoning_content|text|partial_json|thinking)":\s*"[^"]|"tool_calls":\s*\[\{'
)
# How usage starts in mistral.rs / orjson output, and in Python-json servers (vLLM).
_USAGE_MARKERS = (b'"usage":{', b'"usage": {')
# At a line start only: generated text may say "event: error" (it cannot hold a raw newline).
_ERROR_LINE = re.compile(rb'^(?:data: ?\{"error"|event: error)', re.MULTILINE)
_LAST_FRAME = 256
_WINDOW = 2048  # the last usage line and the terminator of any stream fit well within it
# Enough chunks to hold a stream's last frames even when each arrives alone.
_RECENT_CHUNKS = 8


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
    """Watches one stream's chunks; call :meth:`close` at the end, then read its fields.

    Per chunk it only counts frames and, until the first token, looks for it.
    Usage, errors and the terminator sit at the ends of a stream (mistral.rs and
    vLLM send usage last, Anthropic splits it between ``message_start`` and
    ``message_delta``), so the first chunk and the last few are kept by
    reference and read once, in :meth:`close`.
    """

    __slots__ = (
        "_closing_empty",
        "_head",
        "_recent",
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
        self._closing_empty = False
        self._head = b""
        self._recent: deque[bytes] = deque(maxlen=_RECENT_CHUNKS)
        self.first_token_at = 0.0
        self.frames = 0
        self.done = False
        self.error = False
        self.prompt_tokens: int | None = None
        self.completion_tokens: int | None = None

    def feed(self, chunk: bytes) -> None:
        """Account for one chunk as it is forwarded (only a reference is kept)."""
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
            self.frames += whole.count(b"data:")
            if not self.first_token_at:
                self._look_for_first_token(whole)
            self._recent.append(whole)

    def _look_for_first_token(self, lines: bytes) -> None:
        if len(self._head) < _WINDOW:  # several chunks if small: message_start's usage may be split
            self._head += lines
        if _FIRST_TOKEN.search(lines):
            self.first_token_at = time.monotonic()

    def close(self) -> None:
        """The stream ended (or was abandoned): read usage, errors and the terminator.

        Only the first and the last :data:`_WINDOW` bytes are searched: usage
        comes on the first event (Anthropic) or the last ones (everyone), an
        error event right before the end, and a stream's ends may be one large
        chunk each.
        """
        if self._tail:
            self.frames += self._tail.count(b"data:")
        end = self._last_bytes()
        if self._head:  # read first: the end's usage, read next, wins where both have one
            self._read_usage(self._head, 0, _WINDOW)
        lo = max(0, len(end) - _WINDOW)
        self._read_usage(end, lo, len(end))
        maybe_error = end.find(b'{"error"', lo) >= 0 or end.find(b"event: error", lo) >= 0
        # bytes.find first: the anchored regex costs ~10x more over a whole window.
        self.error = maybe_error and _ERROR_LINE.search(end, lo) is not None
        last = end[-_LAST_FRAME:].rstrip().rpartition(b"\n\n")[2]
        self.done = last == b"data: [DONE]" or last.startswith(b"event: message_stop")
        if self.done:  # a closing frame (finish_reason, usage) without text is no token
            closing = end[lo:].rstrip().rsplit(b"\n\n", 2)
            self._closing_empty = len(closing) > 1 and not _FIRST_TOKEN.search(closing[-2])

    def _last_bytes(self) -> bytes:
        """The end of the stream: the fewest recent chunks that hold _WINDOW bytes."""
        parts = [self._tail] if self._tail else []
        size = len(self._tail)
        for chunk in reversed(self._recent):
            if size >= _WINDOW:
                break
            parts.append(chunk)
            size += len(chunk)
        if len(parts) == 1:
            return parts[0]
        return b"".join(reversed(parts))

    def _read_usage(self, lines: bytes, lo: int, hi: int) -> None:
        """Decode each ``data:`` line that carries usage within ``lines[lo:hi]``, in order."""
        found = []
        for marker in _USAGE_MARKERS:
            at = lines.find(marker, lo, hi)
            while at >= 0:
                found.append(at)
                at = lines.find(marker, at + len(marker), hi)
        for at in sorted(found):
            start = lines.rfind(b"\n", 0, at) + 1
            stop = lines.find(b"\n", at)
            line = lines[start : stop if stop >= 0 else len(lines)]
            if line.startswith(b"data:"):
                self._decode(line[5:])

    def _decode(self, payload: bytes) -> None:
        try:
            found = _decode_usage_line(payload)
        except msgspec.DecodeError:
            return
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
        """Frames but the terminator and an empty closing frame: an estimate of tokens."""
        return self.frames - self.done - self._closing_empty


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
