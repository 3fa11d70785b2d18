"""Anthropic <-> OpenAI translation: requests, responses and the stream state machine."""

from __future__ import annotations

import copy
import itertools
import re
from typing import Any

import anthropic
import httpx2
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cortex import errors
from cortex.anthropic import (
    StreamTranslator,
    estimate_tokens,
    from_openai,
    to_openai,
)

FLEET_MODEL = "Qwen/Qwen3-4B"


def request(**fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": "claude-opus-5-5",
        "max_tokens": 256,
        "messages": [{"role": "user", "content": "hi"}],
    }
    body.update(fields)
    return body


def translate(**fields: Any) -> dict[str, Any]:
    return to_openai(request(**fields), model=FLEET_MODEL)


def tool(name: str, description: str = "") -> dict[str, Any]:
    schema = {"type": "object", "properties": {"x": {"type": "string"}}, "required": ["x"]}
    return {"name": name, "description": description or f"The {name} tool.", "input_schema": schema}


def function(name: str, description: str = "") -> dict[str, Any]:
    spec = tool(name, description)
    return {
        "type": "function",
        "function": {
            "name": name,
            "parameters": spec["input_schema"],
            "description": spec["description"],
        },
    }


PNG = "iVBORw0KGgo="


# --- request translation ---------------------------------------------------------------


def test_minimal_request() -> None:
    assert translate() == {
        "model": FLEET_MODEL,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 256,
    }


@pytest.mark.parametrize(
    ("system", "expected"),
    [
        ("Be brief.", [{"role": "system", "content": "Be brief."}]),
        (
            [
                {"type": "text", "text": "header"},
                {"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}},
            ],
            [{"role": "system", "content": "header\nBe brief."}],
        ),
        ("", []),
        ([], []),
    ],
)
def test_system_becomes_the_first_message(system: Any, expected: list[dict[str, Any]]) -> None:
    messages = translate(system=system)["messages"]
    assert messages == [*expected, {"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    ("source", "url"),
    [
        (
            {"type": "base64", "media_type": "image/png", "data": PNG},
            f"data:image/png;base64,{PNG}",
        ),
        ({"type": "url", "url": "https://example.com/cat.jpg"}, "https://example.com/cat.jpg"),
    ],
)
def test_images_become_image_url_parts(source: dict[str, Any], url: str) -> None:
    content = [
        {"type": "text", "text": "What is this?"},
        {"type": "image", "source": source, "cache_control": {"type": "ephemeral"}},
    ]
    messages = translate(messages=[{"role": "user", "content": content}])["messages"]
    assert messages == [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is this?"},
                {"type": "image_url", "image_url": {"url": url}},
            ],
        }
    ]


def test_text_blocks_of_a_user_turn_join_into_one_string() -> None:
    content = [{"type": "text", "text": "<reminder>"}, {"type": "text", "text": "say hi"}]
    messages = translate(messages=[{"role": "user", "content": content}])["messages"]
    assert messages == [{"role": "user", "content": "<reminder>\nsay hi"}]


def test_tool_use_and_tool_results_come_before_the_same_turn_user_text() -> None:
    messages = [
        {"role": "user", "content": "List and read."},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Sure."},
                {"type": "tool_use", "id": "toolu_a", "name": "LS", "input": {"path": "."}},
                {"type": "tool_use", "id": "call_b", "name": "Read", "input": {}},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Also check README."},
                {"type": "tool_result", "tool_use_id": "call_b", "content": "file body"},
                {
                    "type": "tool_result",
                    "tool_use_id": "toolu_a",
                    "content": [{"type": "text", "text": "a.py"}, {"type": "text", "text": "b.py"}],
                },
            ],
        },
    ]
    assert translate(messages=messages)["messages"] == [
        {"role": "user", "content": "List and read."},
        {
            "role": "assistant",
            "content": "Sure.",
            "tool_calls": [
                {
                    "id": "toolu_a",
                    "type": "function",
                    "function": {"name": "LS", "arguments": '{"path":"."}'},
                },
                {
                    "id": "call_b",
                    "type": "function",
                    "function": {"name": "Read", "arguments": "{}"},
                },
            ],
        },
        {"role": "tool", "tool_call_id": "call_b", "content": "file body"},
        {"role": "tool", "tool_call_id": "toolu_a", "content": "a.py\nb.py"},
        {"role": "user", "content": "Also check README."},
    ]


def test_assistant_tool_call_without_text_has_null_content() -> None:
    call = {"type": "tool_use", "id": "t1", "name": "Bash", "input": {"command": "ls"}}
    messages = [
        {"role": "user", "content": "go"},
        {"role": "assistant", "content": [call]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1"}]},
    ]
    out = translate(messages=messages)["messages"]
    assert out[1]["content"] is None
    assert orjson.loads(out[1]["tool_calls"][0]["function"]["arguments"]) == {"command": "ls"}
    assert out[2:] == [{"role": "tool", "tool_call_id": "t1", "content": ""}]


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("command not found", "Error: command not found"),
        ([{"type": "text", "text": "exit 1"}], "Error: exit 1"),
    ],
)
def test_tool_result_errors_stay_visible_to_the_model(content: Any, expected: str) -> None:
    result = {"type": "tool_result", "tool_use_id": "t1", "content": content, "is_error": True}
    messages = translate(messages=[{"role": "user", "content": [result]}])["messages"]
    assert messages == [{"role": "tool", "tool_call_id": "t1", "content": expected}]


