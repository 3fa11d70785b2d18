"""Properties over generated input: the SSE tap and the Anthropic translator.

`test_sse.py` and `test_anthropic.py` split a few fixed streams at random; here
the streams themselves are generated (text with SSE look-alikes in it,
reasoning, whole and fragmented tool calls, keep-alives, usage in either
place, errors, truncation, CRLF) and so are the request bodies.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cortex import anthropic
from cortex.errors import BadRequest, CortexError
from cortex.sse import Tap

# Text that looks like the protocol around it, mixed into generated content.
TRICKY = [
    "data: [DONE]",
    "event: message_stop",
    "event: error",
    "data:",
    '"usage":{"prompt_tokens":1}',
    "\n\n",
    "\r\n",
    '"}',
    "\\",
    "é 漢字 🙂",
]
TEXT = st.one_of(st.text(max_size=10), st.sampled_from(TRICKY))
PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def sse(payload: object) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def chunk(delta: dict[str, Any], finish: str | None = None, usage: Any = None) -> bytes:
    """A chat.completion.chunk the way mistral.rs writes one (role and tool_calls repeated)."""
    full = {"role": "assistant", "content": None, "tool_calls": None, **delta}
    choice = {"finish_reason": finish, "index": 0, "delta": full, "logprobs": None}
    return sse(
        {"id": "3", "choices": [choice], "created": 1, "model": "m", "object": "x", "usage": usage}
    )


@dataclass
class Stream:
    """A generated upstream stream and what is true of it."""

    raw: bytes
    usage: tuple[int, int] | None
    done: bool
    error: bool
    has_token: bool


@st.composite
def tool_calls(draw: st.DrawFn, first_index: int) -> tuple[list[bytes], int]:
    """One or two tool calls, whole in one chunk (mistral.rs) or in argument fragments (vLLM)."""
    frames = []
    count = draw(st.integers(1, 2))
    for index in range(first_index, first_index + count):
        args = orjson.dumps(draw(st.dictionaries(st.text(max_size=4), TEXT, max_size=3))).decode()
        call_id, name = f"call_{index}", draw(st.sampled_from(["Bash", "Read", "x"]))
        if draw(st.booleans()):
            call = {"index": index, "id": call_id, "type": "function"}
            call["function"] = {"name": name, "arguments": args}
            frames.append(chunk({"tool_calls": [call]}))
            continue
        cuts = sorted(draw(st.lists(st.integers(0, len(args)), max_size=3)))
        pieces = [args[a:b] for a, b in itertools.pairwise([0, *cuts, len(args)])]
        opening = {"index": index, "id": call_id, "type": "function"}
        opening["function"] = {"name": name, "arguments": pieces[0]}
        frames.append(chunk({"tool_calls": [opening]}))
        frames += [
            chunk({"tool_calls": [{"index": index, "function": {"arguments": p}}]})
            for p in pieces[1:]
        ]
    return frames, count


@st.composite
def openai_streams(draw: st.DrawFn) -> Stream:
    frames: list[bytes] = []
    has_token = False
    for kind in draw(
        st.lists(st.sampled_from(["text", "reasoning", "empty", "ping"]), max_size=12)
    ):
        if kind == "ping":
            frames.append(b": keep-alive\n\n")
        elif kind == "empty":
            frames.append(chunk({"content": ""}))
        else:
            text = draw(TEXT)
            frames.append(chunk({"content" if kind == "text" else "reasoning_content": text}))
            has_token |= bool(text)
    finish = "stop"
    if draw(st.booleans()):
        calls, _ = draw(tool_calls(0))
        frames += calls
        finish, has_token = "tool_calls", True
    prompt, completion = draw(st.integers(0, 10**6)), draw(st.integers(0, 10**6))
    usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": 0}
    style = draw(st.sampled_from(["final", "separate", "none"]))
    frames.append(chunk({"content": ""}, finish, usage if style == "final" else None))
    if style == "separate":  # vLLM with stream_options.include_usage
        frames.append(
            sse({"id": "x", "object": "chat.completion.chunk", "choices": [], "usage": usage})
        )
    error = draw(st.booleans())
    if error:
        frames.append(sse({"error": {"message": draw(TEXT), "type": "server_error"}}))
    done = draw(st.booleans())
    if done:
        frames.append(b"data: [DONE]\n\n")
    return Stream(
        b"".join(frames), None if style == "none" else (prompt, completion), done, error, has_token
    )


@st.composite
def anthropic_streams(draw: st.DrawFn) -> Stream:
    """A native /v1/messages stream, as newer nodes send it."""

    def event(kind: str, payload: dict[str, Any]) -> bytes:
        return f"event: {kind}\n".encode() + sse({"type": kind, **payload})

    prompt, completion = draw(st.integers(0, 10**6)), draw(st.integers(0, 10**6))
    message = {"id": "msg_1", "type": "message", "role": "assistant", "content": []}
    message["usage"] = {"input_tokens": prompt, "output_tokens": 1}
    frames = [event("message_start", {"message": message})]
    has_token = False
    for index, texts in enumerate(draw(st.lists(st.lists(TEXT, max_size=5), max_size=3))):
        frames.append(
            event(
                "content_block_start",
                {"index": index, "content_block": {"type": "text", "text": ""}},
            )
        )
        for text in texts:
            if draw(st.booleans()):
                frames.append(event("ping", {}))
            delta = {"type": "text_delta", "text": text}
            frames.append(event("content_block_delta", {"index": index, "delta": delta}))
            has_token |= bool(text)
        frames.append(event("content_block_stop", {"index": index}))
    error = draw(st.booleans())
    done = not error and draw(st.booleans())
    if error:
        frames.append(event("error", {"error": {"type": "api_error", "message": draw(TEXT)}}))
    else:
        delta = {"stop_reason": "end_turn", "stop_sequence": None}
        frames.append(
            event("message_delta", {"delta": delta, "usage": {"output_tokens": completion}})
        )
    if done:
        frames.append(event("message_stop", {}))
    usage = (prompt, 1 if error else completion)
    return Stream(b"".join(frames), usage, done, error, has_token)


def pieces(raw: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *sorted(c % (len(raw) + 1) for c in cuts), len(raw)]
    return [raw[a:b] for a, b in itertools.pairwise(bounds)]


CUTS = st.one_of(
    st.lists(st.integers(0, 1 << 16), max_size=40),  # anywhere
    st.integers(1, 5).map(lambda n: [-n]),  # every n bytes (a marker: see chunked())
)


def chunked(raw: bytes, cuts: list[int]) -> list[bytes]:
    if len(cuts) == 1 and cuts[0] < 0:
        n = -cuts[0]
        return [raw[i : i + n] for i in range(0, len(raw), n)]
    return pieces(raw, cuts)


def tap_of(parts: list[bytes]) -> tuple[Any, ...]:
    tap = Tap()
    for part in parts:
        tap.feed(part)
    tap.close()
    return (
        tap.prompt_tokens,
        tap.completion_tokens,
        tap.done,
        tap.error,
        bool(tap.first_token_at),
        tap.frames,
        tap.content_frames,
    )


# --- the tap -----------------------------------------------------------------------------


@PROPERTY
@given(st.one_of(openai_streams(), anthropic_streams()), CUTS, st.booleans())
def test_the_tap_reads_the_same_at_any_chunking(
    stream: Stream, cuts: list[int], crlf: bool
) -> None:
    raw = stream.raw.replace(b"\n", b"\r\n") if crlf else stream.raw
    assert tap_of(chunked(raw, cuts)) == tap_of([raw])


@PROPERTY
@given(st.one_of(openai_streams(), anthropic_streams()))
def test_the_tap_reads_what_the_stream_holds(stream: Stream) -> None:
    prompt, completion, done, error, first_token, *_ = tap_of([stream.raw])
    assert (prompt, completion) == (stream.usage or (None, None))
    assert done == stream.done
    assert error == stream.error
    assert first_token == stream.has_token


def test_text_saying_event_error_is_no_error() -> None:
    """Found by the properties above: the tap took the words for an error event, which
    also kept a truncated native Anthropic stream from getting its closing error."""
    raw = chunk({"content": "on event: error the SDK raises"}) + chunk({}, "stop")
    assert tap_of([raw])[3] is False
    assert tap_of([raw, b"event: error\ndata: {}\n\n"])[3] is True


def test_message_start_usage_is_read_when_it_comes_in_small_chunks() -> None:
    """Found by the properties above: only the first chunk was kept for message_start."""

    def event(kind: str, payload: dict[str, Any]) -> bytes:
        return f"event: {kind}\n".encode() + sse({"type": kind, **payload})

    start = {"type": "message", "role": "assistant", "usage": {"input_tokens": 42}}
    text = {"type": "text_delta", "text": "hi"}
    raw = (
        event("message_start", {"message": start})
        + event("content_block_start", {"index": 0, "content_block": {"type": "text"}})
        + event("content_block_delta", {"index": 0, "delta": text}) * 3
        + event("content_block_stop", {"index": 0})
        + event(
            "message_delta", {"delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 3}}
        )
        + event("message_stop", {})
    )
    for size in (1, 2, 3, 7, len(raw)):
        assert tap_of(chunked(raw, [-size]))[:3] == (42, 3, True), size


# --- the translator: streams ------------------------------------------------------------


def translate(parts: list[bytes]) -> list[dict[str, Any]]:
    translator = anthropic.StreamTranslator(model="claude-x", input_tokens=7)
    out = translator.start() + b"".join(translator.feed(p) for p in parts) + translator.finish()
    events = []
    for frame in out.split(b"\n\n")[:-1]:
        event_line, data_line = frame.split(b"\n")
        payload = orjson.loads(data_line.removeprefix(b"data: "))
        assert event_line == b"event: " + payload["type"].encode()
        events.append(payload)
    return events


def check_sequence(events: list[dict[str, Any]]) -> None:
    """What every Anthropic client relies on, whatever came from upstream."""
    assert events[0]["type"] == "message_start"
    last = events[-1]["type"]
    assert last in ("message_stop", "error")
    assert [e["type"] for e in events].count("message_stop") == (last == "message_stop")
    open_index: int | None = None
    next_index = 0
    for ev in events[1:-1]:
        kind = ev["type"]
        if kind == "content_block_start":
            assert open_index is None and ev["index"] == next_index
            open_index, next_index = ev["index"], next_index + 1
        elif kind == "content_block_delta":
            assert ev["index"] == open_index
        elif kind == "content_block_stop":
            assert ev["index"] == open_index
            open_index = None
        else:
            assert kind in ("message_delta", "ping"), kind
    if last == "message_stop":
        assert open_index is None and events[-2]["type"] == "message_delta"


@PROPERTY
@given(openai_streams(), CUTS)
def test_the_translator_emits_the_same_events_at_any_chunking(
    stream: Stream, cuts: list[int]
) -> None:
    whole = translate([stream.raw])
    check_sequence(whole)
    split = translate(chunked(stream.raw, cuts))
    whole[0]["message"]["id"] = split[0]["message"]["id"] = "msg"
    assert split == whole
    ended_well = stream.done and not stream.error
    assert (whole[-1]["type"] == "message_stop") == ended_well


@PROPERTY
@given(openai_streams())
def test_translated_tool_arguments_and_text_survive(stream: Stream) -> None:
    events = translate([stream.raw])
    blocks: dict[int, dict[str, Any]] = {}
    for ev in events:
        if ev["type"] == "content_block_start":
            blocks[ev["index"]] = {**ev["content_block"], "json": ""}
        elif ev["type"] == "content_block_delta":
            block, delta = blocks[ev["index"]], ev["delta"]
            key = {"text_delta": "text", "thinking_delta": "thinking"}.get(delta["type"])
            if key:
                block[key] += delta[key]
            else:
                block["json"] += delta["partial_json"]
    for block in blocks.values():
        if block["type"] == "tool_use":
            assert isinstance(orjson.loads(block["json"]), dict)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.binary(max_size=64), max_size=8))
def test_the_translator_survives_any_bytes(parts: list[bytes]) -> None:
    check_sequence(translate(parts))


# --- the translator: request and response bodies --------------------------------------------

JSON = st.recursive(  # what orjson.loads can return: integers in [-2**63, 2**64)
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=20,
)
BLOCK_TYPES = [
    "text", "image", "tool_use", "tool_result", "thinking", "redacted_thinking", "document",
    "server_tool_use", None,
]  # fmt: skip
BLOCK = st.fixed_dictionaries(
    {"type": st.sampled_from(BLOCK_TYPES)},
    optional={
        "text": JSON, "source": JSON, "id": JSON, "name": JSON, "input": JSON,
        "tool_use_id": JSON, "content": JSON | st.lists(JSON, max_size=2), "thinking": JSON,
        "is_error": JSON, "cache_control": JSON,
    },
)  # fmt: skip
MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "assistant", "system", "tool", 7])},
    optional={"content": TEXT | st.lists(BLOCK | JSON, max_size=3) | JSON},
)
BODY = st.fixed_dictionaries(
    {},
    optional={
        "model": st.just("claude-x") | JSON,
        "max_tokens": st.integers(-2, 10**9) | JSON,
        "messages": st.lists(MESSAGE, max_size=4) | JSON,
        "system": TEXT | st.lists(BLOCK, max_size=2) | JSON,
        "tools": st.lists(st.fixed_dictionaries({"name": TEXT}, optional={"input_schema": JSON, "type": JSON}), max_size=2) | JSON,
        "tool_choice": st.fixed_dictionaries({"type": st.sampled_from(["auto", "any", "tool", "none", "x"])}, optional={"name": JSON}) | JSON,
        "thinking": st.fixed_dictionaries({"type": st.sampled_from(["enabled", "adaptive", "disabled"])}, optional={"budget_tokens": JSON}) | JSON,
        "stop_sequences": st.lists(TEXT, max_size=3) | JSON,
        "temperature": JSON, "top_p": JSON, "top_k": JSON, "metadata": JSON, "stream": JSON,
    },
)  # fmt: skip


@settings(max_examples=200, deadline=None)
@given(BODY | JSON)
def test_any_request_body_is_translated_or_a_bad_request(body: Any) -> None:
    try:
        out = anthropic.to_openai(body, model="m1", max_tokens_cap=4096)
    except BadRequest:
        return
    orjson.dumps(out)  # what goes upstream is JSON
    assert out["model"] == "m1" and 1 <= out["max_tokens"] <= 4096


@settings(max_examples=150, deadline=None)
@given(BODY)
def test_any_request_body_has_a_token_estimate(body: dict[str, Any]) -> None:
    assert anthropic.estimate_tokens(body) >= 1  # count_tokens calls it without validating


@settings(max_examples=200, deadline=None)
@given(
    st.fixed_dictionaries(
        {},
        optional={
            "choices": st.lists(
                st.fixed_dictionaries({}, optional={"message": JSON | st.fixed_dictionaries({}, optional={"content": JSON, "tool_calls": st.lists(JSON, max_size=2) | JSON, "reasoning_content": JSON}), "finish_reason": JSON}) | JSON,
                max_size=2,
            ) | JSON,
            "usage": JSON,
        },
    )
)  # fmt: skip
def test_any_node_answer_is_translated_or_a_cortex_error(resp: dict[str, Any]) -> None:
    try:
        out = anthropic.from_openai(resp, model="claude-x")
    except CortexError:
        return
    assert out["type"] == "message" and isinstance(out["content"], list)
    orjson.dumps(out)
