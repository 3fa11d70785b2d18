"""Pure SSE helpers: the per-chunk tap of the hot path, and a frame splitter.

:class:`Tap` watches an OpenAI-style stream (or an Anthropic one, when a node
serves ``/v1/messages`` natively) without copying it: it stamps the first
token as chunks pass, and at the end decodes with msgspec only the lines that
carry ``usage``. Frames are counted in batches, late, or never: their count only
estimates the tokens of a stream without usage. Chunks may split lines anywhere;
only an unfinished last line is carried over to the next chunk.

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
_USAGE_KEY = b'"usage":'
# How a usage object starts in mistral.rs / orjson output, and in Python-json servers (vLLM).
_USAGE_OBJECT = (b"{", b" {")
# At a line start only: generated text may say "event: error" (it cannot hold a raw newline).
_ERROR_LINE = re.compile(rb'^(?:data: ?\{"error"|event: error)', re.MULTILINE)
_LAST_FRAME = 256
_WINDOW = 2048  # the last usage line and the terminator of any stream fit well within it
# Enough chunks to hold a stream's last frames even when each arrives alone.
_RECENT_CHUNKS = 8
# Uncounted bytes a stream may keep alive. Counting costs ~0.45 us/KB (CPython 3.11): an
# answer with usage of up to ~120 mistral.rs tokens (~265 B a frame) is never counted, and
# 10,000 streams keep at most 320 MiB alive that the proxy would otherwise have let go.
_COUNT_BUDGET = 32 * 1024


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

    Per chunk it only looks for the first token, until it is seen, and keeps the
    chunk by reference. Usage, errors and the terminator sit at the ends of a
    stream (mistral.rs and vLLM send usage last, Anthropic splits it between
    ``message_start`` and ``message_delta``), so the first chunk and the last
    few are read once, in :meth:`close`. Frames are counted once
    :data:`_COUNT_BUDGET` bytes wait for it, or when :attr:`frames` is read.
    """

    __slots__ = (
        "_counted",
        "_end",
        "_head",
        "_recent",
        "_tail",
        "_uncounted",
        "_uncounted_bytes",
        "completion_tokens",
        "done",
        "error",
        "first_token_at",
        "prompt_tokens",
    )

    def __init__(self) -> None:
        self._tail = b""
        self._end = b""
        self._head = b""
        self._recent: deque[bytes] = deque(maxlen=_RECENT_CHUNKS)
        self._uncounted: list[bytes] = []
        self._uncounted_bytes = 0
        self._counted = 0
        self.first_token_at = 0.0
        self.done = False
        self.error = False
        self.prompt_tokens: int | None = None
        self.completion_tokens: int | None = None

    def feed(self, chunk: bytes) -> None:
        """Account for one chunk as it is forwarded (only a reference is kept)."""
        if self._tail or chunk[-1:] != b"\n":  # a line cut short: keep only whole lines
            end = chunk.rfind(b"\n") + 1
            if not end:
                self._tail += chunk
                return
            chunk, self._tail = self._tail + chunk[:end], chunk[end:]
        if not self.first_token_at:
            self._look_for_first_token(chunk)
        self._recent.append(chunk)
        self._uncounted.append(chunk)
        self._uncounted_bytes += len(chunk)
        if self._uncounted_bytes > _COUNT_BUDGET:
            self._count()

    def _look_for_first_token(self, lines: bytes) -> None:
        if len(self._head) < _WINDOW:  # several chunks if small: message_start's usage may be split
            self._head += lines
        if _FIRST_TOKEN.search(lines):
            self.first_token_at = time.monotonic()

    def _count(self) -> None:
        # One join and count: ~20% cheaper than a count per chunk when chunks are frames.
        self._counted += b"".join(self._uncounted).count(b"data:")
        self._uncounted.clear()
        self._uncounted_bytes = 0

    @property
    def frames(self) -> int:
        """The ``data:`` fields seen so far; an unfinished last line counts after :meth:`close`."""
        if self._uncounted:
            self._count()
        return self._counted

    def close(self) -> None:
        """The stream ended (or was abandoned): read usage, errors and the terminator.

        Only the first and the last :data:`_WINDOW` bytes are searched: usage
        comes on the first event (Anthropic) or the last ones (everyone), an
        error event right before the end, and a stream's ends may be one large
        chunk each.
        """
        if self._tail:
            self._uncounted.append(self._tail)
        end = self._last_bytes()
        lo = max(0, len(end) - _WINDOW)
        # The end first, as the later usage wins; the head only for a count still unknown.
        if not self._read_usage(end, lo, len(end)) and self._head:
            self._read_usage(self._head, 0, _WINDOW)
        # bytes.find first: the anchored regex costs ~7x more over a whole window.
        self.error = end.find(b"error", lo) >= 0 and _ERROR_LINE.search(end, lo) is not None
        last = end[-_LAST_FRAME:].rstrip().rpartition(b"\n\n")[2]
        self.done = last == b"data: [DONE]" or last.startswith(b"event: message_stop")
        self._end = end

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

    def _read_usage(self, lines: bytes, lo: int, hi: int) -> bool:
        """Fill the unknown counts from the ``data:`` lines with usage in ``lines[lo:hi]``.

        The lines are read last first, so each count comes from the last line
        that has it, and the search stops once both are known (True).
        """
        at = lines.rfind(_USAGE_KEY, lo, hi)
        while at >= 0:
            start = lines.rfind(b"\n", 0, at) + 1
            is_object = lines.startswith(_USAGE_OBJECT, at + len(_USAGE_KEY), hi)
            if is_object and lines.startswith(b"data:", start):
                stop = lines.find(b"\n", at)
                self._decode(lines[start + 5 : stop if stop >= 0 else len(lines)])
                if self.prompt_tokens is not None and self.completion_tokens is not None:
                    return True
                at = start  # the line's other keys lead to the same line
            at = lines.rfind(_USAGE_KEY, lo, at)
        return False

    def _decode(self, payload: bytes) -> None:
        try:
            found = _decode_usage_line(payload)
        except msgspec.DecodeError:
            return
        usage = found.usage or (found.message.usage if found.message else None)
        if usage is not None:
            self._fill(usage)

    def _fill(self, usage: Usage) -> None:
        if self.prompt_tokens is None:
            self.prompt_tokens = (
                usage.prompt_tokens if usage.prompt_tokens is not None else usage.input_tokens
            )
        if self.completion_tokens is None:
            self.completion_tokens = (
                usage.completion_tokens
                if usage.completion_tokens is not None
                else usage.output_tokens
            )

    @property
    def content_frames(self) -> int:
        """Frames but the terminator and an empty closing frame: an estimate of tokens."""
        if not self.done:
            return self.frames
        return self.frames - 1 - self._closing_frame_is_empty()

    def _closing_frame_is_empty(self) -> bool:
        """Whether the frame before the terminator (finish_reason, usage) has no token.

        Read late: the proxy asks only for a stream without usage, and the regex costs
        ~1.3 us on a mistral.rs closing frame.
        """
        closing = self._end[-_WINDOW:].rstrip().rsplit(b"\n\n", 2)
        return len(closing) > 1 and not _FIRST_TOKEN.search(closing[-2])


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