def test_tool_result_images_move_to_the_following_user_message() -> None:
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}}
    result = {"type": "tool_result", "tool_use_id": "t1", "content": [image]}
    content = [result, {"type": "text", "text": "What do you see?"}]
    messages = translate(messages=[{"role": "user", "content": content}])["messages"]
    assert messages == [
        {"role": "tool", "tool_call_id": "t1", "content": "[image attached in the next message]"},
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
                {"type": "text", "text": "What do you see?"},
            ],
        },
    ]


def test_thinking_in_history_becomes_reasoning_content_and_redacted_is_dropped() -> None:
    assistant = {
        "role": "assistant",
        "content": [
            {"type": "thinking", "thinking": "Let me think.", "signature": ""},
            {"type": "redacted_thinking", "data": "opaque=="},
            {"type": "text", "text": "Hello."},
        ],
    }
    messages = [{"role": "user", "content": "hi"}, assistant, {"role": "user", "content": "more"}]
    assert translate(messages=messages)["messages"][1] == {
        "role": "assistant",
        "content": "Hello.",
        "reasoning_content": "Let me think.",
    }


def test_an_empty_final_assistant_message_is_dropped() -> None:
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": []}]
    assert translate(messages=messages)["messages"] == [{"role": "user", "content": "hi"}]


TOOLS = [tool("Bash"), tool("Read")]


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ({"type": "auto"}, {"tool_choice": "auto"}),
        ({"type": "any"}, {"tool_choice": "required"}),
        (
            {"type": "tool", "name": "Read"},
            {"tool_choice": {"type": "function", "function": {"name": "Read"}}},
        ),
        ({"type": "none"}, {"tool_choice": "none"}),
        (
            {"type": "auto", "disable_parallel_tool_use": True},
            {"tool_choice": "auto", "parallel_tool_calls": False},
        ),
        (
            {"type": "any", "disable_parallel_tool_use": True},
            {"tool_choice": "required", "parallel_tool_calls": False},
        ),
        (
            {"type": "tool", "name": "Bash", "disable_parallel_tool_use": True},
            {
                "tool_choice": {"type": "function", "function": {"name": "Bash"}},
                "parallel_tool_calls": False,
            },
        ),
        ({"type": "auto", "disable_parallel_tool_use": False}, {"tool_choice": "auto"}),
    ],
)
def test_tool_choice_forms(choice: dict[str, Any], expected: dict[str, Any]) -> None:
    out = translate(tools=TOOLS, tool_choice=choice)
    assert out["tools"] == [function("Bash"), function("Read")]
    assert {k: out[k] for k in ("tool_choice", "parallel_tool_calls") if k in out} == expected


def test_tool_choice_auto_without_tools_is_dropped() -> None:
    assert "tool_choice" not in translate(tool_choice={"type": "auto"})


@pytest.mark.parametrize(
    ("thinking", "expected"),
    [
        ({"type": "enabled", "budget_tokens": 2048}, True),
        ({"type": "adaptive", "display": "omitted"}, True),
        ({"type": "disabled"}, False),
    ],
)
def test_thinking_config(thinking: dict[str, Any], expected: bool) -> None:
    assert translate(thinking=thinking)["enable_thinking"] is expected


def test_no_thinking_config_leaves_the_model_default() -> None:
    assert "enable_thinking" not in translate()


@pytest.mark.parametrize(
    ("max_tokens", "cap", "expected"),
    [(128000, None, 128000), (128000, 8192, 8192), (100, 8192, 100), (8192, 8192, 8192)],
)
def test_max_tokens_clamp(max_tokens: int, cap: int | None, expected: int) -> None:
    out = to_openai(request(max_tokens=max_tokens), model=FLEET_MODEL, max_tokens_cap=cap)
    assert out["max_tokens"] == expected


def test_sampling_stop_and_user_pass_through() -> None:
    out = translate(
        temperature=0.2,
        top_p=0.9,
        top_k=40,
        stop_sequences=["END", "\n\nHuman:"],
        metadata={"user_id": "user_42"},
    )
    assert {k: out[k] for k in ("temperature", "top_p", "top_k", "stop", "user")} == {
        "temperature": 0.2,
        "top_p": 0.9,
        "top_k": 40,
        "stop": ["END", "\n\nHuman:"],
        "user": "user_42",
    }


@pytest.mark.parametrize(
    ("stream", "expected"),
    [
        (True, {"stream": True, "stream_options": {"include_usage": True}}),
        (False, {"stream": False}),
    ],
)
def test_stream_asks_for_usage(stream: bool, expected: dict[str, Any]) -> None:
    out = translate(stream=stream)
    assert {k: out[k] for k in ("stream", "stream_options") if k in out} == expected


def test_unknown_top_level_keys_are_dropped() -> None:
    out = translate(
        context_management={"edits": [{"type": "clear_thinking_20251015"}]},
        output_config={"effort": "high"},
        anthropic_beta=["interleaved-thinking-2025-05-14"],
        service_tier="auto",
        container="container_1",
        mcp_servers=[],
        something_new={"x": 1},
    )
    assert set(out) == {"model", "messages", "max_tokens"}


