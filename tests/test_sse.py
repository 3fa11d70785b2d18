"""The SSE tap and splitter, fed real mistral.rs frames split at awkward boundaries."""

from __future__ import annotations

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from cortex import sse
from cortex.sse import DataSplitter, Tap


def _chunk(
    content: str, *, finish: str | None = None, usage: dict[str, object] | None = None
) -> bytes:
    frame = {
        "id": "3",
        "choices": [
            {
                "finish_reason": finish,
                "index": 0,
                "delta": {"content": content, "role": "assistant", "tool_calls": None},
                "logprobs": None,
            }
        ],
        "created": 1795395098,
        "model": "Qwen/Qwen3-4B",
        "system_fingerprint": "local",
        "object": "chat.completion.chunk",
        "usage": usage,
    }
    return b"data: " + orjson.dumps(frame) + b"\n\n"


USAGE = {
    "completion_tokens": 3,
    "prompt_tokens": 23,
    "total_tokens": 26,
    "avg_tok_per_sec": 787.9,
    "avg_prompt_tok_per_sec": 2555.6,
    "avg_compl_tok_per_sec": 125.0,
    "total_time_sec": 0.033,
    "total_prompt_time_sec": 0.009,
    "total_completion_time_sec": 0.024,
}
MISTRALRS_STREAM = (
    _chunk("Hel")
    + _chunk("lo")
    + _chunk("!")
    + _chunk("", finish="stop", usage=USAGE)
    + b"data: [DONE]\n\n"
)
# vLLM / llama.cpp with stream_options.include_usage: a last chunk with no choices.
VLLM_STREAM = (
    _chunk("Hi")
    + _chunk("", finish="stop")
    + b'data: {"id":"x","object":"chat.completion.chunk","choices":[],"usage":{"prompt_tokens":5,"completion_tokens":1,"total_tokens":6}}\n\n'
    + b"data: [DONE]\n\n"
)
COMPLETIONS_STREAM = (
    b'data: {"id":"1","choices":[{"text":"a","index":0,"finish_reason":null}]}\n\n'
    b'data: {"id":"1","choices":[{"text":"b","index":0,"finish_reason":"stop"}]}\n\n'
    b"data: [DONE]\n\n"
)


def _tap(stream: bytes, cuts: list[int]) -> Tap:
    tap = Tap()
    last = 0
    for cut in [*sorted(cuts), len(stream)]:
        tap.feed(stream[last:cut])
        last = cut
    tap.close()
    return tap


def test_mistralrs_stream_usage_on_final_chunk() -> None:
    tap = _tap(MISTRALRS_STREAM, [])
    assert (tap.prompt_tokens, tap.completion_tokens) == (23, 3)
    assert tap.done and not tap.error
    assert tap.first_token_at > 0
    assert tap.content_frames == 3


def test_every_single_split_point_gives_the_same_result() -> None:
    for cut in range(len(MISTRALRS_STREAM) + 1):
        tap = _tap(MISTRALRS_STREAM, [cut])
        assert (tap.prompt_tokens, tap.completion_tokens, tap.done) == (23, 3, True), cut
        assert tap.content_frames == 3, cut


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=len(VLLM_STREAM)), max_size=30))
def test_vllm_usage_chunk_at_any_chunking(cuts: list[int]) -> None:
    tap = _tap(VLLM_STREAM, cuts)
    assert (tap.prompt_tokens, tap.completion_tokens, tap.done) == (5, 1, True)
    assert tap.first_token_at > 0


def test_completions_stream_has_no_usage_so_frames_estimate_tokens() -> None:
    tap = _tap(COMPLETIONS_STREAM, [7, 50])
    assert tap.completion_tokens is None
    assert tap.content_frames == 2
    assert tap.first_token_at > 0


# No usage, and longer than the bytes the tap keeps uncounted: frames are counted in batches.
LONG_STREAM = (
    b"".join(_chunk(f"w{i} ") for i in range(300)) + _chunk("", finish="stop") + b"data: [DONE]\n\n"
)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=len(LONG_STREAM)), max_size=30))
def test_frames_past_the_count_budget_at_any_chunking(cuts: list[int]) -> None:
    assert len(LONG_STREAM) > 2 * sse._COUNT_BUDGET
    tap = _tap(LONG_STREAM, cuts)
    assert tap.completion_tokens is None
    assert (tap.frames, tap.content_frames, tap.done) == (302, 300, True)


def test_frames_past_the_count_budget_fed_frame_by_frame_or_in_small_pieces() -> None:
    frame_ends = [at + 2 for at in range(len(LONG_STREAM)) if LONG_STREAM.startswith(b"\n\n", at)]
    for cuts in (frame_ends, list(range(0, len(LONG_STREAM), 7)), [1, 2, 3, len(LONG_STREAM) - 1]):
        tap = _tap(LONG_STREAM, cuts)
        assert (tap.frames, tap.content_frames) == (302, 300)


def test_a_stream_keeps_at_most_the_budget_uncounted() -> None:
    tap = Tap()
    for frame in LONG_STREAM.split(b"\n\n"):
        tap.feed(frame + b"\n\n")
        assert sum(map(len, tap._uncounted)) <= sse._COUNT_BUDGET


