"""Deterministic content, so a test can predict every byte a sim node says.

- Prompt tokens: `estimate_tokens(chars)` = `max(1, chars // 4)`, where `chars` is
  the length of all message text of the request (see `cortex.sim.answer.Prompt`).
- Answer content: `answer_pieces(n)`, one token per piece, each piece one word of
  `WORDS` (cycling) plus a trailing space; `answer_text(n)` is their join.
- Reasoning: `REASONING_PIECES`, emitted before the answer when thinking is on.
- An answer to a tool result: `tool_result_pieces(content)`, the words of
  `"Tool result: <content>"`, each plus a trailing space.
- Embeddings: `embedding(text)`, `EMBEDDING_DIM` floats in [-1, 1] from blake2b.
- Tool arguments nobody gave: `arguments_from_schema(schema)`.
- Directives in the last user message: `[[tool:NAME {json args}]]`, `[[tools:N]]`,
  `[[think]]`.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from typing import Any

import orjson

WORDS = (
    "lorem",
    "ipsum",
    "dolor",
    "sit",
    "amet",
    "consectetur",
    "adipiscing",
    "elit",
    "sed",
    "do",
    "eiusmod",
    "tempor",
    "incididunt",
    "ut",
    "labore",
    "et",
    "dolore",
    "magna",
    "aliqua.",
)
WORD_PIECES = tuple(word + " " for word in WORDS)
REASONING_PIECES = ("Let ", "me ", "think. ")
TOOL_RESULT_PREFIX = "Tool result: "
EMBEDDING_DIM = 8
CHARS_PER_TOKEN = 4

_TOOL_DIRECTIVE = re.compile(
    r"\[\[tool:(?P<name>[^\s\[\]{}]+)\s*(?P<args>\{.*?\})?\s*\]\]", re.DOTALL
)
_TOOLS_DIRECTIVE = re.compile(r"\[\[tools:(?P<count>\d+)\]\]")
_THINK_DIRECTIVE = "[[think]]"


def estimate_tokens(chars: int) -> int:
    """The token count a node reports for `chars` characters of prompt text."""
    return max(1, chars // CHARS_PER_TOKEN)


def answer_pieces(n: int) -> list[str]:
    """The first `n` content tokens of a plain answer."""
    cycles = n // len(WORD_PIECES) + 1
    return list(WORD_PIECES * cycles)[:n]


def answer_text(n: int) -> str:
    """The content of a plain answer of `n` tokens."""
    return "".join(answer_pieces(n))


def tool_result_pieces(content: str) -> list[str]:
    """The tokens of the answer to a tool result: it quotes the result."""
    return [word + " " for word in (TOOL_RESULT_PREFIX + content).split()]


def embedding(text: str) -> list[float]:
    """A deterministic `EMBEDDING_DIM`-dimensional vector for `text`."""
    digest = hashlib.blake2b(text.encode(), digest_size=EMBEDDING_DIM).digest()
    return [round(byte / 127.5 - 1.0, 6) for byte in digest]


def wants_thinking(text: str) -> bool:
    return _THINK_DIRECTIVE in text


def tool_directive(text: str) -> tuple[str, dict[str, Any] | None] | None:
    """`[[tool:NAME {json}]]` -> (NAME, args or None when absent or not a JSON object)."""
    match = _TOOL_DIRECTIVE.search(text)
    if match is None:
        return None
    return match["name"], _json_object(match["args"])


def parallel_directive(text: str) -> int | None:
    """`[[tools:N]]` -> N."""
    match = _TOOLS_DIRECTIVE.search(text)
    return int(match["count"]) if match else None


def first_mentioned(text: str, names: Sequence[str]) -> str | None:
    """The tool name mentioned as a whole word earliest in `text`."""
    best: tuple[int, str] | None = None
    for name in names:
        match = re.search(rf"(?<!\w){re.escape(name)}(?!\w)", text)
        if match and (best is None or match.start() < best[0]):
            best = (match.start(), name)
    return best[1] if best else None


def arguments_from_schema(schema: Mapping[str, Any]) -> dict[str, Any]:
    """Arguments filling every required property: strings "x", numbers 1, booleans true."""
    properties = schema.get("properties") or {}
    required = schema.get("required") or []
    return {name: _sample(properties.get(name) or {}) for name in required}


def _sample(schema: Mapping[str, Any]) -> Any:
    if schema.get("enum"):
        return schema["enum"][0]
    kind = schema.get("type", "string")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object":
        return arguments_from_schema(schema)
    if kind == "array":
        return []
    return _SCALARS.get(kind, "x")


_SCALARS: dict[str, Any] = {"string": "x", "integer": 1, "number": 1, "boolean": True, "null": None}


def _json_object(text: str | None) -> dict[str, Any] | None:
    if text is None:
        return None
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None