CLAUDE_CODE_TOOLS = [
    "Agent",
    "Bash",
    "Edit",
    "Glob",
    "Grep",
    "MultiEdit",
    "NotebookEdit",
    "Read",
    "TodoWrite",
    "WebFetch",
    "WebSearch",
    "Write",
]


def claude_code_request() -> dict[str, Any]:
    """The shape Claude Code 2.1 sends for `claude -p "say hi"` (long texts shortened)."""
    cache = {"type": "ephemeral"}
    return {
        "model": "claude-opus-5-5",
        "max_tokens": 128000,
        "stream": True,
        "system": [
            {"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1.328;"},
            {"type": "text", "text": "You are Claude Code.", "cache_control": cache},
            {"type": "text", "text": "# Environment\ncwd: /work", "cache_control": cache},
        ],
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "<system-reminder>context</system-reminder>"},
                    {"type": "text", "text": "say hi", "cache_control": cache},
                ],
            }
        ],
        "tools": [tool(name) for name in CLAUDE_CODE_TOOLS],
        "thinking": {"type": "adaptive", "display": "omitted"},
        "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
        "output_config": {"effort": "high"},
        "metadata": {"user_id": "user_abc_account_def_session_ghi"},
    }


def test_a_real_claude_code_request_translates() -> None:
    out = to_openai(claude_code_request(), model=FLEET_MODEL, max_tokens_cap=32768)
    assert out == {
        "model": FLEET_MODEL,
        "messages": [
            {
                "role": "system",
                "content": "x-anthropic-billing-header: cc_version=2.1.328;\n"
                "You are Claude Code.\n# Environment\ncwd: /work",
            },
            {"role": "user", "content": "<system-reminder>context</system-reminder>\nsay hi"},
        ],
        "max_tokens": 32768,
        "user": "user_abc_account_def_session_ghi",
        "tools": [function(name) for name in CLAUDE_CODE_TOOLS],
        "enable_thinking": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def test_translation_does_not_mutate_the_request() -> None:
    body = claude_code_request()
    before = copy.deepcopy(body)
    to_openai(body, model=FLEET_MODEL)
    assert body == before


def user_block(block: dict[str, Any]) -> dict[str, Any]:
    return request(messages=[{"role": "user", "content": [block]}])


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (
            request(tools=[{"type": "web_search_20250305", "name": "web_search", "max_uses": 5}]),
            "'web_search_20250305'",
        ),
        (request(tools=[{"type": "bash_20250124", "name": "bash"}]), "server tool"),
        (request(tools=[{"name": "Bash"}]), "tools.0.input_schema"),
        (
            user_block(
                {
                    "type": "document",
                    "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBE"},
                }
            ),
            "'document'",
        ),
        (
            user_block(
                {"type": "search_result", "source": "s", "title": "t", "content": []},
            ),
            "'search_result'",
        ),
        (
            user_block(
                {
                    "type": "tool_result",
                    "tool_use_id": "t",
                    "content": [{"type": "document", "source": {}}],
                }
            ),
            "messages.0.content.0.content.0",
        ),
        (
            user_block({"type": "image", "source": {"type": "file", "file_id": "file_1"}}),
            "image source 'file'",
        ),
        (request(messages=[{"role": "system", "content": "hi"}]), "at least one user or"),
        (request(messages=[{"role": "tool", "content": "hi"}]), "messages.0.role"),
        (request(messages=[]), "messages"),
        (request(messages="hi"), "messages"),
        (request(messages=[{"role": "user", "content": 3}]), "messages.0.content"),
        (request(messages=[{"role": "user", "content": []}]), "must not be empty"),
        (request(messages=[{"role": "user", "content": [{"text": "x"}]}]), "'type'"),
        (user_block({"type": "thinking", "thinking": "x", "signature": ""}), "user turns may hold"),
        (
            request(
                messages=[
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": [{"type": "server_tool_use", "id": "s"}]},
                    {"role": "user", "content": "again"},
                ]
            ),
            "run only on Anthropic's API",
        ),
        (
            request(
                messages=[
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": [{"type": "image", "source": {}}]},
                ]
            ),
            "assistant turns may hold",
        ),
        ({"model": "m", "messages": [{"role": "user", "content": "hi"}]}, "max_tokens"),
        (request(max_tokens=0), "max_tokens"),
        (request(max_tokens=True), "max_tokens"),
        (request(max_tokens="100"), "max_tokens"),
        (request(model=None), "model"),
        (request(tool_choice={"type": "tool", "name": "Nope"}, tools=TOOLS), "'Nope'"),
        (request(tool_choice={"type": "any"}), "needs at least one tool"),
        (request(tool_choice={"type": "sometimes"}, tools=TOOLS), "tool_choice.type"),
        (request(thinking={"type": "maybe"}), "thinking.type"),
        (request(stop_sequences="END"), "stop_sequences"),
        (request(temperature="hot"), "temperature"),
        (request(system=[{"type": "image", "source": {}}]), "system.0"),
    ],
)
def test_invalid_or_unsupported_input_is_a_bad_request(body: dict[str, Any], fragment: str) -> None:
    with pytest.raises(errors.BadRequest) as caught:
        to_openai(body, model=FLEET_MODEL)
    assert fragment in caught.value.message
    assert errors.payload(caught.value, errors.Dialect.ANTHROPIC)["error"] == {
        "type": "invalid_request_error",
        "message": caught.value.message,
    }