def test_frames_read_mid_stream_then_at_the_end() -> None:
    tap = Tap()
    cut = len(_chunk("Hel")) + 10
    tap.feed(MISTRALRS_STREAM[:cut])
    assert (tap.frames, tap.content_frames) == (1, 1)
    tap.feed(MISTRALRS_STREAM[cut:])
    tap.close()
    assert (tap.frames, tap.content_frames) == (5, 3)


def test_the_last_usage_line_wins_for_each_count() -> None:
    stream = (
        _chunk("a", usage={"prompt_tokens": 90, "completion_tokens": 90})
        + _chunk("b")
        + b'data: {"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":1}}\n\n'
        + b'data: {"choices":[],"usage": {"completion_tokens":2}}\n\n'
        + b"data: [DONE]\n\n"
    )
    for cut in range(0, len(stream), 5):
        tap = _tap(stream, [cut])
        assert (tap.prompt_tokens, tap.completion_tokens) == (5, 2), cut


# An Anthropic stream long enough that its head and end windows do not overlap.
MESSAGE_START = b'event: message_start\ndata: {"type":"message_start","message":{"usage":{"input_tokens":12,"output_tokens":1}}}\n\n'
TEXT_DELTAS = (
    b'event: content_block_delta\ndata: {"type":"content_block_delta","delta":{"text":"x"}}\n\n'
) * 100


def test_usage_only_in_the_head_of_a_long_stream() -> None:
    stream = MESSAGE_START + TEXT_DELTAS + b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
    frame_ends = [at + 2 for at in range(len(stream)) if stream.startswith(b"\n\n", at)]
    for cuts in ([], [len(MESSAGE_START)], frame_ends):
        tap = _tap(stream, cuts)
        assert (tap.prompt_tokens, tap.completion_tokens, tap.done) == (12, 1, True)


def test_end_usage_wins_over_the_head_of_a_long_stream() -> None:
    end = b'event: message_delta\ndata: {"type":"message_delta","usage":{"output_tokens":100}}\n\n'
    tap = _tap(MESSAGE_START + TEXT_DELTAS + end, [len(MESSAGE_START)])
    assert (tap.prompt_tokens, tap.completion_tokens) == (12, 100)


def test_role_only_and_empty_deltas_do_not_stamp_first_token() -> None:
    tap = Tap()
    tap.feed(_chunk(""))
    tap.feed(b": keep-alive\n\n")
    assert tap.first_token_at == 0
    tap.feed(_chunk("x"))
    assert tap.first_token_at > 0


def test_tool_call_counts_as_first_token() -> None:
    tap = Tap()
    tap.feed(b'data: {"choices":[{"delta":{"content":null,"tool_calls":[{"id":"call_1"}]}}]}\n\n')
    assert tap.first_token_at > 0


def test_usage_far_from_the_end_is_still_found_in_the_first_chunk() -> None:
    start = b'event: message_start\ndata: {"type":"message_start","message":{"usage":{"input_tokens":9}}}\n\n'
    delta = (
        b'event: content_block_delta\ndata: {"type":"content_block_delta","delta":{"text":"x"}}\n\n'
    )
    tap = _tap(start + delta * 50, [len(start) + len(delta) * i for i in range(50)])
    assert tap.prompt_tokens == 9 and not tap.done


def test_mid_stream_error_and_truncation_are_seen() -> None:
    tap = Tap()
    tap.feed(_chunk("a"))
    tap.feed(
        b'data: {"error":{"message":"boom","type":"server_error","param":null,"code":null}}\n\n'
    )
    tap.close()
    assert tap.error and not tap.done
    cut = Tap()
    cut.feed(_chunk("a") + _chunk("b"))
    cut.close()
    assert not cut.done and not cut.error


def test_anthropic_native_stream_usage() -> None:
    stream = (
        b'event: message_start\ndata: {"type":"message_start","message":{"id":"msg_1","usage":{"input_tokens":12,"output_tokens":1}}}\n\n'
        b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"hi"}}\n\n'
        b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{"output_tokens":7}}\n\n'
        b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
    )
    for cut in range(0, len(stream), 7):
        tap = _tap(stream, [cut])
        assert (tap.prompt_tokens, tap.completion_tokens, tap.done) == (12, 7, True)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=len(MISTRALRS_STREAM)), max_size=40))
def test_splitter_yields_the_same_events_at_any_chunking(cuts: list[int]) -> None:
    splitter = DataSplitter()
    events = []
    last = 0
    for cut in [*sorted(cuts), len(MISTRALRS_STREAM)]:
        events += splitter.feed(MISTRALRS_STREAM[last:cut])
        last = cut
    events += splitter.flush()
    datas = [data for _, data in events]
    assert datas[-1] == b"[DONE]"
    assert [orjson.loads(d)["choices"][0]["delta"]["content"] for d in datas[:-1]] == [
        "Hel",
        "lo",
        "!",
        "",
    ]


def test_splitter_reads_event_names_crlf_and_comments() -> None:
    splitter = DataSplitter()
    events = splitter.feed(
        b": ping\r\n\r\nevent: message_stop\r\ndata: {}\r\n\r\ndata: a\ndata: b\n\n"
    )
    assert events == [(b"message_stop", b"{}"), (b"", b"a\nb")]
    assert splitter.feed(b"data: tail") == []
    assert splitter.flush() == [(b"", b"tail")]