# --- token estimate ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"messages": [{"role": "user", "content": "a" * 40}]}, 10 + 4),
        ({"messages": [{"role": "user", "content": "a" * 41}]}, 11 + 4),
        ({"messages": [{"role": "user", "content": "漢字" * 2}]}, 3 + 4),
        ({"system": "b" * 8, "messages": [{"role": "user", "content": "a" * 8}]}, 4 + 4),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image", "source": {}}]},
                    {"role": "assistant", "content": [{"type": "thinking", "thinking": "t" * 4}]},
                ]
            },
            1600 + 1 + 8,
        ),
        ({"messages": []}, 1),
        ({}, 1),
        ({"messages": "junk", "tools": "junk", "system": 3}, 1),
    ],
)
def test_estimate_tokens_rule(body: dict[str, Any], expected: int) -> None:
    assert estimate_tokens(body) == expected


REDACTED = {"type": "redacted_thinking", "data": "b3BhcXVl" * 5}
DOCUMENT = {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "x"}}


@pytest.mark.parametrize(
    ("block", "size"),
    [
        ({"type": "text", "text": "a" * 40}, 40),
        ({"type": "tool_use", "id": "t", "name": "Bash", "input": {"command": "ls"}}, 4 + 16),
        ({"type": "tool_result", "tool_use_id": "t", "content": "x" * 40}, 40),
        (
            {
                "type": "tool_result",
                "tool_use_id": "t",
                "content": [{"type": "text", "text": "x" * 40}],
            },
            40,
        ),
        ({"type": "thinking", "thinking": "t" * 40, "signature": "sig"}, 40),
        (REDACTED, len(orjson.dumps(REDACTED))),
        (DOCUMENT, len(orjson.dumps(DOCUMENT))),
    ],
)
def test_estimate_counts_every_block_kind(block: dict[str, Any], size: int) -> None:
    body = {"messages": [{"role": "user", "content": [block]}]}
    assert estimate_tokens(body) == -(-size // 4) + 4


def test_estimate_counts_tools_by_their_json() -> None:
    spec = tool("Bash")
    body = request(tools=[{**spec, "cache_control": {"type": "ephemeral"}}])
    size = len("hi") + len(orjson.dumps(spec))
    assert estimate_tokens(body) == -(-size // 4) + 4


def test_estimate_of_a_claude_code_request_is_plausible() -> None:
    tokens = estimate_tokens(claude_code_request())
    assert 12 * 20 < tokens < 2000


# --- non-streaming response ----------------------------------------------------------


def completion(
    message: dict[str, Any], finish: str | None = "stop", **choice: Any
) -> dict[str, Any]:
    return {
        "id": "1",
        "object": "chat.completion",
        "created": 1795395098,
        "model": FLEET_MODEL,
        "system_fingerprint": "local",
        "choices": [{"index": 0, "finish_reason": finish, "message": message, **choice}],
        "usage": {"prompt_tokens": 23, "completion_tokens": 7, "total_tokens": 30},
    }


def test_text_response() -> None:
    resp = from_openai(
        completion({"role": "assistant", "content": "Hello!", "tool_calls": None}),
        model="claude-opus-5-5",
    )
    assert re.fullmatch(r"msg_[0-9a-f]{24}", resp.pop("id"))
    assert resp == {
        "type": "message",
        "role": "assistant",
        "model": "claude-opus-5-5",
        "content": [{"type": "text", "text": "Hello!"}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": 23, "output_tokens": 7},
    }
    anthropic.types.Message.model_validate({**resp, "id": "msg_x"})


def test_thinking_text_and_tool_use_response_in_order() -> None:
    message = {
        "role": "assistant",
        "reasoning_content": "I should list files.",
        "content": "Listing.",
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "Bash", "arguments": '{"command": "ls"}'},
            },
            {
                "id": "call_2",
                "type": "function",
                "function": {"name": "Read", "arguments": "not json"},
            },
            {"id": "call_3", "type": "function", "function": {"name": "Glob", "arguments": "[1]"}},
            {"type": "function", "function": {"name": "LS", "arguments": ""}},
        ],
    }
    resp = from_openai(completion(message, "tool_calls"), model="claude-opus-5-5")
    content = resp["content"]
    assert content[:5] == [
        {"type": "thinking", "thinking": "I should list files.", "signature": ""},
        {"type": "text", "text": "Listing."},
        {"type": "tool_use", "id": "call_1", "name": "Bash", "input": {"command": "ls"}},
        {"type": "tool_use", "id": "call_2", "name": "Read", "input": {}},
        {"type": "tool_use", "id": "call_3", "name": "Glob", "input": {}},
    ]
    assert content[5]["input"] == {}
    assert re.fullmatch(r"toolu_[0-9a-f]{24}", content[5]["id"])
    assert resp["stop_reason"] == "tool_use"
    anthropic.types.Message.model_validate(resp)


@pytest.mark.parametrize(
    ("finish", "tool_calls", "choice", "expected"),
    [
        ("stop", None, {}, ("end_turn", None)),
        ("length", None, {}, ("max_tokens", None)),
        (
            "tool_calls",
            [{"id": "c", "function": {"name": "f", "arguments": "{}"}}],
            {},
            ("tool_use", None),
        ),
        (
            "stop",
            [{"id": "c", "function": {"name": "f", "arguments": "{}"}}],
            {},
            ("tool_use", None),
        ),
        ("content_filter", None, {}, ("refusal", None)),
        ("stop", None, {"stop_reason": "END"}, ("stop_sequence", "END")),
        ("stop", None, {"stop_reason": 151645}, ("end_turn", None)),
        ("canceled", None, {}, ("end_turn", None)),
        (None, None, {}, ("end_turn", None)),
    ],
)
def test_stop_reason_table(
    finish: str | None, tool_calls: Any, choice: dict[str, Any], expected: tuple[str, str | None]
) -> None:
    message = {"role": "assistant", "content": "x", "tool_calls": tool_calls}
    resp = from_openai(completion(message, finish, **choice), model="m")
    assert (resp["stop_reason"], resp["stop_sequence"]) == expected


def test_missing_usage_reads_zero() -> None:
    body = completion({"role": "assistant", "content": "x"})
    del body["usage"]
    assert from_openai(body, model="m")["usage"] == {"input_tokens": 0, "output_tokens": 0}


@pytest.mark.parametrize("resp", [{}, {"choices": []}, {"choices": ["x"]}])
def test_a_response_without_choices_is_a_bad_gateway(resp: dict[str, Any]) -> None:
    with pytest.raises(errors.BadGateway):
        from_openai(resp, model="m")


# --- streaming -----------------------------------------------------------------------


def chunk(
    delta: dict[str, Any] | None = None,
    finish: str | None = None,
    usage: dict[str, Any] | None = None,
    *,
    choices: bool = True,
) -> bytes:
    """One upstream frame, shaped like mistral.rs's (role and tool_calls repeated)."""
    full = {"role": "assistant", "content": None, "tool_calls": None, **(delta or {})}
    listed = [{"finish_reason": finish, "index": 0, "delta": full, "logprobs": None}]
    body = {
        "id": "3",
        "choices": listed if choices else [],
        "created": 1795395098,
        "model": FLEET_MODEL,
        "object": "chat.completion.chunk",
        "usage": usage,
    }
    return b"data: " + orjson.dumps(body) + b"\n\n"


DONE = b"data: [DONE]\n\n"
USAGE = {"prompt_tokens": 23, "completion_tokens": 5, "total_tokens": 28, "avg_tok_per_sec": 787.9}


def whole_call(index: int, call_id: str, name: str, arguments: str) -> dict[str, Any]:
    return {
        "index": index,
        "id": call_id,
        "type": "function",
        "function": {"name": name, "arguments": arguments},
    }


def parse_sse(raw: bytes) -> list[dict[str, Any]]:
    """Anthropic frames back into payloads; each must be `event: <type>` + one data line."""
    assert raw.endswith(b"\n\n") or not raw
    events = []
    for frame in raw.split(b"\n\n")[:-1]:
        event_line, data_line = frame.split(b"\n")
        assert event_line.startswith(b"event: ") and data_line.startswith(b"data: ")
        payload = orjson.loads(data_line[6:])
        assert payload["type"] == event_line[7:].decode()
        events.append(payload)
    return events


def run(
    upstream: list[bytes], *, input_tokens: int = 10
) -> tuple[list[dict[str, Any]], StreamTranslator]:
    translator = StreamTranslator(model="claude-opus-5-5", input_tokens=input_tokens)
    out = translator.start()
    for piece in upstream:
        out += translator.feed(piece)
    out += translator.finish()
    return parse_sse(out), translator


def outline(events: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    """A compact, exact view of an event sequence."""
    rows: list[tuple[Any, ...]] = []
    for ev in events:
        kind = ev["type"]
        if kind == "content_block_start":
            block = ev["content_block"]
            rows.append(("start", ev["index"], block["type"], block.get("id"), block.get("name")))
        elif kind == "content_block_delta":
            delta = ev["delta"]
            value = delta.get("text", delta.get("thinking", delta.get("partial_json")))
            rows.append(("delta", ev["index"], delta["type"], value))
        elif kind == "content_block_stop":
            rows.append(("stop", ev["index"]))
        elif kind == "message_delta":
            rows.append(("message_delta", ev["delta"]["stop_reason"], ev["usage"]))
        elif kind == "error":
            rows.append(("error", ev["error"]["type"]))
        else:
            rows.append((kind,))
    return rows


def test_message_start_carries_the_estimate() -> None:
    events, translator = run([DONE], input_tokens=321)
    start = events[0]
    assert re.fullmatch(r"msg_[0-9a-f]{24}", start["message"]["id"])
    assert start["message"]["id"] == translator.message_id
    assert start == {
        "type": "message_start",
        "message": {
            "id": translator.message_id,
            "type": "message",
            "role": "assistant",
            "model": "claude-opus-5-5",
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": 321, "output_tokens": 0},
        },
    }


MISTRAL_TEXT_THEN_TOOL = [
    chunk({"content": "Let me "}),
    chunk({"content": "check."}),
    chunk(
        {"content": "", "tool_calls": [whole_call(0, "call_1", "Bash", '{"command":"ls"}')]},
        "tool_calls",
        USAGE,
    ),
    DONE,
]


def test_text_then_a_whole_tool_call_with_usage_in_the_same_chunk() -> None:
    events, translator = run(MISTRAL_TEXT_THEN_TOOL)
    assert outline(events) == [
        ("message_start",),
        ("start", 0, "text", None, None),
        ("delta", 0, "text_delta", "Let me "),
        ("delta", 0, "text_delta", "check."),
        ("stop", 0),
        ("start", 1, "tool_use", "call_1", "Bash"),
        ("delta", 1, "input_json_delta", '{"command":"ls"}'),
        ("stop", 1),
        ("message_delta", "tool_use", {"output_tokens": 5, "input_tokens": 23}),
        ("message_stop",),
    ]
    assert events[5]["content_block"]["input"] == {}
    assert (translator.input_tokens, translator.output_tokens) == (23, 5)
    assert translator.stop_reason == "tool_use"
    assert translator.usage_reported


def test_two_parallel_whole_tool_calls_in_one_chunk() -> None:
    calls = [
        whole_call(0, "call_a", "Read", '{"x":"a"}'),
        whole_call(1, "call_b", "Read", '{"x":"b"}'),
    ]
    events, _ = run([chunk({"tool_calls": calls}, "tool_calls", USAGE), DONE])
    assert outline(events)[1:-2] == [
        ("start", 0, "tool_use", "call_a", "Read"),
        ("delta", 0, "input_json_delta", '{"x":"a"}'),
        ("stop", 0),
        ("start", 1, "tool_use", "call_b", "Read"),
        ("delta", 1, "input_json_delta", '{"x":"b"}'),
        ("stop", 1),
    ]


def fragment(
    index: int, arguments: str, call_id: str | None = None, name: str | None = None
) -> dict[str, Any]:
    piece: dict[str, Any] = {"index": index, "function": {"arguments": arguments}}
    if call_id:
        piece.update(id=call_id, type="function")
        piece["function"]["name"] = name
    return piece


VLLM_FRAGMENTED = [
    b": keep-alive\n\n",
    chunk({"role": "assistant", "content": ""}),
    chunk({"tool_calls": [fragment(0, "", "call_a", "Read")]}),
    chunk({"tool_calls": [fragment(0, '{"x":')]}),
    chunk({"tool_calls": [fragment(0, '"a"}')]}),
    chunk({"tool_calls": [fragment(1, '{"x":', "call_b", "Grep")]}),
    chunk({"tool_calls": [fragment(1, '"b"}')]}),
    chunk({}, "tool_calls"),
    chunk(usage={"prompt_tokens": 40, "completion_tokens": 12, "total_tokens": 52}, choices=False),
    DONE,
]


def test_two_parallel_fragmented_tool_calls_and_usage_after_finish_reason() -> None:
    events, translator = run(VLLM_FRAGMENTED)
    assert outline(events) == [
        ("message_start",),
        ("start", 0, "tool_use", "call_a", "Read"),
        ("delta", 0, "input_json_delta", '{"x":'),
        ("delta", 0, "input_json_delta", '"a"}'),
        ("stop", 0),
        ("start", 1, "tool_use", "call_b", "Grep"),
        ("delta", 1, "input_json_delta", '{"x":'),
        ("delta", 1, "input_json_delta", '"b"}'),
        ("stop", 1),
        ("message_delta", "tool_use", {"output_tokens": 12, "input_tokens": 40}),
        ("message_stop",),
    ]
    assert (translator.input_tokens, translator.output_tokens) == (40, 12)


def test_empty_deltas_and_role_only_chunks_open_no_block() -> None:
    upstream = [
        chunk({"role": "assistant"}),
        chunk({"content": ""}),
        chunk({"content": None, "reasoning_content": ""}),
        chunk({"content": "Hi"}),
        chunk({"content": ""}),
        chunk({"content": ""}, "stop", USAGE),
        DONE,
    ]
    events, _ = run(upstream)
    assert outline(events) == [
        ("message_start",),
        ("start", 0, "text", None, None),
        ("delta", 0, "text_delta", "Hi"),
        ("stop", 0),
        ("message_delta", "end_turn", {"output_tokens": 5, "input_tokens": 23}),
        ("message_stop",),
    ]


def test_an_answer_with_no_content_still_closes_properly() -> None:
    events, translator = run([chunk({"content": ""}, "stop", USAGE), DONE])
    assert outline(events) == [
        ("message_start",),
        ("message_delta", "end_turn", {"output_tokens": 5, "input_tokens": 23}),
        ("message_stop",),
    ]
    assert translator.stop_reason == "end_turn"


def test_reasoning_then_text() -> None:
    upstream = [
        chunk({"reasoning_content": "Think"}),
        chunk({"reasoning_content": "ing."}),
        chunk({"content": "Answer."}),
        chunk({}, "length", USAGE),
        DONE,
    ]
    events, _ = run(upstream)
    assert events[1] == {
        "type": "content_block_start",
        "index": 0,
        "content_block": {"type": "thinking", "thinking": "", "signature": ""},
    }
    assert outline(events)[1:] == [
        ("start", 0, "thinking", None, None),
        ("delta", 0, "thinking_delta", "Think"),
        ("delta", 0, "thinking_delta", "ing."),
        ("stop", 0),
        ("start", 1, "text", None, None),
        ("delta", 1, "text_delta", "Answer."),
        ("stop", 1),
        ("message_delta", "max_tokens", {"output_tokens": 5, "input_tokens": 23}),
        ("message_stop",),
    ]


def test_a_matched_stop_sequence_is_reported() -> None:
    upstream = [
        chunk({"content": "a"}),
        b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop","stop_reason":"END"}]}\n\n',
        DONE,
    ]
    events, _ = run(upstream)
    assert events[-2]["delta"] == {"stop_reason": "stop_sequence", "stop_sequence": "END"}


def test_without_upstream_usage_output_tokens_count_the_deltas() -> None:
    upstream = [chunk({"content": "a"}), chunk({"content": "b"}), chunk({}, "stop"), DONE]
    events, translator = run(upstream, input_tokens=77)
    assert events[-2]["usage"] == {"output_tokens": 2}
    assert (translator.input_tokens, translator.output_tokens) == (77, 2)
    assert not translator.usage_reported


ERROR_EVENT = b'data: {"error":{"message":"CUDA out of memory","type":"server_error","param":null,"code":null}}\n\n'


def test_an_upstream_error_event_ends_with_an_error_frame_and_no_message_stop() -> None:
    translator = StreamTranslator(model="m", input_tokens=1)
    out = translator.start() + translator.feed(chunk({"content": "Hel"}) + ERROR_EVENT)
    tail = translator.feed(DONE) + translator.finish() + translator.ping()
    assert tail == b""
    events = parse_sse(out)
    assert outline(events) == [
        ("message_start",),
        ("start", 0, "text", None, None),
        ("delta", 0, "text_delta", "Hel"),
        ("error", "api_error"),
    ]
    assert events[-1] == {
        "type": "error",
        "error": {
            "type": "api_error",
            "message": "the model failed mid-stream: CUDA out of memory",
        },
    }


def test_a_stream_cut_without_done_ends_with_an_error_frame() -> None:
    events, translator = run([chunk({"content": "Hel"}), chunk({"content": "lo"})])
    assert outline(events) == [
        ("message_start",),
        ("start", 0, "text", None, None),
        ("delta", 0, "text_delta", "Hel"),
        ("delta", 0, "text_delta", "lo"),
        ("error", "api_error"),
    ]
    assert "ended before it was complete" in events[-1]["error"]["message"]
    assert translator.stop_reason is None
    assert (translator.output_tokens, translator.usage_reported) == (2, False)


def test_done_without_a_final_blank_line_still_completes() -> None:
    events, _ = run([chunk({"content": "x"}, "stop", USAGE), b"data: [DONE]"])
    assert outline(events)[-1] == ("message_stop",)


@pytest.mark.parametrize(
    ("err", "kind"),
    [
        (errors.GatewayTimeout("no token for 60 s"), "api_error"),
        (errors.Unavailable("model is being reloaded"), "overloaded_error"),
    ],
)
def test_gateway_errors_end_the_stream(err: errors.CortexError, kind: str) -> None:
    translator = StreamTranslator(model="m", input_tokens=1)
    out = translator.start() + translator.feed(chunk({"content": "x"})) + translator.error(err)
    assert translator.feed(DONE) + translator.finish() + translator.error(err) == b""
    events = parse_sse(out)
    assert events[-1] == {"type": "error", "error": {"type": kind, "message": err.message}}
    assert all(ev["type"] != "message_stop" for ev in events)


def test_ping_frames() -> None:
    translator = StreamTranslator(model="m", input_tokens=1)
    assert translator.ping() == b'event: ping\ndata: {"type":"ping"}\n\n'
    assert parse_sse(translator.feed(b"") + translator.ping())[0]["type"] == "message_start"


def test_feed_sends_message_start_once_when_start_was_not_called() -> None:
    translator = StreamTranslator(model="m", input_tokens=1)
    out = translator.feed(chunk({"content": "x"})) + translator.start() + translator.feed(DONE)
    types = [ev["type"] for ev in parse_sse(out)]
    assert types.count("message_start") == 1
    assert types[0] == "message_start"


@pytest.mark.parametrize(
    "bad",
    [
        b"data: not json\n\n",
        chunk({"tool_calls": [fragment(0, "{}")]}),
        chunk({"tool_calls": [fragment(0, "", "c0", "A")]})
        + chunk({"tool_calls": [fragment(1, "", "c1", "B")]})
        + chunk({"tool_calls": [fragment(0, "{}")]}),
    ],
    ids=["malformed-json", "call-without-name", "interleaved-fragments"],
)
def test_protocol_violations_end_with_a_bad_gateway_error(bad: bytes) -> None:
    events, _ = run([bad, DONE])
    assert events[-1]["type"] == "error"
    assert events[-1]["error"]["type"] == "api_error"


# --- chunk boundaries ------------------------------------------------------------------

MIXED_STREAM = b"".join(
    [
        chunk({"reasoning_content": "Hmm, é 漢字."}),
        chunk({"content": "Text\nwith newline."}),
        *VLLM_FRAGMENTED[1:-1],
        DONE,
    ]
)


def normalized(pieces: list[bytes]) -> list[dict[str, Any]]:
    events, _ = run(pieces)
    events[0]["message"]["id"] = "msg_"
    return events


REFERENCE = normalized([MIXED_STREAM])


def test_reference_stream_is_complete() -> None:
    assert [ev["type"] for ev in REFERENCE].count("content_block_start") == 4
    assert REFERENCE[-1] == {"type": "message_stop"}


def test_every_two_piece_split_gives_the_same_events() -> None:
    for offset in range(len(MIXED_STREAM) + 1):
        pieces = [MIXED_STREAM[:offset], MIXED_STREAM[offset:]]
        assert normalized(pieces) == REFERENCE, offset


def test_crlf_line_endings_give_the_same_events() -> None:
    assert normalized([MIXED_STREAM.replace(b"\n", b"\r\n")]) == REFERENCE


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=len(MIXED_STREAM)), max_size=40))
def test_random_splits_give_the_same_events(cuts: list[int]) -> None:
    bounds = [0, *sorted(cuts), len(MIXED_STREAM)]
    pieces = [MIXED_STREAM[a:b] for a, b in itertools.pairwise(bounds)]
    assert normalized(pieces) == REFERENCE


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(min_size=1, max_size=8), min_size=1, max_size=6))
def test_any_text_round_trips(texts: list[str]) -> None:
    upstream = [chunk({"content": text}) for text in texts] + [chunk({}, "stop", USAGE), DONE]
    events, _ = run(upstream)
    joined = "".join(ev["delta"]["text"] for ev in events if ev["type"] == "content_block_delta")
    assert joined == "".join(texts)


# --- the official SDK reads what we produce -------------------------------------------------


def sdk_client(body: bytes) -> anthropic.Anthropic:
    def handler(_: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(200, headers={"content-type": "text/event-stream"}, content=body)

    http = httpx2.Client(transport=httpx2.MockTransport(handler))
    return anthropic.Anthropic(
        api_key="test", base_url="http://cortex.test", http_client=http, max_retries=0
    )


def translated(upstream: list[bytes]) -> bytes:
    translator = StreamTranslator(model="claude-opus-5-5", input_tokens=10)
    return translator.start() + b"".join(map(translator.feed, upstream)) + translator.finish()


def test_the_anthropic_sdk_accumulates_our_stream() -> None:
    upstream = [chunk({"reasoning_content": "Plan."}), *MISTRAL_TEXT_THEN_TOOL]
    client = sdk_client(translated(upstream))
    with client.messages.stream(
        model="claude-opus-5-5", max_tokens=64, messages=[{"role": "user", "content": "ls"}]
    ) as stream:
        message = stream.get_final_message()
    assert [block.type for block in message.content] == ["thinking", "text", "tool_use"]
    assert message.content[1].text == "Let me check."  # type: ignore[union-attr]
    assert message.content[2].input == {"command": "ls"}  # type: ignore[union-attr]
    assert message.stop_reason == "tool_use"
    assert (message.usage.input_tokens, message.usage.output_tokens) == (23, 5)


def test_the_anthropic_sdk_raises_on_our_error_frame() -> None:
    client = sdk_client(translated([chunk({"content": "Hel"}), ERROR_EVENT, DONE]))
    with (
        pytest.raises(anthropic.APIStatusError, match="CUDA out of memory"),
        client.messages.stream(
            model="claude-opus-5-5", max_tokens=64, messages=[{"role": "user", "content": "hi"}]
        ) as stream,
    ):
        stream.get_final_message()


def _raw_run(pieces: list[bytes]) -> bytes:
    translator = StreamTranslator(model="claude-opus-5-5", input_tokens=10)
    translator.message_id = "msg_fixed"
    out = translator.start()
    for piece in pieces:
        out += translator.feed(piece)
    return out + translator.finish()


# Text pieces after the block opened (the fast path), then reasoning, a tool call,
# text again, a finish with usage: every kind of event the fast path must decline.
FAST_AND_SLOW = b"".join(
    [
        chunk({"content": "Hel"}),
        chunk({"content": 'lo, "quoted" é 漢 \n'}),
        chunk({"content": ""}),
        chunk({"reasoning_content": "think"}),
        chunk({"content": "more"}),
        chunk({"content": "x"}, finish="length"),
        chunk({"tool_calls": [whole_call(0, "call_1", "Bash", '{"command":"ls"}')]}),
        chunk({"content": "after"}),
        chunk(finish="stop", usage=USAGE),
        DONE,
    ]
)


@pytest.mark.parametrize("stream", [FAST_AND_SLOW, MIXED_STREAM])
def test_the_text_fast_path_writes_the_same_bytes_as_the_general_path(
    stream: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    taken: list[bool] = []
    general = StreamTranslator._text_fast

    def spy(self: StreamTranslator, data: bytes, out: list[bytes]) -> bool:
        taken.append(general(self, data, out))
        return taken[-1]

    monkeypatch.setattr(StreamTranslator, "_text_fast", spy)
    fast = _raw_run([stream])
    if stream is FAST_AND_SLOW:
        assert any(taken) and not all(taken)  # both paths ran
    monkeypatch.setattr("cortex.anthropic._FAST_TEXT", False)
    assert fast == _raw_run([stream])
    assert parse_sse(fast)[-1] == {"type": "message_stop"}
